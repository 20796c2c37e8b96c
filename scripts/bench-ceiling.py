#!/usr/bin/env python3
"""How close ONNX Runtime runs an ONNX file to what this machine's cores can do at all.

Prints the file's multiply-adds per image (Conv and Gemm nodes, from ONNX shape inference),
ONNX Runtime's images/s at batch 1 and the FLOP rate that makes, its kernel-time profile by
operator, and the best float32 matrix-product rate of the same threads (numpy's BLAS, 2048^3).

    /tmp/reference-venv/bin/pip install onnx   # once; numpy and onnxruntime are already there
    /tmp/reference-venv/bin/python scripts/bench-ceiling.py target/bench-runtime/model-float.onnx
"""
import argparse, collections, json, os, sys, tempfile, time

# The matrix-product reference gets the same threads as ONNX Runtime; BLAS reads this at import.
_threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "2"
os.environ.setdefault("OPENBLAS_NUM_THREADS", _threads)
import numpy as np
import onnx
import onnxruntime as ort
from onnx import shape_inference

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--runs", type=int, default=40)
a = ap.parse_args()

m = onnx.load(a.model)
for d in m.graph.input[0].type.tensor_type.shape.dim:
    if d.dim_param:
        d.dim_value = 1
m = shape_inference.infer_shapes(m)
shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
          for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
inits = {t.name: list(t.dims) for t in m.graph.initializer}
macs = 0
for n in m.graph.node:
    if n.op_type == "Conv":  # output elements x (in-channels per group x kh x kw)
        w = inits[n.input[1]]
        macs += int(np.prod(shapes[n.output[0]])) * w[1] * w[2] * w[3]
    elif n.op_type in ("Gemm", "MatMul") and n.input[1] in inits:
        macs += int(np.prod(inits[n.input[1]]))
gflop = 2 * macs / 1e9
print(f"{a.model}: input {shapes[m.graph.input[0].name]}, {macs / 1e9:.3f} G multiply-adds per image")

def session(profile=False):
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    s = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in i.shape]
    x = (np.random.rand(*shape) * 255).astype(np.float32 if "float" in i.type else np.uint8)
    return s, {i.name: x}

s, feed = session()
for _ in range(5):
    s.run(None, feed)
t = time.perf_counter()
for _ in range(a.runs):
    s.run(None, feed)
dt = (time.perf_counter() - t) / a.runs
print(f"ONNX Runtime, batch 1, {a.threads} threads: {dt * 1e3:.2f} ms, {1 / dt:.1f} img/s, {gflop / dt:.0f} GFLOP/s")

s, feed = session(profile=True)
for _ in range(10):
    s.run(None, feed)
prof = s.end_profiling()
by_op = collections.Counter()
for e in json.load(open(prof)):
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        by_op[e["args"].get("op_name")] += e["dur"]
total = sum(by_op.values())
print("kernel time by operator: " + ", ".join(f"{op} {d / total:.1%}" for op, d in by_op.most_common(5)))

n = 2048
x = np.random.rand(n, n).astype(np.float32)
y = np.random.rand(n, n).astype(np.float32)
x @ y
best = 0.0
for _ in range(8):
    t = time.perf_counter()
    x @ y
    best = max(best, 2 * n**3 / (time.perf_counter() - t))
print(f"float32 matrix product {n}^3 (numpy BLAS, {os.environ['OPENBLAS_NUM_THREADS']} threads): {best / 1e9:.0f} GFLOP/s")
print(f"ONNX Runtime on this file runs at {gflop / dt / (best / 1e9):.0%} of that; "
      f"at that peak it would do {best / 1e9 / gflop:.1f} img/s")

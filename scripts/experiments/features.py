#!/usr/bin/env python3
"""Experiment tool (session 15, docs/training.md): the pooled features (2048), the head's dense
features (after its ReLU), logits and probabilities of an exported float model on every photo of
a labelled folder (FOLDER/<class>/*.jpg), through onnxruntime in Python.

  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install onnxruntime onnx numpy pillow
  /tmp/venv/bin/python scripts/experiments/features.py runs/d15k-final/model.onnx \
      ../shared/data/footwear-15k/validation /tmp/knn/val.npz

Photos are resized with Pillow's bilinear filter, not the image crate's the runtime uses: the
classifier's own errors can differ by a photo from `trainer eval` (21 vs 20 on validation), so
compare methods within the output of this script only.
"""
import glob
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

model_path, folder, out = sys.argv[1:4]
m = onnx.load(model_path)
extra = [n.output[0] for n in m.graph.node if n.op_type == "ReduceMean" and n.name == "avg_pool"]
extra += [n.output[0] for n in m.graph.node if n.op_type == "Relu" and n.input[0] == "head_dense"]
if len(extra) != 2:
    sys.exit(f"{model_path}: expected the nodes avg_pool and head_dense/relu, found {extra}")
for e in extra:
    m.graph.output.append(onnx.helper.make_tensor_value_info(e, onnx.TensorProto.FLOAT, None))
so = ort.SessionOptions()
so.intra_op_num_threads = os.cpu_count()
s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
inp = s.get_inputs()[0]
size = inp.shape[1]
outs = [o.name for o in s.get_outputs()]
classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
files, labels = [], []
for i, c in enumerate(classes):
    fs = sorted(glob.glob(os.path.join(folder, c, "*.jpg")))
    files += fs
    labels += [i] * len(fs)
res = {o: [] for o in outs}
for k in range(0, len(files), 32):
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR))
                  for f in files[k:k + 32]])
    for o, v in zip(outs, s.run(outs, {inp.name: x})):
        res[o].append(v)
    if k % 1024 == 0:
        print(f"{folder}: {k}/{len(files)}", file=sys.stderr, flush=True)
np.savez(out, files=np.array(files), labels=np.array(labels), classes=np.array(classes),
         **{o.replace("/", "_"): np.concatenate(v) for o, v in res.items()})

"""onnxruntime's own quantizer as ../shared/bench/ort_quantize_reference.py runs it, with
`reduce_range=True` (7-bit weights, onnxruntime's remedy for CPUs without VNNI), to compare with
the exporter's 7-bit files (docs/benchmarks.md). Same arguments as the reference script:
  python scripts/ort-quantize-reduce-range.py MODEL OUT --data TRAIN --n 300"""
import os
import runpy
import sys

import onnxruntime.quantization as q

original = q.quantize_static


def with_reduce_range(*args, **kwargs):
    kwargs["reduce_range"] = True
    return original(*args, **kwargs)


q.quantize_static = with_reduce_range
reference = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "ort_quantize_reference.py")
sys.argv[0] = reference
runpy.run_path(reference, run_name="__main__")

#!/usr/bin/env bash
# Installs what the exporter and the runtime need from PyPI, once, under .local/ (git-ignored):
#   .local/onnxruntime/libonnxruntime.so.1.31.1   ONNX Runtime's library, from the onnxruntime wheel
#                                                 (ort loads it at run time; nothing downloads at build time)
#   .local/python/                                the Python `onnx` package, for onnx.checker in the tests
# With --gpu, also what the runtime's CUDA execution provider needs (2.4 GB; a machine with an
# NVIDIA driver >= 580 for CUDA 13):
#   .local/onnxruntime-gpu/onnxruntime/capi/      onnxruntime-gpu's library and its CUDA provider
#   .local/onnxruntime-gpu/nvidia/                NVIDIA's CUDA 13 and cuDNN 9 wheels (the ones
#                                                 onnxruntime-gpu's `cuda`/`cudnn` extras name);
#                                                 `footwear --device cuda` finds and loads both
# Cached: a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=1.31.1
ONNX_VERSION=1.19.1
gpu=0
case "${1:-}" in
  --gpu) gpu=1 ;;
  "") ;;
  *) echo "usage: $0 [--gpu]" >&2; exit 2 ;;
esac
dest=.local/onnxruntime
lib="$dest/libonnxruntime.so.$ORT_VERSION"
if [ ! -f "$lib" ]; then
  mkdir -p "$dest/download"
  python3 -m pip download --quiet --no-deps --only-binary=:all: "onnxruntime==$ORT_VERSION" -d "$dest/download"
  python3 - "$dest" "$ORT_VERSION" <<'PY'
import glob, shutil, sys, zipfile
dest, version = sys.argv[1], sys.argv[2]
wheel = sorted(glob.glob(f"{dest}/download/onnxruntime-{version}-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    for name in (f"libonnxruntime.so.{version}", "libonnxruntime_providers_shared.so"):
        with z.open(f"onnxruntime/capi/{name}") as src, open(f"{dest}/{name}.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.move(f"{dest}/{name}.tmp", f"{dest}/{name}")
PY
  rm -rf "$dest/download"
fi
if ! PYTHONPATH=.local/python python3 -c "import onnx" 2>/dev/null; then
  python3 -m pip install --quiet --target .local/python "onnx==$ONNX_VERSION"
fi
echo "ONNX Runtime $ORT_VERSION ready: $lib"
if [ "$gpu" = 1 ]; then
  gdest=.local/onnxruntime-gpu
  if [ ! -f "$gdest/onnxruntime/capi/libonnxruntime_providers_cuda.so" ] || [ ! -f "$gdest/nvidia/cudnn/lib/libcudnn.so.9" ]; then
    rm -rf "$gdest.tmp"
    python3 -m pip install --quiet --target "$gdest.tmp" --no-deps --only-binary=:all: "onnxruntime-gpu==$ORT_VERSION"
    python3 -m pip install --quiet --target "$gdest.tmp" --only-binary=:all: \
      "nvidia-cuda-runtime~=13.0" "nvidia-cuda-nvrtc~=13.0" "nvidia-cufft~=12.0" "nvidia-curand~=10.0" \
      "nvidia-cudnn-cu13~=9.0"
    rm -rf "$gdest"; mv "$gdest.tmp" "$gdest"
  fi
  echo "ONNX Runtime $ORT_VERSION with CUDA ready: $gdest/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION (footwear --device cuda uses it)"
fi

#!/usr/bin/env bash
# Compiles the trainer with its `cuda` feature (and `cudnn`, which implies it) on a machine
# without a GPU, and checks that the binary starts and refuses `--device cuda` with a clear error
# there. Also the runtime's CUDA execution provider: installs onnxruntime-gpu and NVIDIA's CUDA
# and cuDNN libraries (scripts/setup-onnxruntime.sh --gpu, 2.4 GB) and checks that
# `footwear --device cuda` loads all of it up to the missing driver, refuses with --require-cuda
# and otherwise falls back to the CPU saying so.
#
#   ./scripts/check-cuda.sh            # CI runs it after the tests
#
# nvcc comes from PyPI (the CUDA 13.0 `cuda-toolkit` wheels); libcuda and the CUDA libraries are
# link-only stubs (scripts/make-cuda-root.sh, about 100 MB of downloads, cached in .local/).
# Kernels are built for compute capability 9.0 (H100/H200; CUDA_COMPUTE_CAP overrides). The
# build goes to target/cuda (about 11 minutes on 2 cores the first time, nearly all of it nvcc
# compiling Candle's kernels); the binary is target/cuda/release/trainer.
#
# On a machine with a GPU, build the same way (with the real CUDA toolkit, or this root) and run
# target/cuda/release/trainer train --device cuda [--precision bf16] with the real libraries on
# LD_LIBRARY_PATH: never the stubs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${CUDA_ROOT:-$PWD/.local/cuda}
if [ ! -x "$root/bin/nvcc" ]; then
  cargo fetch --quiet
  ./scripts/make-cuda-root.sh "$root" "$PWD/.local/cuda-venv"
fi
# The runtime first (the CUDA_* variables below would make cargo rebuild its dependencies).
# `expect WHAT PATTERN CODE COMMAND...`: COMMAND's output must match PATTERN and its
# exit status be CODE.
expect() {
  local what=$1 pattern=$2 want=$3; shift 3
  set +e; msg=$(env -u RUST_BACKTRACE NO_COLOR=1 "$@" 2>&1); code=$?; set -e
  if [ $code -ne "$want" ] || ! grep -q "$pattern" <<<"$msg"; then
    echo "check-cuda: $what: expected exit $want and '$pattern', got exit $code:" >&2
    echo "$msg" | cut -c1-400 | tail -5 >&2
    exit 1
  fi
  echo "check-cuda: $what: $(grep -o "$pattern" <<<"$msg" | head -1 | cut -c1-80)…"
}
./scripts/fetch-weights.sh
./scripts/setup-onnxruntime.sh --gpu
cargo build --release --workspace --bins   # as scripts/test.sh does: nothing to rebuild after it
model=$(mktemp -d)/xception.onnx
target/release/exporter weights/xception-imagenet -o "$model" --no-verify >/dev/null
fw=(target/release/footwear info -m "$model" --device cuda)
expect "the CUDA provider and NVIDIA's libraries load; only the driver is missing" \
  "providers_cuda.so with error: libcuda.so.1" 1 "${fw[@]}" --require-cuda
expect "with a stub driver the provider starts and CUDA refuses" \
  "CUDA failure [0-9]*: [^;]*" 1 env LD_LIBRARY_PATH=$root/lib64/stubs "${fw[@]}" --require-cuda
expect "without --require-cuda it falls back to the CPU and says so" \
  "execution provider CPU" 0 "${fw[@]}"

export CUDA_HOME=$root CUDA_PATH=$root CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} PATH=$root/bin:$PATH
cargo build --release --target-dir target/cuda -p trainer --features cudnn

bin=target/cuda/release/trainer
set +e
msg=$(env -u RUST_BACKTRACE LD_LIBRARY_PATH=$root/lib64/stubs:$root/lib64 "$bin" train --device cuda --out "$(mktemp -d)" 2>&1)
code=$?
set -e
echo "$msg" | tail -3
if [ $code -eq 0 ] || ! grep -q "no usable CUDA GPU" <<<"$msg"; then
  echo "check-cuda: expected '$bin train --device cuda' to fail with 'no usable CUDA GPU' here" >&2
  exit 1
fi
echo "check-cuda: the cuda build compiles, starts, and refuses --device cuda cleanly without a GPU"

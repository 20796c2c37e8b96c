#!/usr/bin/env bash
# Compiles the trainer with its `cuda` feature (and `cudnn`, which implies it) on a machine
# without a GPU, and checks that the binary starts and refuses `--device cuda` with a clear error
# there.
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

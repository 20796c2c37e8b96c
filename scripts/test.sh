#!/usr/bin/env bash
# The test suite: fetches and converts the ImageNet weights once (cached in weights/), installs
# ONNX Runtime's library and Python's onnx checker (cached in .local/), then runs every test of
# the workspace in release mode (the parity tests run the real network).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-weights.sh
./scripts/setup-onnxruntime.sh
# The end-to-end tests (tests/) run the `footwear` binary itself.
cargo build --release --workspace --bins
cargo test --release --workspace "$@"

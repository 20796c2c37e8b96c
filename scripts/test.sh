#!/usr/bin/env bash
# The test suite, alone on a fresh machine: installs the system packages it needs
# (scripts/setup-system.sh: protoc, Chromium and its driver, fonts, curl, openssl), fetches and converts the
# ImageNet weights once (cached in weights/), installs ONNX Runtime's library and Python's onnx
# checker (cached in .local/), then runs every test of the workspace in release mode (the parity
# tests run the real network). Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-system.sh test
./scripts/fetch-weights.sh
./scripts/setup-onnxruntime.sh
# The real clients of the server tests (tritonclient, openapi-spec-validator), in a venv.
./scripts/setup-python-clients.sh
# The end-to-end tests (tests/) run the `footwear` binary itself.
cargo build --release --workspace --bins
# Every crate's tests run even when one fails, so that one failure does not hide the others.
cargo test --release --workspace --no-fail-fast "$@"

#!/usr/bin/env bash
# Runs every fuzz target (proptest, stable Rust, inside `cargo test`) for MINUTES each with fresh
# random seeds, in batches of CASES, and prints how many cases each ran. A failing case stops the
# script with proptest's minimal failing input. CI runs each target once with proptest's default
# 256 cases as part of the tests.
#   ./scripts/fuzz.sh [MINUTES] [CASES]      (default 2 minutes, 2000 cases a batch)
# Targets: modelspec/tests/fuzz.rs (PNG, JPEG, WebP, raw bytes, ONNX metadata) and
# models/tests/fuzz.rs (safetensors, .keras zips); each test binary refuses any single allocation
# over its bound, so a decompression bomb fails the run instead of taking the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-2}
cases=${2:-2000}
cargo test --release --no-run -p modelspec --test fuzz -p models --test fuzz 2>/dev/null
log=$(mktemp)
for target in "modelspec png_files" "modelspec jpeg_files" "modelspec webp_files" "modelspec arbitrary_bytes" \
  "modelspec onnx_metadata" "models safetensors_files" "models keras_files"; do
  set -- $target
  end=$((SECONDS + minutes * 60))
  batches=0
  start=$SECONDS
  while [ $SECONDS -lt $end ]; do
    if ! PROPTEST_CASES=$cases cargo test --release -q -p "$1" --test fuzz -- --exact "$2" >"$log" 2>&1; then
      echo "fuzz: $1::$2 FAILED after $((batches * cases)) cases:" >&2
      cat "$log" >&2
      exit 1
    fi
    batches=$((batches + 1))
  done
  echo "fuzz: $1::$2: $((batches * cases)) cases in $((SECONDS - start)) s, no failure"
done
rm -f "$log"

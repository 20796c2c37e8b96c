#!/usr/bin/env bash
# Soak test of `footwear serve` under a memory cap (scripts/soak.py says what it sends and
# asserts): the Keras-imported 150 px kitchenware model, the footwear test photos.
#   ./scripts/soak.sh [SECONDS] [-- extra serve flags]     (default 300 s; CI runs 60)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-300}
shift || true
[ "${1:-}" = "--" ] && shift
./scripts/fetch-weights.sh >/dev/null
./scripts/setup-onnxruntime.sh >/dev/null
cargo build --quiet --release -p exporter -p runtime
mkdir -p target/soak
[ -f target/soak/model.onnx ] || target/release/exporter weights/kitchenware -o target/soak/model.onnx --no-verify >/dev/null
python3 scripts/soak.py --bin target/release/footwear --model target/soak/model.onnx \
  --photos ../shared/data/footwear/test --duration "$duration" --out target/soak -- "$@"

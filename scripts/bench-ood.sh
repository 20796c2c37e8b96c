#!/usr/bin/env bash
# What the out-of-distribution output costs (docs/ood.md, docs/benchmarks.md): the same run
# exported with `ood_score` (the default) and without it (`--no-ood`), then `footwear predict`
# over the 900 photos of ../shared/data/footwear/test (decode + resize + ONNX Runtime, batch 32,
# 2 threads) on each file in turn, ROUNDS rounds (default 5) in the order with, without,
# without, with, ... so that this VM's drift falls on both alike; the ratio is the median of the
# rounds' ratios. Prints the files' sizes, every round and a markdown table row.
#   scripts/bench-ood.sh [RUN_DIR] [ROUNDS]   (RUN_DIR: default runs/footwear)
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/footwear}
rounds=${2:-5}
out=target/bench-ood
mkdir -p "$out"
./scripts/setup-onnxruntime.sh >/dev/null
cargo build --quiet --release -p exporter -p runtime
target/release/exporter "$run" -o "$out/with.onnx" --no-candle-onnx >"$out/export-with.log" 2>&1
target/release/exporter "$run" -o "$out/without.onnx" --no-candle-onnx --no-ood >"$out/export-without.log" 2>&1
images=../shared/data/footwear/test
cli() { # model file → images/s, from the CLI's own log line
  NO_COLOR=1 RUST_LOG=info target/release/footwear predict -m "$1" --batch 32 --threads 2 --format csv "$images" \
    2>&1 >/dev/null | grep -o '([0-9.]* images/s)' | tr -d '(' | awk '{print $1}'
}
with=(); without=()
for ((r = 0; r < rounds; r++)); do
  if ((r % 2 == 0)); then
    with+=("$(cli "$out/with.onnx")"); without+=("$(cli "$out/without.onnx")")
  else
    without+=("$(cli "$out/without.onnx")"); with+=("$(cli "$out/with.onnx")")
  fi
  echo "round $((r + 1)): with ${with[r]} img/s, without ${without[r]} img/s" >&2
done
python3 - "$out/with.onnx" "$out/without.onnx" "${with[*]}" "${without[*]}" <<'EOF'
import os, statistics, sys
w, wo = [float(x) for x in sys.argv[3].split()], [float(x) for x in sys.argv[4].split()]
ratios = [a / b for a, b in zip(w, wo)]
sw, swo = os.path.getsize(sys.argv[1]), os.path.getsize(sys.argv[2])
print(f"file: {sw / 1e6:.1f} MB with, {swo / 1e6:.1f} MB without (+{(sw - swo) / 1e6:.1f} MB)")
print("| file | img/s (median of rounds) | with / without (median of paired rounds) |")
print("|---|---|---|")
print(f"| without `ood_score` (`--no-ood`) | {statistics.median(wo):.1f} | |")
print(f"| with `ood_score` (default) | {statistics.median(w):.1f} | {statistics.median(ratios):.3f} "
      f"(rounds {', '.join(f'{r:.3f}' for r in ratios)}) |")
EOF

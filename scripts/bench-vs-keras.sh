#!/usr/bin/env bash
# Xception forward speed, ours against Keras/TensorFlow, measured side by side in one sitting.
#   scripts/bench-vs-keras.sh [VENV]   (VENV: ../shared/bench/setup-reference-venv.sh's, default /tmp/reference-venv)
# Prints a markdown table for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/reference-venv}
ref=../shared/bench/keras_reference.py
[ -x "$venv/bin/python" ] || ../shared/bench/setup-reference-venv.sh "$venv"
./scripts/fetch-weights.sh >/dev/null
ours=$(cargo bench --quiet -p models --bench xception 2>/dev/null)
echo "$ours" >&2
echo "| input | batch | ours (img/s) | TensorFlow (img/s) | ratio |"
echo "|---|---|---|---|---|"
for cfg in "150 1" "150 32" "299 1" "299 32"; do
  set -- $cfg
  o=$(echo "$ours" | grep "forward: base + GAP, $1 px, batch $2 " | awk '{print $(NF-1)}')
  t=$("$venv/bin/python" $ref forward --size "$1" --batch "$2" --keras weights/download/kitchenware.keras 2>/dev/null \
      | tail -1 | python3 -c 'import json,sys; print("%.1f" % json.load(sys.stdin)["images_per_s"])')
  echo "| $1 px | $2 | $o | $t | $(python3 -c "print('%.2fx' % ($o / $t))") |"
done

#!/usr/bin/env bash
# The runtime against what a Python user would run (../shared/bench), side by side in one
# sitting, on the same ONNX files and the same images:
#   1. batch prediction: `footwear predict` (decode + resize + ONNX Runtime over the 900 test
#      photos) against keras_reference.py onnx (ONNX Runtime alone, random input, 10 runs),
#      batch 32, alternating, median of 3 of each;
#   2. HTTP: 32 concurrent clients for 20 s (wrk) against python_ort_server.py, one JPEG per request;
#   3. resident memory of each server after that load.
#   scripts/bench-runtime.sh [RUN_DIR] [VENV]   (RUN_DIR: a 150 px run, as the references' figures are;
#   default runs/footwear150, from `trainer train --image-size 150 --fine-tune-from 13 --out runs/footwear150`)
# Prints a markdown table for docs/benchmarks.md; raw outputs stay in target/bench-runtime/.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/footwear150}
venv=${2:-/tmp/reference-venv}
ref=../shared/bench
out=target/bench-runtime
mkdir -p "$out"
[ -x "$venv/bin/python" ] || ../shared/bench/setup-reference-venv.sh "$venv"
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }
./scripts/setup-onnxruntime.sh >/dev/null
cargo build --quiet --release --workspace --bins
bin=target/release/footwear
export RUST_LOG=warn,footwear=info
# uint8 input (the default file) and float32 input (keras_reference.py feeds float tensors).
target/release/exporter "$run" -o "$out/model.onnx" --no-candle-onnx >/dev/null
target/release/exporter "$run" -o "$out/model-float.onnx" --input-type float32 --no-candle-onnx >/dev/null
images=../shared/data/footwear/test
boots=("$images"/boot/*.jpg)
img=${boots[0]}
json() { python3 -c "import json,sys; print('%.1f' % json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }

# 1. Batch prediction, batch 32. The reference and ours alternate, three rounds; the ratio is the
#    median of the three rounds' ratios (this VM's speed drifts, at times by 25%, within minutes;
#    a round's two runs are a minute apart), the images/s shown the medians of each side.
median3() { sort -n | sed -n 2p; }
cli() { # model file → images/s over the 900 test photos, from the CLI's own log line
  NO_COLOR=1 RUST_LOG=info $bin predict -m "$1" --batch 32 --threads 2 --format csv "$images" 2>&1 >/dev/null \
    | grep -o '([0-9.]* images/s)' | tr -d '(' | awk '{print $1}'
}
py_runs=(); float_runs=(); u8_runs=()
for _ in 1 2 3; do
  py_runs+=("$("$venv/bin/python" $ref/keras_reference.py onnx "$out/model-float.onnx" --batch 32 --runs 10 2>/dev/null | json images_per_s)")
  float_runs+=("$(cli "$out/model-float.onnx")")
  u8_runs+=("$(cli "$out/model.onnx")")
done
py_ips=$(printf '%s\n' "${py_runs[@]}" | median3)
ours_float=$(printf '%s\n' "${float_runs[@]}" | median3)
ours_u8=$(printf '%s\n' "${u8_runs[@]}" | median3)
echo "batch prediction runs (img/s): reference ${py_runs[*]}; ours float32 ${float_runs[*]}; ours uint8 ${u8_runs[*]}" >&2
paired() { # ours... → median over the rounds of ours / reference
  local i; for i in 0 1 2; do python3 -c "print($1 / ${py_runs[$i]})"; shift; done | median3 | xargs printf '%.2fx'
}
float_ratio=$(paired "${float_runs[@]}")
u8_ratio=$(paired "${u8_runs[@]}")

# 2-3. HTTP load and memory.
source scripts/bench-common.sh
post_body "$img"
"$venv/bin/python" $ref/python_ort_server.py "$out/model.onnx" --port 8601 >"$out/python-server.log" 2>&1 &
py=$!
wait_up http://127.0.0.1:8601/healthz
load http://127.0.0.1:8601/predict python
py_rss=$(rss $py)
kill $py; wait $py 2>/dev/null || true
$bin serve -m "$out/model.onnx" --port 8602 --threads 2 --max-batch "${MAX_BATCH:-2}" >"$out/footwear-server.log" 2>&1 &
rs=$!
wait_up http://127.0.0.1:8602/v2/health/ready
load http://127.0.0.1:8602/v1/predict ours
ours_rss=$(rss $rs)
kill -TERM $rs; wait $rs 2>/dev/null || true

read -r py_rps py_p50 py_p99 py_err py_n <<<"$(wrkfig "$out/wrk-python.txt")"
read -r o_rps o_p50 o_p99 o_err o_n <<<"$(wrkfig "$out/wrk-ours.txt")"
ratio() { python3 -c "print('%.2fx' % ($1 / $2))"; }
echo "| what | ours | Python reference | ratio |"
echo "|---|---|---|---|"
echo "| batch prediction, batch 32, float32 file (img/s) | $ours_float | $py_ips | $float_ratio |"
echo "| batch prediction, batch 32, uint8 file (img/s) | $ours_u8 | $py_ips (float32 file) | $u8_ratio |"
echo "| HTTP, 32 clients, 20 s (req/s) | $o_rps | $py_rps | $(ratio "$o_rps" "$py_rps") |"
echo "| HTTP latency p50 / p99 (ms) | $o_p50 / $o_p99 | $py_p50 / $py_p99 | |"
echo "| HTTP requests / errors | $o_n / $o_err | $py_n / $py_err | |"
echo "| server RSS after the load (MiB) | $ours_rss | $py_rss | $(ratio "$ours_rss" "$py_rss") |"

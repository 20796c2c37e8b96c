#!/usr/bin/env bash
# int8 against float32, and ours against onnxruntime's own quantizer, side by side in one
# sitting (docs/benchmarks.md):
#   1. ONNX Runtime img/s of the float32 file, our int8 file and onnxruntime's quantize_static
#      int8 file (../shared/bench/ort_quantize_reference.py, 300 training photos, MinMax),
#      batch 1 and 32, 1 and 2 threads (inference's `throughput` example, median of 3 rounds);
#   2. accuracy, macro-F1 and agreement with the float32 file on a labelled folder;
#   3. HTTP, 32 clients, 20 s (wrk, one JPEG per request): `footwear serve` on the int8 file
#      against python_ort_server.py on the float32 file, then both on the int8 file.
#   scripts/bench-int8.sh RUN_DIR FOLDER [VENV]
#   (RUN_DIR holds model.onnx and model.int8.onnx from the exporter; FOLDER: labelled photos,
#   e.g. the validation split while choosing, the test split for the final figure)
#   As on a CPU without VNNI: scripts/cpu-without-vnni/run.sh scripts/bench-int8.sh RUN_DIR FOLDER
#   (build first: the shim hides AVX-512 from every process, cargo's too)
set -euo pipefail
cd "$(dirname "$0")/.."
run=$1
folder=$2
venv=${3:-/tmp/reference-venv}
ref=../shared/bench
out=target/bench-int8
mkdir -p "$out"
[ -x "$venv/bin/python" ] || ../shared/bench/setup-reference-venv.sh "$venv"
"$venv/bin/python" -c "import onnx, sympy" 2>/dev/null || "$venv/bin/pip" install -q onnx sympy
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }
./scripts/setup-onnxruntime.sh >/dev/null
cargo build --quiet --release -p runtime -p exporter
cargo build --quiet --release -p inference --examples
export ORT_DYLIB_PATH=$PWD/.local/onnxruntime/libonnxruntime.so.1.31.1
float=$run/model.onnx
int8=$run/model.int8.onnx
[ -f "$float" ] || target/release/exporter "$run" --no-candle-onnx
[ -f "$int8" ] || target/release/exporter "$run" --precision int8
train=$(python3 -c "import json,sys; print(json.load(open('$run/model.json'))['dataset'])")/train
ortq=$out/model.ort-int8.onnx
"$venv/bin/python" $ref/ort_quantize_reference.py "$float" "$ortq" --data "$train" --n 300 >&2
lscpu | grep "Model name"
echo "CPU flags: $(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
ls -l "$float" "$int8" "$ortq" | awk '{printf "%s: %.1f MB\n", $NF, $5 / 1e6}'
echo
echo "ONNX Runtime img/s (ratio to float32):"
target/release/examples/throughput "$float" "$int8" "$ortq" --batch 1,32 --threads 1,2 --rounds 3 --seconds 4
echo
echo "On $folder:"
target/release/examples/accuracy "$folder" "$float" "$int8" "$ortq"
echo

source scripts/bench-common.sh
boots=("$folder"/boot/*.jpg)
post_body "${boots[0]}"
bin=target/release/footwear
export RUST_LOG=warn,footwear=info
python_server() { # model name
  "$venv/bin/python" $ref/python_ort_server.py "$1" --port 8601 >"$out/python-$2.log" 2>&1 &
  local pid=$!
  wait_up http://127.0.0.1:8601/healthz
  load http://127.0.0.1:8601/predict "python-$2"
  kill $pid; wait $pid 2>/dev/null || true
}
ours_server() { # model name
  $bin serve -m "$1" --port 8602 --threads 2 >"$out/footwear-$2.log" 2>&1 &
  local pid=$!
  wait_up http://127.0.0.1:8602/v2/health/ready
  load http://127.0.0.1:8602/v1/predict "ours-$2"
  kill -TERM $pid; wait $pid 2>/dev/null || true
}
python_server "$float" float
ours_server "$int8" int8
python_server "$int8" int8
ours_server "$float" float
echo "| server, file | req/s | p50 / p99 (ms) | requests / errors |"
echo "|---|---|---|---|"
for r in "python_ort_server.py, float32:python-float" "footwear serve, int8:ours-int8" \
  "python_ort_server.py, int8:python-int8" "footwear serve, float32:ours-float"; do
  read -r rps p50 p99 err n <<<"$(wrkfig "$out/wrk-${r#*:}.txt")"
  echo "| ${r%%:*} | $rps | $p50 / $p99 | $n / $err |"
done

#!/usr/bin/env bash
# How light the runtime is: the stripped `footwear` binary's size, its shared libraries, and how
# long it takes from launch to an answer: `footwear info` (load the model, print its metadata)
# and `footwear serve` (launch until /v2/health/ready answers 200), median of 5 each; with a
# reference venv (../shared/bench/setup-reference-venv.sh), the Python server's the same way.
#   ./scripts/bench-startup.sh [MODEL.onnx [VENV]]    (default runs/footwear/model.onnx)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-runs/footwear/model.onnx}
venv=${2:-}
bin=target/release/footwear
[ -x "$bin" ] || cargo build --release --workspace --bins
[ -f "$model" ] || { echo "no $model: train and export first (scripts/main.sh)" >&2; exit 1; }
stripped=$(mktemp); trap 'rm -f "$stripped"' EXIT
strip -o "$stripped" "$bin"
echo "binary: $(du -h "$stripped" | cut -f1) stripped ($(du -h "$bin" | cut -f1) with debug info); links: $(ldd "$bin" | awk '{print $1}' | tr '\n' ' ')"
echo "model: $model ($(du -h "$model" | cut -f1))"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for i in 1 2 3 4 5; do
  s=$(date +%s.%N); "$bin" info -m "$model" >/dev/null 2>&1; e=$(date +%s.%N)
  awk "BEGIN {print $e - $s}"
done | median | xargs printf "footwear info (launch, load, print): %.3f s median of 5\n"
port=18677
# time_to_ready URL COMMAND...: seconds from launch until URL answers 200 (median of 5), and
# the server's resident memory then.
time_to_ready() {
  local url=$1; shift
  local rss=$(mktemp)
  for i in 1 2 3 4 5; do
    s=$(date +%s.%N)
    "$@" >/dev/null 2>&1 &
    pid=$!
    until curl -sf -o /dev/null "$url"; do
      kill -0 $pid 2>/dev/null || { echo "$* exited before answering $url" >&2; exit 1; }
      sleep 0.005
    done
    e=$(date +%s.%N)
    awk '/VmRSS/ {print $2}' /proc/$pid/status >>"$rss"
    kill -TERM $pid; wait $pid || true
    awk "BEGIN {print $e - $s}"
  done | median | xargs printf "%.3f s to ready (median of 5), "
  median <"$rss" | awk '{printf "RSS then %.0f MiB\n", $1 / 1024}'
  rm -f "$rss"
}
printf "footwear serve: "
time_to_ready "http://127.0.0.1:$port/v2/health/ready" "$bin" serve -m "$model" --port $port
if [ -n "$venv" ]; then
  printf "python_ort_server.py: "
  time_to_ready "http://127.0.0.1:$port/healthz" "$venv/bin/python" ../shared/bench/python_ort_server.py "$model" --port $port
fi

#!/usr/bin/env bash
# Requests/s and p50/p99 of `footwear serve` per protocol on one model file and one photo, 32
# clients for 20 s each (docs/benchmarks.md): KServe v2 over HTTP with JSON tensors, with binary
# tensors, over gRPC (NVIDIA's tritonclient, scripts/bench-protocols.py), and /v1/predict with
# the JPEG. The clients run on the same machine as the server.
#   scripts/bench-protocols.sh MODEL.onnx PHOTO.jpg
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1
photo=$2
out=target/bench-protocols
mkdir -p "$out"
./scripts/setup-onnxruntime.sh >/dev/null
./scripts/setup-python-clients.sh
py=.local/clients-venv/bin/python
$py -c "import PIL" 2>/dev/null || .local/clients-venv/bin/pip install --quiet pillow
cargo build --quiet --release -p runtime
lscpu | grep "Model name"
echo "CPU flags: $(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
info=$(target/release/footwear info -m "$model" 2>/dev/null)
name=$(echo "$info" | python3 -c "import json,sys; print(json.load(sys.stdin)['name'])")
size=$(echo "$info" | python3 -c "import json,sys; print(json.load(sys.stdin)['input_size'])")
target/release/footwear serve -m "$model" --port 18080 --grpc-port 18081 2>"$out/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18080/v2/health/ready >/dev/null && break; sleep 0.2; done
echo "model $model ($name, $size px), photo $photo, 32 clients x 20 s per protocol"
$py scripts/bench-protocols.py --http 127.0.0.1:18080 --grpc 127.0.0.1:18081 --model "$name" --size "$size" \
  --photo "$photo" --clients 32 --seconds 20

#!/usr/bin/env bash
# The main job on defaults, the whole chain:
#   1. install the system packages it needs (scripts/setup-system.sh), fetch the ImageNet
#      weights and ONNX Runtime (once, cached in weights/ and .local/),
#   2. fine-tune Xception on the footwear photos (trainer; by default the 13,200 photos of
#      ../shared/data/footwear-15k, 40 minutes on 2 Zen 5 EPYC cores, about 52 on older ones,
#      52.5 on 2 Intel Xeon cores (session 15):
#      docs/training.md),
#   3. export the run to a verified model.onnx (float32) and model.int8.onnx (int8, for CPUs), check
#      their test accuracy through ONNX Runtime, on the whole test split and, with the trainer,
#      on its later photos (numbered above 2000) alone,
#   4. predict a few test photos with the runtime binary, and say how to start the server.
# Extra arguments go to `trainer train` (see `target/release/trainer train --help`).
#   ./scripts/main.sh [--data DIR] [--out DIR] [...]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-system.sh main
./scripts/fetch-weights.sh
./scripts/setup-onnxruntime.sh
cargo build --quiet --release -p trainer -p exporter -p runtime
out=runs/footwear
data=../shared/data/footwear-15k
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out) out=${args[i + 1]} ;;
    --out=*) out=${args[i]#--out=} ;;
    --data) data=${args[i + 1]} ;;
    --data=*) data=${args[i]#--data=} ;;
  esac
done
target/release/trainer train "$@"
target/release/exporter "$out" --eval "$data/test"
# The int8 file for CPUs: calibrated on 300 training photos, verified against the float file on
# the test photos (it is not written if it fails).
echo
target/release/exporter "$out" --precision int8 --eval "$data/test" ||
  echo "(no int8 file: its verification failed, see above; ship $out/model.onnx)"
# The photos numbered above 2000 (footwear-15k's "later" ones), if the test split has any.
later='_(200[1-9]|20[1-9][0-9]|2[1-9][0-9]{2}|[3-9][0-9]{3})\.jpg$'
if find "$data/test" -type f | grep -qE "$later"; then
  echo
  target/release/trainer eval "$out" "$data/test" --only "$later"
fi
echo
shopt -s nullglob
samples=()
for class in "$data"/test/*/; do
  files=("$class"*)
  samples+=("${files[@]:0:2}")
done
target/release/footwear predict -m "$out/model.onnx" "${samples[@]}"
echo
echo "Which file to ship:"
echo "  $out/model.int8.onnx  on CPUs: 1.9-2.7x the speed of the float file with VNNI, 1.4-1.6x without,"
echo "                        1/4 of its size, the same answer on >= 99.5% of the test photos"
echo "                        (see $out/model.int8.verification.json)"
echo "  $out/model.onnx       on GPUs (--device cuda), or where every last 0.1 point of accuracy counts"
echo
echo "Serve it:  target/release/footwear serve -m $out/model.int8.onnx   # then open http://127.0.0.1:8080/"

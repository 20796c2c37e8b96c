#!/usr/bin/env bash
# The main job on defaults, the whole chain:
#   1. install the system packages it needs (scripts/setup-system.sh), fetch the ImageNet
#      weights and ONNX Runtime (once, cached in weights/ and .local/),
#   2. fine-tune Xception on the footwear photos (trainer; by default the 13,200 photos of
#      ../shared/data/footwear-15k, about 50 minutes on 2 cores: docs/training.md),
#   3. export the run to one verified model.onnx, and check its test accuracy through ONNX Runtime,
#      on the whole test split and on its later photos (numbered above 2000) alone,
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
echo "Serve it:  target/release/footwear serve -m $out/model.onnx   # then open http://127.0.0.1:8080/"

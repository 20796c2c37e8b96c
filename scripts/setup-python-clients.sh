#!/usr/bin/env bash
# The real clients the tests drive the server with, in a venv under .local/ (git-ignored), from
# PyPI, once: NVIDIA's tritonclient (HTTP and gRPC) and openapi-spec-validator (checks
# /openapi.json). Needs python3-venv (scripts/setup-system.sh test installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.local/clients-venv
want="tritonclient[http,grpc]==2.73.0 openapi-spec-validator==0.7.2"
stamp="$venv/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet --disable-pip-version-check $want
echo "$want" >"$stamp"

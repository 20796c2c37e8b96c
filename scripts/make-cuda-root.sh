#!/usr/bin/env bash
# (From ../shared/cuda, where it was seen to work on 2026-11-28.)
# Builds a CUDA 13.0 root that is enough to COMPILE (not run) Candle's `cuda`/`cudnn` features on a
# machine without a GPU: the real nvcc, headers and cudart from PyPI, plus link-only stub libraries
# (libcuda, cublas, cublasLt, curand, nvrtc, cudnn) whose every function returns an error code.
#
#   make-cuda-root.sh ROOT [VENV]      # then:
#   export CUDA_HOME=ROOT CUDA_COMPUTE_CAP=90 PATH=ROOT/bin:$PATH
#   cargo build --features cuda        # (run `cargo fetch` before this script: it reads cudarc)
#   LD_LIBRARY_PATH=ROOT/lib64/stubs:ROOT/lib64 ./binary   # starts; CUDA calls fail cleanly
#
# Never put these stubs on LD_LIBRARY_PATH of a machine with a real GPU and driver (>= 580 for
# kernels built by CUDA 13.0): there, install the real libraries (cuda-toolkit wheels with
# cublas/curand/nvrtc, nvidia-cudnn-cu13) instead.
set -euo pipefail
R=${1:?usage: make-cuda-root.sh ROOT [VENV]}
VENV=${2:-$R.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "cuda-toolkit[nvcc,crt,nvvm,cudart,cccl]==13.0.2"
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-* 2>/dev/null | sort -V | tail -1)
[ -n "$CUDARC" ] || { echo "no cudarc sources: run 'cargo fetch' in the workspace first" >&2; exit 1; }
C=$("$VENV/bin/python" -c 'import nvidia,os;print(os.path.join(nvidia.__path__[0],"cu13"))')
rm -rf "$R"; mkdir -p "$R/lib64/stubs" "$R/stubsrc"
for d in bin include nvvm; do ln -s "$C/$d" "$R/$d"; done
ln -s lib64 "$R/lib"
for f in "$C"/lib/*; do
  b=$(basename "$f"); ln -s "$f" "$R/lib64/$b"
  case $b in *.so.*) u=${b%%.so.*}.so; [ -e "$R/lib64/$u" ] || ln -s "$f" "$R/lib64/$u";; esac
done
stub() { # cudarc-module library soname directory
  grep -ohP '^\s*fn \K\w+(?=\()' "$CUDARC/src/$1/sys/mod.rs" | sort -u |
    sed 's/.*/int &(void){return 100;}/' > "$R/stubsrc/$2.c"
  gcc -shared -fPIC -Wl,-soname,"$3" -o "$4/$2.so" "$R/stubsrc/$2.c"
  ln -sf "$2.so" "$4/$3"
}
stub driver   libcuda     libcuda.so.1      "$R/lib64/stubs"
stub cublas   libcublas   libcublas.so.13   "$R/lib64"
stub cublaslt libcublasLt libcublasLt.so.13 "$R/lib64"
stub curand   libcurand   libcurand.so.10   "$R/lib64"
stub nvrtc    libnvrtc    libnvrtc.so.13    "$R/lib64"
stub cudnn    libcudnn    libcudnn.so.9     "$R/lib64"
echo "CUDA compile root ready at $R"

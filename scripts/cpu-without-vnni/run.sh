#!/usr/bin/env bash
# Runs a command as on an AVX2-only CPU (no AVX-512, no VNNI, no AMX): see cpuid_mask.c.
#   scripts/cpu-without-vnni/run.sh COMMAND [ARGS...]
# Prints what CPUID says without and with the mask first, on stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/../../target/cpu-without-vnni
mkdir -p "$out"
grep -q -w cpuid_fault /proc/cpuinfo || { echo "this CPU (or hypervisor) has no CPUID faulting (cpuid_fault)" >&2; exit 1; }
[ "$out/libcpuid_mask.so" -nt "$here/cpuid_mask.c" ] ||
  cc -O2 -Wall -Wextra -shared -fPIC -o "$out/libcpuid_mask.so" "$here/cpuid_mask.c" -ldl
[ "$out/probe" -nt "$here/probe.c" ] || cc -O2 -Wall -o "$out/probe" "$here/probe.c"
echo "CPUID as this machine has it:   $("$out/probe")" >&2
echo "CPUID as the command sees it:   $(LD_PRELOAD="$out/libcpuid_mask.so" "$out/probe")" >&2
export LD_PRELOAD="$out/libcpuid_mask.so${LD_PRELOAD:+:$LD_PRELOAD}"
exec "$@"

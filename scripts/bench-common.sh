# Shared by the benchmark scripts (sourced): wrk load, server start-up, memory, wrk figures.
# Needs $out (the output folder).

post_body() { # image → $out/post.lua, a wrk script POSTing it as the body
  cat > "$out/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/jpeg"
local f = io.open("$1", "rb"); wrk.body = f:read("*all"); f:close()
LUA
}
wait_up() { for _ in $(seq 1 100); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "no server at $1" >&2; return 1; }
load() { # url name → wrk output in $out/wrk-name.txt
  # A 10 s client timeout: at 2 s (wrk's default) 32 clients of a server doing 13 req/s time out
  # (2.5 s in the queue) and their latencies drop out of the percentiles.
  wrk -t2 -c32 -d20s --timeout 10s --latency -s "$out/post.lua" "$1" > "$out/wrk-$2.txt"
}
rss() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
wrkfig() { # file → "req/s p50 p99 errors requests"
  python3 - "$1" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def ms(label):
    m = re.search(r"^\s*%s\s+([\d.]+)(us|ms|s)\s*$" % label, t, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
n = int(re.search(r"(\d+) requests in", t).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
print(f"{rps:.1f} {ms('50%'):.0f} {ms('99%'):.0f} {errors} {n}")
PY
}

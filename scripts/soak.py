#!/usr/bin/env python3
"""Soak test of `footwear serve` (run by scripts/soak.sh): the real server under a memory cap for
DURATION seconds with steady good traffic, every bad input, bombs, slow clients, an overload phase
and SIGTERM under load, its resident memory sampled every second.

Asserts: zero failed good requests (200, or 503 `overloaded` when shed at the door: a shed
request was never admitted), health answering within 1 s throughout, resident memory flat (the
median level of each window after the first within 10% of the second's: the bombs' transient
peaks come and go with them) and its peak under the bound the server computes from its settings
(`footwear_memory_bound_bytes` + what it held once loaded), exit 0 after SIGTERM.
Only loopback traffic, bounded in count and time. Python standard library only.
"""

import argparse
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib


def crc_chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png(w, h, extra=b""):
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    raw = zlib.compressobj(9)
    row = b"\0" * (w * 3 + 1)
    data = b"".join(raw.compress(row) for _ in range(min(h, 2000))) + raw.flush()
    return b"\x89PNG\r\n\x1a\n" + crc_chunk(b"IHDR", ihdr) + extra + crc_chunk(b"IDAT", data) + crc_chunk(b"IEND", b"")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.failures = []

    def add(self, what, status, code=None):
        with self.lock:
            key = f"{what} {status}{' ' + code if code else ''}"
            self.counts[key] = self.counts.get(key, 0) + 1

    def fail(self, msg):
        with self.lock:
            self.failures.append(msg)


def request(port, method, path, body=None, headers=None, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, data
    finally:
        c.close()


def code_of(data):
    try:
        return json.loads(data).get("code")
    except ValueError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--photos", required=True, help="a folder of JPEG photos")
    ap.add_argument("--duration", type=int, default=300)
    ap.add_argument("--out", default="target/soak")
    ap.add_argument("extra", nargs="*", help="extra `footwear serve` flags")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    photos = []
    for root, _, files in os.walk(a.photos):
        photos += [os.path.join(root, f) for f in sorted(files) if f.endswith(".jpg")]
    photos = [open(p, "rb").read() for p in photos[:64]]
    assert photos, f"no photos in {a.photos}"

    log = open(os.path.join(a.out, "server.log"), "w")
    server = subprocess.Popen(
        [a.bin, "serve", "--port", "0", "--grpc-port", "0", "-m", a.model, *a.extra],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1", "RUST_LOG": "info"},
    )
    port = None
    for line in server.stderr:
        log.write(line)
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    assert port, "the server did not start"
    threading.Thread(target=lambda: [log.write(l) for l in server.stderr], daemon=True).start()
    loaded = rss_mib(server.pid)
    metrics = request(port, "GET", "/metrics")[1].decode()
    bound = int(float(re.search(r"^footwear_memory_bound_bytes (\S+)", metrics, re.M).group(1))) / 2**20
    cap = loaded + bound + 64
    capped = "no cap (cgroup not writable)"
    for base, limit_file in (("/sys/fs/cgroup", "memory.max"), ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")):
        group = os.path.join(base, f"footwear-soak-{os.getpid()}")
        try:
            os.makedirs(group, exist_ok=True)
            # A real cgroup folder comes with its control files; anything else is not a cap.
            if not os.path.exists(os.path.join(group, limit_file)):
                os.rmdir(group)
                continue
            with open(os.path.join(group, limit_file), "w") as f:
                f.write(str(int(cap * 2**20)))
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
                f.write(str(server.pid))
            capped = f"cgroup {group} {limit_file} = {cap:.0f} MiB"
            break
        except OSError:
            continue
    print(f"soak: server pid {server.pid} port {port}; {loaded:.0f} MiB loaded, bound {bound:.0f} MiB; {capped}",
          flush=True)

    stats = Stats()
    stop = threading.Event()
    overload = threading.Event()
    # After SIGTERM the server stops accepting: a connection refused then was never admitted.
    terminating = threading.Event()
    samples = []
    health_worst = [0.0]
    start = time.time()

    def good(i):
        n = i
        while not stop.is_set():
            body = photos[n % len(photos)]
            n += 1
            try:
                s, data = request(port, "POST", "/v1/predict", body, {"Content-Type": "image/jpeg"})
            except OSError as e:
                if terminating.is_set():
                    stats.add("good", "not accepted after SIGTERM")
                    time.sleep(0.1)
                else:
                    stats.fail(f"good request: {e}")
                continue
            c = code_of(data) if s != 200 else None
            stats.add("good", s, c)
            if s != 200 and not (s == 503 and c == "overloaded"):
                stats.fail(f"good request: {s} {data[:200]!r}")

    bad_inputs = [
        ("not an image", b"hello", "image/jpeg", 422),
        ("truncated JPEG", photos[0][: len(photos[0]) // 2], "image/jpeg", 422),
        ("40,000,000 x 1 PNG", png(40_000_000, 1), "image/png", 413),
        ("2 MiB ICC profile", png(8, 8, crc_chunk(b"iCCP", b"p\0\0" + b"\7" * (2 << 20))), "image/png", 413),
        ("ICC bomb", png(8, 8, crc_chunk(b"iCCP", b"p\0\0" + zlib.compress(b"\0" * (256 << 20), 9))), "image/png", 200),
        ("wrong type", b"{}", "text/plain", 415),
        ("JSON without an image", b"{}", "application/json", 400),
        ("JSON, bad base64", b'{"image": "not base64!"}', "application/json", 400),
    ]
    deep = ('{"inputs": ' + "[" * 50_000 + "]" * 50_000 + "}").encode()

    def bad():
        k = 0
        while not stop.is_set():
            what, body, ctype, want = bad_inputs[k % len(bad_inputs)]
            k += 1
            try:
                s, data = request(port, "POST", "/v1/predict", body, {"Content-Type": ctype})
                if s not in (want, 503):
                    stats.fail(f"{what}: {s} (expected {want}) {data[:200]!r}")
                stats.add(what, s, code_of(data))
                s, data = request(port, "POST", "/v2/models/kitchenware/infer", deep, {"Content-Type": "application/json"})
                stats.add("deep JSON", s, code_of(data))
            except OSError as e:
                if not terminating.is_set():
                    stats.fail(f"{what}: {e}")
            time.sleep(0.2)

    def slow():
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
                s.sendall(b"\0" * 1000)
                status = s.recv(64).split(b"\r\n")[0].decode(errors="replace")
                stats.add("slow body", status)
                s.close()
            except OSError as e:
                stats.add("slow body", type(e).__name__)
            time.sleep(1)

    def flood():
        while not stop.is_set():
            if not overload.is_set():
                time.sleep(0.2)
                continue
            try:
                s, data = request(port, "POST", "/v1/predict", photos[1], {"Content-Type": "image/jpeg"})
                stats.add("flood", s, code_of(data) if s != 200 else None)
            except OSError:
                pass

    def health():
        while not stop.is_set():
            t = time.time()
            try:
                s, _ = request(port, "GET", "/v2/health/ready", timeout=5)
                dt = time.time() - t
                health_worst[0] = max(health_worst[0], dt)
                if (s != 200 or dt > 1.0) and not terminating.is_set():
                    stats.fail(f"health: {s} in {dt:.2f} s")
            except OSError as e:
                if not terminating.is_set():
                    stats.fail(f"health: {e}")
            time.sleep(0.5)

    def sample():
        while not stop.is_set() and server.poll() is None:
            samples.append((time.time() - start, rss_mib(server.pid)))
            time.sleep(1)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=f) for f in (bad, slow, health, sample)]
    threads += [threading.Thread(target=flood) for _ in range(48)]
    for t in threads:
        t.start()
    # Overload during the middle third.
    time.sleep(a.duration / 3)
    overload.set()
    time.sleep(a.duration / 3)
    overload.clear()
    time.sleep(a.duration / 3)
    # SIGTERM under load: the server must finish what it admitted and exit 0.
    terminating.set()
    server.send_signal(signal.SIGTERM)
    try:
        rc = server.wait(timeout=90)
    except subprocess.TimeoutExpired:
        server.kill()
        rc = "killed after 90 s"
    stop.set()
    for t in threads:
        t.join(timeout=70)

    # Memory: the level between the bombs' transient peaks (each window's median) must not grow
    # (a leak would raise it window after window); the peak must stay under the bound. The first
    # window is warm-up, the samples after SIGTERM are the shutdown.
    windows = 4
    span = a.duration / windows
    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else 0
    levels = [median([m for t, m in samples if w * span <= t < (w + 1) * span]) for w in range(windows)]
    peaks = [max((m for t, m in samples if w * span <= t < (w + 1) * span), default=0) for w in range(windows)]
    peak = max((m for _, m in samples), default=0)
    growth = max(levels[w] / levels[1] - 1 for w in range(2, windows)) if levels[1] else 0
    print(f"soak: {a.duration} s, {len(samples)} memory samples; RSS median by window {[round(x) for x in levels]} MiB,"
          f" peaks {[round(x) for x in peaks]} MiB, overall peak {peak:.0f} MiB (bound {loaded + bound:.0f});"
          f" level growth after warm-up {100 * growth:.1f}%; worst health {health_worst[0]:.3f} s; exit {rc}")
    for k in sorted(stats.counts):
        print(f"  {k}: {stats.counts[k]}")
    with open(os.path.join(a.out, "memory.csv"), "w") as f:
        f.write("seconds,rss_mib\n" + "".join(f"{t:.1f},{m:.1f}\n" for t, m in samples))
    for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/memory"):
        try:
            os.rmdir(os.path.join(base, f"footwear-soak-{os.getpid()}"))
        except OSError:
            pass
    problems = list(stats.failures[:20])
    if rc != 0:
        problems.append(f"exit status {rc} after SIGTERM")
    if growth > 0.10:
        problems.append(f"resident memory level grew {100 * growth:.1f}% between windows")
    if peak > loaded + bound:
        problems.append(f"peak {peak:.0f} MiB over the bound {loaded + bound:.0f} MiB")
    if not any(k.startswith("flood 503") for k in stats.counts):
        problems.append("the overload phase shed nothing (no 503)")
    if problems:
        print("soak: FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    print("soak: passed")


if __name__ == "__main__":
    main()

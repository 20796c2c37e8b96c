"""Requests/s and latency of `footwear serve` through each protocol, with the same photo and
the same 32 concurrent clients (threads, one connection each), NVIDIA's tritonclient as the
client: HTTP with JSON tensors, HTTP with binary tensors, gRPC; and /v1/predict with the JPEG.

    python bench-protocols.py --http HOST:PORT --grpc HOST:PORT --model NAME --size S \
        --photo PHOTO.jpg [--clients 32] [--seconds 20]

Prints one line per protocol: req/s, p50, p99 (ms), errors, requests.
"""

import argparse
import threading
import time
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument("--http", required=True)
p.add_argument("--grpc", required=True)
p.add_argument("--model", required=True)
p.add_argument("--size", type=int, required=True)
p.add_argument("--photo", required=True)
p.add_argument("--clients", type=int, default=32)
p.add_argument("--seconds", type=float, default=20)
a = p.parse_args()

img = Image.open(a.photo).convert("RGB").resize((a.size, a.size), Image.BILINEAR)
x = np.asarray(img, dtype=np.uint8)[None]
jpeg = open(a.photo, "rb").read()


def http_call(binary):
    c = httpclient.InferenceServerClient(url=a.http, network_timeout=120, connection_timeout=120)

    def call():
        i = httpclient.InferInput("image", list(x.shape), "UINT8")
        i.set_data_from_numpy(x, binary_data=binary)
        c.infer(a.model, [i], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)])

    return call


def grpc_call():
    c = grpcclient.InferenceServerClient(url=a.grpc)

    def call():
        i = grpcclient.InferInput("image", list(x.shape), "UINT8")
        i.set_data_from_numpy(x)
        c.infer(a.model, [i], outputs=[grpcclient.InferRequestedOutput("probabilities")], client_timeout=120)

    return call


def v1_call():
    def call():
        r = urllib.request.Request(
            "http://%s/v1/predict" % a.http, data=jpeg, headers={"Content-Type": "image/jpeg"}, method="POST"
        )
        with urllib.request.urlopen(r, timeout=120) as resp:
            resp.read()

    return call


def run(name, make):
    # Each thread makes its own client (tritonclient.http's gevent clients stay on the thread
    # that made them), warms it with one call, then all start together.
    lat, errors, lock, first_error = [], [0], threading.Lock(), []
    ready = threading.Barrier(a.clients + 1)
    deadline = [0.0]

    def worker():
        call = make()
        call()
        ready.wait()
        while time.monotonic() < deadline[0]:
            t0 = time.monotonic()
            try:
                call()
                dt = time.monotonic() - t0
                with lock:
                    lat.append(dt)
            except Exception as e:
                with lock:
                    errors[0] += 1
                    first_error[:1] = first_error[:1] or [repr(e)[:300]]

    threads = [threading.Thread(target=worker) for _ in range(a.clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + 3600
    ready.wait()
    t0 = time.monotonic()
    deadline[0] = t0 + a.seconds
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    lat.sort()
    q = lambda f: 1e3 * lat[min(len(lat) - 1, int(f * len(lat)))] if lat else float("nan")
    print("%-22s %7.1f req/s  p50 %5.0f ms  p99 %5.0f ms  errors %d  requests %d"
          % (name, len(lat) / wall, q(0.5), q(0.99), errors[0], len(lat)), flush=True)
    if first_error:
        print("  first error:", first_error[0], flush=True)


run("v2 HTTP, JSON tensors", lambda: http_call(False))
run("v2 HTTP, binary tensors", lambda: http_call(True))
run("v2 gRPC, raw contents", grpc_call)
run("v1 HTTP, JPEG body", v1_call)

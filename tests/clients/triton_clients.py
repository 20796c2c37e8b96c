"""Drives `footwear serve` with NVIDIA's own Python clients (tritonclient, HTTP and gRPC) and
writes what they saw as JSON, for tests/clients.rs to check.

    python triton_clients.py --http 127.0.0.1:8080 --grpc 127.0.0.1:8081 --model NAME \
        --pixels images.u8 --n N --size S --out seen.json

`images.u8`: N decoded, resized photos, uint8 [N, S, S, 3], as the Rust test prepared them.
"""

import argparse
import json

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

p = argparse.ArgumentParser()
p.add_argument("--http", required=True)
p.add_argument("--grpc", required=True)
p.add_argument("--model", required=True)
p.add_argument("--pixels", required=True)
p.add_argument("--n", type=int, required=True)
p.add_argument("--size", type=int, required=True)
p.add_argument("--out", required=True)
a = p.parse_args()

x = np.fromfile(a.pixels, dtype=np.uint8).reshape(a.n, a.size, a.size, 3)
seen = {}

# HTTP
h = httpclient.InferenceServerClient(url=a.http)
seen["http_live"] = h.is_server_live()
seen["http_ready"] = h.is_server_ready()
seen["http_model_ready"] = h.is_model_ready(a.model)
seen["http_server_metadata"] = h.get_server_metadata()
seen["http_model_metadata"] = h.get_model_metadata(a.model)
seen["http_model_config"] = h.get_model_config(a.model)
seen["http_index"] = h.get_model_repository_index()
for binary in (True, False):
    inp = httpclient.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    r = h.infer(a.model, [inp], outputs=out, request_id="r-%s" % binary)
    key = "http_binary" if binary else "http_json"
    seen[key] = r.as_numpy("probabilities").tolist()
    seen[key + "_response"] = {k: v for k, v in r.get_response().items() if k != "outputs"}
# The client's defaults: binary input, every output, binary outputs.
inp = httpclient.InferInput("image", list(x.shape), "UINT8")
inp.set_data_from_numpy(x)
r = h.infer(a.model, [inp])
seen["http_default_probabilities"] = r.as_numpy("probabilities").tolist()
seen["http_default_logits"] = r.as_numpy("logits").tolist()
# The out-of-distribution score, in files that have it: one value per image.
ood = r.as_numpy("ood_score")
seen["http_default_ood_score"] = None if ood is None else ood.tolist()
bad = httpclient.InferInput("image", [1, 7, 7, 3], "UINT8")
bad.set_data_from_numpy(np.zeros((1, 7, 7, 3), dtype=np.uint8))
try:
    h.infer(a.model, [bad])
    seen["http_bad_shape_error"] = None
except InferenceServerException as e:
    seen["http_bad_shape_error"] = str(e)
seen["http_stats"] = h.get_inference_statistics(a.model)

# gRPC
g = grpcclient.InferenceServerClient(url=a.grpc)
seen["grpc_live"] = g.is_server_live()
seen["grpc_ready"] = g.is_server_ready()
seen["grpc_model_ready"] = g.is_model_ready(a.model)
seen["grpc_server_metadata"] = g.get_server_metadata(as_json=True)
seen["grpc_model_metadata"] = g.get_model_metadata(a.model, as_json=True)
gi = grpcclient.InferInput("image", list(x.shape), "UINT8")
gi.set_data_from_numpy(x)
r = g.infer(a.model, [gi], outputs=[grpcclient.InferRequestedOutput("probabilities")], request_id="g-1")
seen["grpc"] = r.as_numpy("probabilities").tolist()
seen["grpc_response"] = {k: v for k, v in r.get_response(as_json=True).items() if k not in ("outputs", "raw_output_contents")}
r = g.infer(a.model, [gi])
seen["grpc_default_logits"] = r.as_numpy("logits").tolist()
ood = r.as_numpy("ood_score")
seen["grpc_default_ood_score"] = None if ood is None else ood.tolist()
bad = grpcclient.InferInput("image", [1, 7, 7, 3], "UINT8")
bad.set_data_from_numpy(np.zeros((1, 7, 7, 3), dtype=np.uint8))
try:
    g.infer(a.model, [bad])
    seen["grpc_bad_shape_error"] = None
except InferenceServerException as e:
    seen["grpc_bad_shape_error"] = str(e)
# Typed contents (uint_contents) instead of raw bytes, through the client's own generated stubs.
import grpc as grpclib
from tritonclient.grpc import service_pb2, service_pb2_grpc

stub = service_pb2_grpc.GRPCInferenceServiceStub(grpclib.insecure_channel(a.grpc))
req = service_pb2.ModelInferRequest(model_name=a.model)
t = req.inputs.add()
t.name, t.datatype = "image", "UINT8"
t.shape.extend(x.shape)
t.contents.uint_contents.extend(x.flatten().tolist())
resp = stub.ModelInfer(req)
seen["grpc_typed_outputs"] = [o.name for o in resp.outputs]
i = seen["grpc_typed_outputs"].index("probabilities")
seen["grpc_typed"] = np.frombuffer(resp.raw_output_contents[i], dtype="<f4").reshape(a.n, -1).tolist()
seen["grpc_stats"] = g.get_inference_statistics(a.model, as_json=True)
seen["grpc_index"] = g.get_model_repository_index(as_json=True)

with open(a.out, "w") as f:
    json.dump(seen, f)

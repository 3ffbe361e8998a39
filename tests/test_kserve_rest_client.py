"""KServe's own REST client (``kserve.InferenceRESTClient``, v1 = TF Serving REST and v2 =
Open Inference Protocol) against the HTTP port: results bit-identical to the in-process
Predictor.  Run in a separate process: the kserve SDK registers the v2 messages in protobuf's
default pool, where they clash with tritonclient's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from bfpaccel.runtime.predictor import Predictor
from bfpaccel.serve import serve
from bfpaccel.serve.testing import TINY_OUTPUT, build_tiny_plan, make_image

CLIENT = r'''
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

port, xpath, imgpath = int(sys.argv[1]), sys.argv[2], sys.argv[3]
x = np.load(xpath)
img = open(imgpath, "rb").read()
base = f"http://127.0.0.1:{port}"


def hexed(a):
    a = np.asarray(a, dtype="<f4")
    return [list(a.shape), a.tobytes().hex()]


async def main():
    out = {}
    c = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60, retries=0))
    inp = InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    r = await c.infer(base, InferRequest(model_name="tiny", infer_inputs=[inp], request_id="r-1"), model_name="tiny")
    out["v2_id"] = r.id
    out["v2"] = {o.name: hexed(o.as_numpy()) for o in r.outputs}
    inp = InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([img], dtype=np.object_), binary_data=True)
    r = await c.infer(base, InferRequest(model_name="tiny", infer_inputs=[inp]), model_name="tiny")
    out["v2_images"] = {o.name: hexed(o.as_numpy()) for o in r.outputs}
    try:
        await c.infer(base, InferRequest(model_name="nope", infer_inputs=[inp]), model_name="nope")
        out["v2_error"] = None
    except Exception as e:
        out["v2_error"] = str(getattr(getattr(e, "response", None), "status_code", e))
    await c.close()
    c = InferenceRESTClient(RESTConfig(protocol="v1", timeout=60, retries=0))
    r = await c.infer(base, {"instances": x.tolist()}, model_name="tiny")
    out["v1"] = hexed(np.array(r["predictions"], dtype=np.float32))
    await c.close()
    print(json.dumps(out))


asyncio.run(main())
'''


def _arr(entry):
    shape, hx = entry
    return np.frombuffer(bytes.fromhex(hx), dtype="<f4").reshape(shape)


def test_kserve_rest_client_v1_and_v2(tmp_path):
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("the kserve SDK is not installed (.ci/run installs it)")
    plan = build_tiny_plan(str(tmp_path / "tiny.bfpplan"))
    pred = Predictor(plan)
    x = np.random.default_rng(3).random((2, 224, 224, 3)).astype(np.float32) * 255
    img = make_image()
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "img.jpg").write_bytes(img)
    (tmp_path / "client.py").write_text(CLIENT)
    with serve({"tiny": plan}, port=0, http_port=0) as h:
        p = subprocess.run([sys.executable, str(tmp_path / "client.py"), str(h.http_port), str(tmp_path / "x.npy"),
                            str(tmp_path / "img.jpg")], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    want = pred.predict(x)[TINY_OUTPUT]
    want_img = pred.predict(pred.preprocess([img]))[TINY_OUTPUT]
    assert out["v2_id"] == "r-1" and list(out["v2"]) == [TINY_OUTPUT]
    np.testing.assert_array_equal(_arr(out["v2"][TINY_OUTPUT]).view(np.uint32), want.view(np.uint32))
    got_img = _arr(next(iter(out["v2_images"].values())))
    np.testing.assert_array_equal(got_img.reshape(want_img.shape).view(np.uint32), want_img.view(np.uint32))
    np.testing.assert_array_equal(_arr(out["v1"]).view(np.uint32), want.view(np.uint32))
    assert out["v2_error"] == "404"

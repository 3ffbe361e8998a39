"""The protocol-neutral serving core: resolution, readiness, auth, errors, unload races."""

from __future__ import annotations

import numpy as np
import pytest

from bfpaccel.serve.core import Code, ServingCore, ServingError, VersionState, check_array
from bfpaccel.serve.testing import build_tiny_plan


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    return build_tiny_plan(str(tmp_path_factory.mktemp("core") / "tiny.bfpplan"))


def _x(n=1):
    return np.random.default_rng(0).random((n, 224, 224, 3)).astype(np.float32)


def test_resolution_versions_labels_and_errors(plan_path):
    core = ServingCore(workers=1)
    core.add_version("m", 1, plan_path)
    core.add_version("m", 2, plan_path)
    with pytest.raises(ServingError) as e:
        core.resolve("m")
    assert e.value.code is Code.UNAVAILABLE  # nothing loaded yet
    core.load_all()
    assert core.resolve("m").version == 2 and core.resolve(None).version == 2
    assert core.resolve("m", 1).version == 1
    core.set_labels("m", {"canary": 1})
    assert core.resolve("m", label="canary").version == 1
    for args, code in ((("nope",), Code.NOT_FOUND), (("m", 9), Code.NOT_FOUND)):
        with pytest.raises(ServingError) as e:
            core.resolve(*args)
        assert e.value.code is code and e.value.message
    with pytest.raises(ServingError) as e:
        core.resolve("m", label="prod")
    assert e.value.code is Code.NOT_FOUND and "canary" in e.value.message
    assert core.is_ready() and core.model_ready("m", 1) and not core.model_ready("m", 5)
    assert Code.NOT_FOUND.http_status == 404 and Code.TOO_LARGE.grpc_name == "RESOURCE_EXHAUSTED"


def test_infer_on_an_unloaded_version_fails_fast_instead_of_hanging(plan_path):
    core = ServingCore(workers=1)
    core.load_version("m", 1, plan_path)
    core.ready.set()
    mv = core.resolve("m")  # a request resolved its version...
    core.unload_version("m", 1, drain_timeout_s=1)  # ...then the version was retired
    assert mv.state is VersionState.END
    with pytest.raises(ServingError) as e:
        core.infer(mv, x=_x(), timeout_s=None)  # would wait forever on an empty worker queue
    assert e.value.code is Code.UNAVAILABLE and "unloaded" in e.value.message
    assert mv.inflight == 0 and core.waiting == 0


def test_auth_and_queue_limits(plan_path):
    core = ServingCore(auth_keys=["k1"], workers=1, queue_size=0)
    for header in (None, "", "Bearer nope"):
        with pytest.raises(ServingError) as e:
            core.check_auth(header)
        assert e.value.code is Code.UNAUTHENTICATED
    for header in ("Bearer k1", "bearer k1", "k1"):
        core.check_auth(header)
    core.load_version("m", 1, plan_path)
    core.ready.set()
    with pytest.raises(ServingError) as e:  # queue_size 0: no request may wait
        core.infer(core.resolve("m"), x=_x())
    assert e.value.code is Code.RESOURCE_EXHAUSTED


def test_check_array_rejects_before_allocating():
    check_array("x", [2, 3], [None, 3], 4, 100)
    for shape, words in (([2, 4], "expects"), ([5, 3], "batch 5"), ([0, 3], "empty"), ([-1, 3], "negative"),
                         ([2, 10 ** 30], "expects")):
        with pytest.raises(ServingError, match=words):
            check_array("x", shape, [None, 3], 4, 100)
    with pytest.raises(ServingError, match="limit of 10"):
        check_array("x", [4, 3], [None, None], 4, 10)

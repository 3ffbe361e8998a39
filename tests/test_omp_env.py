"""The OpenMP wait policy set as the C++ core loads (bfpaccel._omp): the spin count is given to
the runtime only while the extension loads, and a user's own OpenMP settings win."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import bfpaccel._omp as omp

_PROBE = """
import json, os, sys
seen = {}
real_import = __builtins__.__import__
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if fromlist and "_core" in fromlist and (globals or {}).get("__name__", "").startswith("bfpaccel"):
        seen.setdefault("at_load", os.environ.get("GOMP_SPINCOUNT"))
    return real_import(name, globals, locals, fromlist, level)
__builtins__.__import__ = spy
import bfpaccel
__builtins__.__import__ = real_import
print(json.dumps({"at_load": seen.get("at_load"), "after": os.environ.get("GOMP_SPINCOUNT"),
                  "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def _probe(extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_spin_count_given_while_loading_then_removed():
    r = _probe({})
    assert r["at_load"] == str(omp.SPIN_COUNT)
    assert r["after"] is None  # child processes see the environment as it was


def test_user_settings_win():
    r = _probe({"GOMP_SPINCOUNT": "12345"})
    assert r["at_load"] == "12345" and r["after"] == "12345"
    r = _probe({"OMP_WAIT_POLICY": "ACTIVE"})
    assert r["at_load"] is None and r["after"] is None and r["policy"] == "ACTIVE"


def test_load_core_returns_the_extension(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    core = omp.load_core()
    assert core.__name__ == "bfpaccel._core"
    assert "GOMP_SPINCOUNT" not in os.environ

"""A child of fork() after the parent ran multi-threaded ops: runs them (on one thread, the same
bits) instead of waiting forever for the parent's OpenMP threads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import bfpaccel
    from bfpaccel import _core

    n = min(2, _core.max_threads())
    bfpaccel.set_num_threads(n)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 20, 20)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    a = rng.standard_normal((96, 512)).astype(np.float32)
    b = rng.standard_normal((512, 384)).astype(np.float32)
    want = (bfpaccel.conv2d(x, w, "msfp16", padding=1), bfpaccel.matmul(a, b, "msfp16"))
    pid = os.fork()
    if pid == 0:
        ok = bfpaccel.get_num_threads() == 1
        got = (bfpaccel.conv2d(x, w, "msfp16", padding=1), bfpaccel.matmul(a, b, "msfp16"))
        ok = ok and all(np.array_equal(g, h) for g, h in zip(got, want))
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert bfpaccel.get_num_threads() == n  # the parent keeps its threads
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def test_forked_child_runs_ops_and_gets_the_same_bits():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


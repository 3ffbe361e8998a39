"""bench/isa_mask: a process under the shim sees an AVX2-only CPU, and real faults still crash."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "isa_mask_run", Path(__file__).resolve().parents[1] / "bench" / "isa_mask" / "run.py")
assert _spec and _spec.loader
isa_mask = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(isa_mask)

_why = isa_mask.supported()
pytestmark = [
    pytest.mark.skipif(_why is not None, reason=f"isa_mask: {_why}"),
    pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler"),
]


def _run(code: str, tmp_path: Path, *py_opts: str) -> subprocess.CompletedProcess[str]:
    env = isa_mask.masked_env()
    return subprocess.run([sys.executable, *py_opts, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def test_masked_process_sees_no_avx512(tmp_path: Path) -> None:
    code = (
        "import bfpaccel, numpy as np, json\n"
        "try:\n    from numpy._core._multiarray_umath import __cpu_features__ as f\n"
        "except ImportError:\n    from numpy.core._multiarray_umath import __cpu_features__ as f\n"
        "print(json.dumps([bfpaccel.available_kernels(), f['AVX512F'], f['AVX2'], f['AVX512_SPR']]))\n"
    )
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    import json
    kernels, avx512f, avx2, spr = json.loads(r.stdout.strip().splitlines()[-1])
    assert not avx512f and not spr
    assert "avx512" not in kernels and "amx" not in kernels
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as here
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as here
    assert avx2 == here["AVX2"]  # everything else left as it is
    if here["AVX2"] and here["FMA3"]:
        assert "avx2" in kernels


def test_bench_records_the_mask(tmp_path: Path) -> None:
    code = ("import json; from bfpaccel.bench.harness import environment\n"
            "print(json.dumps(environment(1)['cpu']))\n")
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    cpu = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    assert cpu["isa_mask"] == "avx2-only"
    assert not [f for f in cpu["simd"] if f.startswith(("avx512", "amx", "avx_vnni"))]
    from bfpaccel.bench.harness import environment
    assert environment(1)["cpu"]["isa_mask"] is None


def test_real_fault_still_crashes(tmp_path: Path) -> None:
    r = _run("import ctypes; ctypes.string_at(0)", tmp_path)
    assert r.returncode == -11, (r.returncode, r.stderr)


def test_cli_passes_status_and_needs_a_command() -> None:
    assert isa_mask.main(["--", sys.executable, "-c", "raise SystemExit(5)"]) == 5
    with pytest.raises(SystemExit):
        isa_mask.main([])


def test_a_later_segv_handler_keeps_the_mask(tmp_path: Path) -> None:
    """A program that installs its own SIGSEGV handler after the shim (Python's faulthandler,
    which pytest enables: `pytest bench` under the mask) still sees its CPUIDs answered, and a
    real fault reaches its handler: the traceback, then the crash."""
    code = ("import faulthandler, signal, json; assert faulthandler.is_enabled()\n"
            "try:\n    from numpy._core._multiarray_umath import __cpu_features__ as f\n"
            "except ImportError:\n    from numpy.core._multiarray_umath import __cpu_features__ as f\n"
            "import bfpaccel\n"
            "print(json.dumps([bfpaccel.available_kernels(), f['AVX512F']]))\n")
    r = _run(code, tmp_path, "-X", "faulthandler")
    assert r.returncode == 0, r.stderr
    import json
    kernels, avx512f = json.loads(r.stdout.strip().splitlines()[-1])
    assert not avx512f and "avx512" not in kernels
    r = _run("import ctypes; ctypes.string_at(0)", tmp_path, "-X", "faulthandler")
    assert r.returncode == -11, (r.returncode, r.stderr)
    assert "Fatal Python error: Segmentation fault" in r.stderr

"""Run a command as on an AVX2-only CPU (no AVX-512, AVX-VNNI or AMX): same-run baselines.

    python bench/isa_mask/run.py -- python -c "import bfpaccel; print(bfpaccel.available_kernels())"
    python bench/isa_mask/run.py -- bfpaccel bench --model resnet50 --backends bfp:msfp16,onnxruntime

The command runs with ``isa_mask.so`` preloaded (built here with the C compiler on first use,
into ``bench/isa_mask/build/``): every CPUID it executes answers without AVX-512, AVX-VNNI and
AMX, so numpy, onnxruntime and bfpaccel all take their AVX2 code paths on this core. It needs
Linux on x86-64 and CPUID faulting (the ``cpuid_fault`` flag in /proc/cpuinfo; KVM guests
usually have it). The exit status is the command's; 3 with a message when faulting is
unavailable. Figures measured this way describe an AVX2-only CPU with this core's caches and
clock, not any particular AVX2 product: say so where you quote them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "isa_mask.c"


def build(out_dir: Path = HERE / "build") -> Path:
    """The shim's shared object, compiled when missing or older than its source."""
    so = out_dir / "isa_mask.so"
    if so.exists() and so.stat().st_mtime >= SOURCE.stat().st_mtime:
        return so
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("isa_mask: no C compiler (set CC)")
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(so), str(SOURCE), "-ldl"], check=True)
    return so


def supported() -> str | None:
    """None when the shim can work here, else why not."""
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        return "needs Linux on x86-64"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cannot read /proc/cpuinfo"
    if " cpuid_fault" not in flags:
        return "this CPU (or hypervisor) has no CPUID faulting (no cpuid_fault flag)"
    return None


def masked_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of env (default: os.environ) that runs processes under the shim."""
    env = dict(os.environ if env is None else env)
    so = str(build())
    env["LD_PRELOAD"] = f"{so} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else so
    env["BFPACCEL_ISA_MASK"] = "avx2-only"  # bfpaccel bench records it (bench/harness.py)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Everything after -- is the command.")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command given (put it after --)")
    why = supported()
    if why:
        print(f"isa_mask: {why}", file=sys.stderr)
        return 3
    return subprocess.call(cmd, env=masked_env())


if __name__ == "__main__":
    sys.exit(main())

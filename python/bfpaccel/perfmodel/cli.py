"""``bfpaccel estimate``: the modelled latency of a model on a Brainwave-style NPU.

Examples:
  bfpaccel estimate --model resnet50 --npu brainwave-s10
  bfpaccel estimate --model plan.bfpplan --npu my-npu.yaml --batch 4 --json out.json
  bfpaccel estimate --model vgg16 --set mrf_bytes=30000000 --set dram_gbps=19.2 --top 10
  bfpaccel estimate --list-npus
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional

from .model import BUILTIN_MODELS, NpuConfigError, estimate, list_npus, load_npu, peak_tops, save_json

__all__ = ["add_estimate_parser", "run_estimate"]


def _parse_sets(items: Optional[List[str]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set takes FIGURE=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = None if v.strip().lower() in ("null", "none") else v.strip()
    return out


def add_estimate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``estimate`` subcommand to an argparse ``subparsers`` object; its handler is
    :func:`run_estimate` (set as the ``func`` default)."""
    p = subparsers.add_parser("estimate", help="modelled latency of a model on a Brainwave-style FPGA NPU",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"{'|'.join(BUILTIN_MODELS)}, PATH.onnx (compiled as msfp16) or PATH.bfpplan")
    p.add_argument("--npu", default="brainwave-s10", help=f"{'|'.join(list_npus())} or PATH.yaml (default brainwave-s10)")
    p.add_argument("--batch", type=int, default=1, help="inputs per inference (default 1)")
    p.add_argument("--input-shape", default=None, help="full input shape, e.g. 1,3,224,224 (default: the model's)")
    p.add_argument("--set", action="append", metavar="FIGURE=VALUE", help="override one NPU figure (repeatable)")
    p.add_argument("--json", dest="json_path", help="also write the estimate as JSON here")
    p.add_argument("--top", type=int, default=None, help="show only the N slowest layers")
    p.add_argument("--list-npus", action="store_true", help="list the shipped NPU configurations and exit")
    p.set_defaults(func=run_estimate)
    return p


def run_estimate(args: argparse.Namespace) -> int:
    """Handler of ``bfpaccel estimate``: prints the per-layer table and summary; 0 on success,
    2 on a usage or configuration error (with the message on stderr)."""
    try:
        if args.list_npus:
            for name in list_npus():
                n = load_npu(name)
                miss = n.missing()
                peak = f"{peak_tops(n):.1f} peak TOPS" if not n.missing(("clock_mhz", "native_dim", "lanes", "tiles")) \
                    else "figures unset: " + ", ".join(miss)
                print(f"{name:<16} {n.device:<28} {peak}")
            return 0
        if not args.model:
            raise ValueError("--model is required (or --list-npus)")
        npu = load_npu(args.npu, **_parse_sets(args.set))
        shape = None
        if args.input_shape:
            shape = [int(v) for v in args.input_shape.replace("x", ",").split(",") if v.strip()]
        e = estimate(args.model, npu, batch=args.batch, input_shape=shape)
    except (NpuConfigError, ValueError, TypeError, OSError) as exc:
        print(f"bfpaccel estimate: error: {exc}", file=sys.stderr)
        return 2
    print(e.table(top=args.top))
    if args.json_path:
        save_json(e, args.json_path)
        print(f"wrote {args.json_path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m bfpaccel.perfmodel.cli`` (until the lead wires ``bfpaccel estimate``)."""
    p = argparse.ArgumentParser(prog="bfpaccel")
    sub = p.add_subparsers(dest="command", required=True)
    add_estimate_parser(sub)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""Refresh the "latest bfpaccel bench run" section of bench/README.md from a result JSON.

    bfpaccel bench --model resnet50 --json bench/latest-bench.json --plot bench/latest-bench.png
    python bench/refresh_readme.py bench/latest-bench.json [--readme bench/README.md] [--image PNG]

Only the text between the ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` markers is
replaced (the Markdown tables of ``bfpaccel.bench.report.format_markdown``); the rest of the
file is left as it is.  ``--check`` changes nothing and exits 1 when the section is stale.
Exit codes: 0 done (or up to date), 1 stale with --check, 2 bad input (no markers, not a result).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


def refresh(text: str, section: str) -> str:
    """``text`` with everything between the markers replaced by ``section``.

    Example:
        >>> refresh("a\\n<!-- bench:begin -->\\nold\\n<!-- bench:end -->\\nb\\n", "new")
        'a\\n<!-- bench:begin -->\\nnew\\n<!-- bench:end -->\\nb\\n'
    """
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"the README has no {BEGIN} ... {END} section (add both markers, in that order)")
    if text.count(BEGIN) > 1 or text.count(END) > 1:
        raise ValueError(f"the README has more than one {BEGIN} / {END} marker")
    return text[:i + len(BEGIN)] + "\n" + section.strip("\n") + "\n" + text[j:]


def main(argv: Optional[List[str]] = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="JSON written by `bfpaccel bench --json`")
    ap.add_argument("--readme", default=os.path.join(here, "README.md"), help="default: bench/README.md")
    ap.add_argument("--image", default=None, help="a PNG of the same run to link under the tables "
                    "(path as it should appear in the README, relative to it)")
    ap.add_argument("--check", action="store_true", help="only report whether the section is up to date")
    args = ap.parse_args(argv)

    from bfpaccel.bench.report import format_markdown, load_result

    try:
        result = load_result(args.result)
        with open(args.readme) as f:
            text = f.read()
        section = format_markdown(result)
        if args.image:
            section += f"\n\n![latency per backend: p50 bars with p99 whiskers, and CDFs]({args.image})"
        new = refresh(text, section)
    except (OSError, ValueError) as e:
        print(f"refresh_readme: error: {e}", file=sys.stderr)
        return 2
    if new == text:
        print(f"{args.readme}: up to date")
        return 0
    if args.check:
        print(f"{args.readme}: the bench section differs from {args.result}", file=sys.stderr)
        return 1
    tmp = args.readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, args.readme)
    print(f"{args.readme}: bench section refreshed from {args.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``ProfileSummary``: where a plan's time goes (``Session.profile_summary``, ``bfpaccel profile``).

A profiled run times every op of the lowered program and, inside each matrix op, the integer
GEMM kernel (the block dot products, with the conv epilogue it fuses).  The summary keeps the
fastest of several profiled runs and groups its ops by kind; ``kernel_share`` is the part of
the time spent in the GEMM kernel, i.e. the part a faster kernel (AVX-512, AMX) can shrink.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

__all__ = ["OpProfile", "ProfileSummary"]


@dataclass
class OpProfile:
    """One op of a profiled run: its name (fused ops joined by ``+``), kind, seconds and the
    seconds of the integer GEMM kernel inside it (0 for ops off the BFP core; a conv on the
    kernel's stem path counts its fp32 block sums, which stand in for that kernel)."""

    name: str
    kind: str
    seconds: float
    kernel_seconds: float = 0.0


@dataclass
class ProfileSummary:
    """Aggregate timing of one plan on one input signature.

    Every number comes from the same run: the fastest of ``runs`` profiled runs (the least
    disturbed by the machine), so ``total_seconds == sum(kind_seconds.values())``.

    Attributes:
        total_seconds: the fastest run's sum of per-op seconds (excludes copying the inputs in
            and the outputs out, and Python).
        kind_seconds: seconds per op kind (``conv``, ``dense``, ``depthwise conv``, ``add``,
            ``max pool``, ``transpose``...; see ``bfpaccel.runtime.lower.op_kind_name``),
            largest first.  A conv with a fused add/relu counts as ``conv``.
        kind_counts: ops per kind.
        kernel_seconds: seconds in the integer GEMM kernel (``Program.last_gemm_times``; for a
            conv on the kernel's stem path, its fp32 block sums -- the same datapath).
        kernel_share: ``kernel_seconds / total_seconds`` (0 when nothing was timed).
        ops: every op of that run, in execution order.
        top_ops: the ``top`` slowest ops, slowest first.
        kernel, threads: the kernel and thread count the session ran with.
        runs: profiled runs taken.
        input_shapes: the input signature.

    Example:
        >>> s = sess.profile_summary({"x": x}, runs=5)  # doctest: +SKIP
        >>> print(s)  # doctest: +SKIP
        >>> s.kernel_share  # doctest: +SKIP
        0.71
    """

    total_seconds: float
    kind_seconds: Dict[str, float]
    kernel_seconds: float
    kernel_share: float
    ops: List[OpProfile]
    top_ops: List[OpProfile]
    kernel: str
    threads: int
    runs: int
    kind_counts: Dict[str, int] = field(default_factory=dict)
    input_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_runs(cls, names: List[str], kinds: List[str], runs: List[Tuple[List[float], List[float]]], *,
                  kernel: str, threads: int, top: int = 10,
                  input_shapes: Dict[str, Tuple[int, ...]] | None = None) -> "ProfileSummary":
        """Builds the summary from ``(op seconds, GEMM seconds)`` of each profiled run."""
        if not runs:
            raise ValueError("no profiled runs")
        times, gemm = min(runs, key=lambda r: sum(r[0]))
        gemm = list(gemm) + [0.0] * (len(times) - len(gemm))
        ops = [OpProfile(n, k or "other", float(t), float(g)) for n, k, t, g in zip(names, kinds, times, gemm)]
        total = float(sum(o.seconds for o in ops))
        by: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        for o in ops:
            by[o.kind] = by.get(o.kind, 0.0) + o.seconds
            counts[o.kind] = counts.get(o.kind, 0) + 1
        by = dict(sorted(by.items(), key=lambda kv: -kv[1]))
        k = float(sum(o.kernel_seconds for o in ops))
        return cls(total_seconds=total, kind_seconds=by, kernel_seconds=k,
                   kernel_share=(k / total) if total > 0 else 0.0, ops=ops,
                   top_ops=sorted(ops, key=lambda o: -o.seconds)[:max(int(top), 0)], kernel=kernel,
                   threads=int(threads), runs=len(runs), kind_counts={n: counts[n] for n in by},
                   input_shapes=dict(input_shapes or {}))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: totals in ms, per-kind ms, the top ops (not every op)."""
        return {"total_ms": round(self.total_seconds * 1e3, 4), "kernel_ms": round(self.kernel_seconds * 1e3, 4),
                "kernel_share": round(self.kernel_share, 4), "kernel": self.kernel, "threads": self.threads,
                "runs": self.runs,
                "kind_ms": {k: round(v * 1e3, 4) for k, v in self.kind_seconds.items()},
                "kind_counts": dict(self.kind_counts),
                "top_ops": [{"name": o.name, "kind": o.kind, "ms": round(o.seconds * 1e3, 4),
                             "kernel_ms": round(o.kernel_seconds * 1e3, 4)} for o in self.top_ops],
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()}}

    def format(self) -> str:
        """A readable table: totals, time per op kind, the slowest ops."""
        tot = self.total_seconds

        def share(v: float) -> str:
            return f"{100 * v / tot:6.1f}%" if tot > 0 else "     -"

        shapes = ", ".join(f"{k} {list(v)}" for k, v in self.input_shapes.items())
        lines = [f"profile: {len(self.ops)} ops, kernel {self.kernel}, {self.threads} thread"
                 f"{'s' if self.threads != 1 else ''}, fastest of {self.runs} run{'s' if self.runs != 1 else ''}"
                 + (f"; input {shapes}" if shapes else ""),
                 f"total {tot * 1e3:.3f} ms; integer GEMM kernel {self.kernel_seconds * 1e3:.3f} ms = kernel share "
                 f"{100 * self.kernel_share:.1f}%", ""]
        kw = max([len(k) for k in self.kind_seconds] + [7]) + 2
        head = f"{'op kind':<{kw}}{'ops':>5}{'ms':>11}{'share':>8}"
        lines += [head, "-" * len(head)]
        for k, v in self.kind_seconds.items():
            lines.append(f"{k:<{kw}}{self.kind_counts.get(k, 0):>5}{v * 1e3:>11.3f} {share(v)}")
        if self.top_ops:
            nw = min(max([len(o.name) for o in self.top_ops] + [4]) + 2, 60)
            head = f"{'slowest ops':<{nw}}{'kind':<{kw}}{'ms':>11}{'share':>8}{'GEMM ms':>11}"
            lines += ["", head, "-" * len(head)]
            for o in self.top_ops:
                name = o.name if len(o.name) < nw - 1 else o.name[:nw - 4] + "..."
                lines.append(f"{name:<{nw}}{o.kind:<{kw}}{o.seconds * 1e3:>11.3f} {share(o.seconds)}"
                             f"{o.kernel_seconds * 1e3:>11.3f}")
        lines += ["", "ms: the fastest profiled run's time per op (input/output copies and Python excluded); "
                  "GEMM: the integer kernel inside a matrix op, fused epilogue included"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

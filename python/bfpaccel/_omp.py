"""How the C++ core's OpenMP threads wait for work, set once, when the extension loads.

libgomp's default lets an idle thread spin for ~300,000 pause iterations (milliseconds) before
it sleeps.  On a host whose cores are shared with other processes that spinning steals the CPU
from the very thread being waited for: measured on 2 shared vCPUs (EfficientNet-Lite0, batch 1,
2 threads, bench/README.md 2026-12-01 (b)) the p50 latency went from 106-513 ms to 14-17 ms with
a short spin, while a short spin still covers the gaps between one op's parallel loops and the
next.  The core therefore loads with ``GOMP_SPINCOUNT`` = :data:`SPIN_COUNT` unless the
environment already sets ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` (those win); the variable is
removed again once the library has read it, so child processes see the environment unchanged.
"""

from __future__ import annotations

import os
from types import ModuleType

#: pause iterations an idle OpenMP thread spins before it sleeps (about 50 us on current x86)
SPIN_COUNT = 1000


def load_core() -> ModuleType:
    """Imports and returns the C++ extension ``bfpaccel._core`` with the wait policy above.

    Example:
        >>> from bfpaccel._omp import load_core
        >>> load_core().__name__
        'bfpaccel._core'
    """
    ours = "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
    if ours:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    try:
        from . import _core  # type: ignore[attr-defined]  # libgomp reads its settings as it loads
    finally:
        if ours:
            os.environ.pop("GOMP_SPINCOUNT", None)
    return _core

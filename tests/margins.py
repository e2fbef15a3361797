"""How close each array comparison sits to its tolerance (a diagnostic, off by default).

    JAXTUNE_MARGINS=margins.tsv python -m pytest -q
    JAXTUNE_MARGINS=margins.tsv JAXTUNE_MARGINS_RECORD_ONLY=1 python -m pytest -q ...   # never fail: how far
                                                      # a deliberately broken build falls outside each bound

wraps `np.testing.assert_allclose` for the session and writes, per call site and test, the largest
|actual - desired| / (atol + rtol * |desired|) it saw: 1.0 is the bound itself; anything above 0.1
(within 10x of the tolerance) after optimizer steps or long reductions is suspect, since another
CPU's kernels round differently. Sorted by margin, largest first.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np

_rows: dict[tuple[str, str], float] = {}
_current = {"test": "?"}


def _ratio(actual, desired, rtol, atol) -> float:
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    a, d = np.broadcast_arrays(a, d)
    if a.size == 0:
        return 0.0
    finite = np.isfinite(a) & np.isfinite(d)
    if not finite.any():
        return 0.0
    err = np.abs(a[finite] - d[finite])
    bound = atol + rtol * np.abs(d[finite])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(bound > 0, err / bound, np.where(err > 0, np.inf, 0.0))
    return float(r.max())


def install() -> None:
    original = np.testing.assert_allclose
    if getattr(original, "records_margins", False):  # conftest imported twice (as conftest and tests.conftest)
        return

    def recording(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
        try:
            caller = inspect.stack()[1]
            site = f"{Path(caller.filename).name}:{caller.lineno}"
            ratio = _ratio(actual, desired, rtol, atol)
            key = (_current["test"], site)
            _rows[key] = max(_rows.get(key, 0.0), ratio)
        except Exception:  # the diagnostic never breaks a test
            pass
        if RECORD_ONLY:
            return None
        return original(actual, desired, rtol, atol, *args, **kwargs)

    recording.records_margins = True
    np.testing.assert_allclose = recording


def note(ratio: float, depth: int = 2) -> None:
    """Record a margin computed by a test helper (site: the helper's caller)."""
    if not ENABLED:
        return
    caller = inspect.stack()[depth]
    key = (_current["test"], f"{Path(caller.filename).name}:{caller.lineno}")
    _rows[key] = max(_rows.get(key, 0.0), ratio)


def set_test(nodeid: str) -> None:
    _current["test"] = nodeid


def start(path: str) -> None:
    """A new session (pytest's own process, not an xdist worker): the file starts empty."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        Path(path).unlink(missing_ok=True)


def write(path: str) -> None:
    """Merge this process's margins into `path` (xdist workers each add theirs, under a lock)."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        rows = dict(_rows)
        for line in f.read().splitlines()[1:]:
            ratio, site, test = line.split("\t")
            rows[(test, site)] = max(rows.get((test, site), 0.0), float(ratio))
        f.seek(0)
        f.truncate()
        f.write("margin\tsite\ttest\n")
        for (test, site), ratio in sorted(rows.items(), key=lambda kv: -kv[1]):
            f.write(f"{ratio:.3g}\t{site}\t{test}\n")


ENABLED = bool(os.environ.get("JAXTUNE_MARGINS"))
RECORD_ONLY = ENABLED and bool(os.environ.get("JAXTUNE_MARGINS_RECORD_ONLY"))

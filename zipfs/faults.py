"""Fault injection for crash tests: die by SIGKILL at a named point.

`ZIPFS_FAULT=point:n` kills the process the n-th time it passes `point` (n defaults to 1). It
costs one dict lookup when unset. Points are named where a crash is interesting: in the middle
of a write, after a staging fsync but before its journal commit, mid-ingest, inside an ingest's
commit transaction, after that commit but before the staging file is deleted.
"""

from __future__ import annotations

import os
import signal
import threading

_spec = os.environ.get("ZIPFS_FAULT", "")
_point, _, _n = _spec.partition(":")
_left = int(_n or 1) if _point else 0
_lock = threading.Lock()


def point(name: str) -> None:
    """Pass fault point `name`; SIGKILL ourselves if ZIPFS_FAULT says this is the moment."""
    global _left
    if name != _point:
        return
    with _lock:
        _left -= 1
        if _left == 0:
            os.kill(os.getpid(), signal.SIGKILL)

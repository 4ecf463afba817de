"""A process that does not outlive its parent: Linux's PR_SET_PDEATHSIG, for the programs abstream starts.

A neutral home for it, so that what runs in production (the gateway's server processes, ``gateway/server.py``)
need not import the development stack (``abstream.devstack``, which has its own copy for the broker and the
services it starts).
"""

from __future__ import annotations

import ctypes
import signal

__all__ = ["die_with_parent"]


def die_with_parent() -> None:  # pragma: no cover - runs in a child process (between fork and exec, or spawned)
    """Ask Linux to SIGTERM this child when its parent dies (PR_SET_PDEATHSIG): nothing is left behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)
    except OSError:
        pass

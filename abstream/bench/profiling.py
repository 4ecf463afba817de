"""Profiles of the gateway while a benchmark runs: py-spy flame graphs or collapsed stacks."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from abstream.bench.procs import PREEXEC


def py_spy_path() -> str:
    """py-spy on PATH, else beside this interpreter (the project's venv, where ``pip install py-spy`` puts it)."""
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


@contextlib.contextmanager
def py_spy(pid: int, path: str | None, duration_s: float) -> Iterator[None]:
    """Record a flame graph (``.svg``) or collapsed stacks (``.txt``) of ``pid`` while the block runs."""
    if not path:
        yield
        return
    exe = py_spy_path()
    if not Path(exe).exists():
        print("py-spy is not installed (.venv/bin/pip install py-spy); no profile recorded", file=sys.stderr)
        yield
        return
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))), "-o", path]
    argv += ["--nonblocking", "--subprocesses"]  # uvicorn's server processes too, with ABSTREAM_GATEWAY_WORKERS
    if path.endswith(".txt"):
        argv += ["--format", "raw"]  # collapsed stacks: easy to sum self time per function
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=PREEXEC)  # noqa: PLW1509
    try:
        yield
        proc.wait(timeout=30)
        print(f"profile of the gateway (pid {pid}) written to {path}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

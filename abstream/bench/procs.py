"""Child processes of a benchmark (load processes, profilers): they die with it.

On Linux every child asks the kernel for SIGTERM when its parent dies (``PREEXEC``), so an interrupted or
killed benchmark leaves no load process running.
"""

from __future__ import annotations

import os
import subprocess
import sys

from abstream.lifetime import die_with_parent

PREEXEC = die_with_parent if sys.platform.startswith("linux") else None
"""``preexec_fn`` of every child: SIGTERM from the kernel if this process dies without cleaning up."""


def run_process(argv: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    """Run a load process to completion and return its stdout; it is killed if we are interrupted."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        preexec_fn=PREEXEC,  # noqa: PLW1509
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with code {proc.returncode}")
    return out.decode()

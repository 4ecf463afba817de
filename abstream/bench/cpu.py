"""CPU accounting of a benchmark run: what each process of the stack, the load process and the rest of the
machine used while it ran, and waiting for a quiet machine before it starts (a shared box skews figures)."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


class CpuMeter:
    """CPU used during a block, in % of ONE core: each named pid (with its descendants), this process, its
    reaped children (the load processes), the whole machine, and everything else (other users of a shared box
    skew the figures); plus ``NAME_runqueue_wait``: % of the time NAME's processes (summed over the tree, like
    the CPU) were runnable but waiting for a CPU, which is what other processes add to their latency."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.result: dict[str, float] = {}

    @staticmethod
    def _trees(pids: dict[str, int]) -> dict[str, tuple[list[int], int]]:
        """Each named process with its live descendants (e.g. gateway server processes), and their utime + stime."""
        stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        out = {}
        for name, root in pids.items():
            tree, todo = [], [root]
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo.extend(children.get(pid, ()))
            out[name] = (tree, sum(stats.get(pid, (0, 0))[1] for pid in tree))
        return out

    @staticmethod
    def _machine_ticks() -> tuple[int, int]:
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0, 0
        return sum(values) - values[3] - values[4], sum(values)  # busy (all but idle, iowait), total

    @staticmethod
    def _rusage(who: int) -> float:
        import resource

        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime

    @staticmethod
    def _runqueue_wait_ns(pid: int) -> int:
        """Time the process's threads spent runnable but waiting for a CPU (/proc/PID/task/*/schedstat)."""
        total = 0
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                try:
                    total += int((task / "schedstat").read_text().split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        except OSError:
            return 0
        return total

    def _snapshot(self) -> tuple[float, dict[str, int], tuple[int, int], float, float, dict[str, int]]:
        import resource

        trees = self._trees(self.pids)
        return (
            time.perf_counter(),
            {name: ticks for name, (_, ticks) in trees.items()},
            self._machine_ticks(),
            self._rusage(resource.RUSAGE_SELF),
            self._rusage(resource.RUSAGE_CHILDREN),
            {name: sum(self._runqueue_wait_ns(pid) for pid in tree) for name, (tree, _) in trees.items()},
        )

    def __enter__(self) -> CpuMeter:
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        t1, ticks1, (busy1, total1), self1, children1, wait1 = self._snapshot()
        t0, ticks0, (busy0, total0), self0, children0, wait0 = self._start
        wall = max(t1 - t0, 1e-9)
        hz = os.sysconf("SC_CLK_TCK")
        out = {name: 100 * (ticks1[name] - ticks0[name]) / hz / wall for name in self.pids}
        out["bench"] = 100 * (self1 - self0) / wall
        out["load"] = 100 * (children1 - children0) / wall
        cores = os.cpu_count() or 1
        ours = sum(out.values())
        out["machine"] = 100 * cores * (busy1 - busy0) / max(total1 - total0, 1)
        out["others"] = max(0.0, out["machine"] - ours)
        for name in self.pids:  # % of the wall time it was ready to run but waited for a CPU (contention)
            out[f"{name}_runqueue_wait"] = 100 * (wait1[name] - wait0[name]) / 1e9 / wall
        self.result = {k: round(v, 1) for k, v in out.items()}


def wait_for_quiet(max_wait_s: float, below_pct: float) -> float:
    """On a shared machine: wait up to ``max_wait_s`` for a 1-second window in which the whole machine used
    less than ``below_pct`` % of one core (our idle stack included), so that a run does not start in the
    middle of someone else's test suite. Returns that window's figure (recorded with each run)."""
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + max_wait_s
    announced = False
    while True:
        b0, t0 = CpuMeter._machine_ticks()
        time.sleep(1.0)
        b1, t1 = CpuMeter._machine_ticks()
        busy = 100 * cores * (b1 - b0) / max(t1 - t0, 1)
        if busy < below_pct or time.monotonic() >= deadline:
            if announced:
                print(f"  ... going on, machine at {busy:.0f}% of a core", flush=True)
            return round(busy, 1)
        if not announced:
            print(
                f"  machine busy ({busy:.0f}% of a core in use elsewhere): waiting up to {max_wait_s:.0f}s "
                f"for < {below_pct:.0f}% (--quiet-wait 0 to skip)",
                flush=True,
            )
            announced = True


def add_quiet_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        metavar="S",
        help="before each run, wait up to S seconds for the machine to be nearly idle (default 60; 0: never)",
    )
    parser.add_argument(
        "--quiet-below", type=float, default=25.0, metavar="PCT", help="nearly idle: below PCT %% of one core"
    )


@contextlib.contextmanager
def measured_run(pids: dict[str, int], args: argparse.Namespace) -> Iterator[CpuMeter]:
    """Wait for a quiet machine (``add_quiet_args``), then meter CPU while the block runs; ``result`` also
    holds ``machine_before``, the machine's use in the second before the run."""
    before = wait_for_quiet(args.quiet_wait, args.quiet_below) if args.quiet_wait > 0 else None
    meter = CpuMeter(pids)
    with meter:
        yield meter
    if before is not None:
        meter.result["machine_before"] = before

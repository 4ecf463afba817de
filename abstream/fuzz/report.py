"""What a fuzz run shows: a progress bar while it runs, then per endpoint the requests, the statuses seen, server
errors, schema mismatches and time; the hostile cases; and every distinct failure with a command that replays it."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from abstream.fuzz.checks import SCHEMA_MISMATCH, SERVER_ERROR
from abstream.fuzz.hostile import Outcome
from abstream.fuzz.schema_run import Sent

MAX_FAILURES_SHOWN = 10


@dataclass
class OperationTally:
    requests: int = 0
    statuses: Counter[int | None] = field(default_factory=Counter)
    server_errors: int = 0
    mismatches: int = 0
    time_s: float = 0.0
    """Wall time of its cases: drawing them (Hypothesis) and their requests."""
    slowest_s: float = 0.0


@dataclass
class Tally:
    """Everything a run saw, in the order the operations first answered."""

    operations: dict[str, OperationTally] = field(default_factory=dict)
    failures: dict[tuple[str, str], Sent] = field(default_factory=dict)
    """The first request of each (operation, problem), to replay."""
    hostile: list[Outcome] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    hostile_proven: bool | None = None
    """True: checked in ClickHouse; False: only the answers (no ClickHouse with --url); None: not run."""
    last: float = field(default_factory=time.perf_counter)

    def add(self, sent: Sent) -> None:
        now = time.perf_counter()
        op = self.operations.setdefault(sent.operation, OperationTally())
        op.requests += 1
        op.statuses[sent.status] += 1
        op.time_s += now - self.last
        op.slowest_s = max(op.slowest_s, sent.elapsed_s)
        self.last = now
        kinds = {p.kind for p in sent.problems}
        op.server_errors += SERVER_ERROR in kinds
        op.mismatches += SCHEMA_MISMATCH in kinds
        for problem in sent.problems:
            self.failures.setdefault((sent.operation, problem.title), sent)

    @property
    def requests(self) -> int:
        return sum(op.requests for op in self.operations.values())

    @property
    def failed(self) -> bool:
        return bool(self.failures) or any(not o.ok for o in self.hostile)


def _statuses(counts: Counter[int | None]) -> str:
    return " ".join(f"{'none' if s is None else s}×{n}" for s, n in sorted(counts.items(), key=lambda x: x[0] or 0))


def operations_table(tally: Tally, elapsed_s: float) -> Table:
    table = Table(title=f"Schemathesis: {tally.requests:,} requests in {elapsed_s:.0f} s", title_justify="left")
    for name, justify in (("endpoint", "left"), ("requests", "right"), ("status codes seen", "left"),
                          ("server errors", "right"), ("schema mismatches", "right"), ("time", "right"),
                          ("slowest answer", "right")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    total = OperationTally()
    for name, op in tally.operations.items():
        table.add_row(name, f"{op.requests:,}", _statuses(op.statuses), _count(op.server_errors), _count(op.mismatches),
                      f"{op.time_s:.1f} s", f"{op.slowest_s * 1000:.0f} ms")  # fmt: skip
        total.requests += op.requests
        total.statuses.update(op.statuses)
        total.server_errors += op.server_errors
        total.mismatches += op.mismatches
        total.time_s += op.time_s
        total.slowest_s = max(total.slowest_s, op.slowest_s)
    table.add_section()
    table.add_row("all", f"{total.requests:,}", _statuses(total.statuses), _count(total.server_errors),
                  _count(total.mismatches), f"{total.time_s:.1f} s", f"{total.slowest_s * 1000:.0f} ms",
                  style="bold")  # fmt: skip
    return table


def _count(n: int) -> str:
    return "0" if n == 0 else f"[red]{n}[/red]"


def hostile_table(tally: Tally) -> Table:
    proof = {True: "event_logs: sentinel only", False: "answers only (no ClickHouse)", None: ""}[tally.hostile_proven]
    table = Table(title=f"Hostile requests ({proof})", title_justify="left")
    for name in ("case", "what", "documented", "answered", "time", "result"):
        table.add_column(name)
    for o in tally.hostile:
        table.add_row(o.case.name, o.case.what, f"{o.case.status} {o.case.code}", o.answer.summary(),
                      f"{o.elapsed_s:.1f} s", "ok" if o.ok else "[red]FAIL[/red]")  # fmt: skip
    return table


def print_report(console: Console, tally: Tally, elapsed_s: float) -> None:
    if tally.operations:
        console.print(operations_table(tally, elapsed_s))
    for note in tally.skipped:
        console.print(f"[dim]not fuzzed: {note}[/dim]")
    if tally.hostile:
        console.print(hostile_table(tally))
    print_failures(console, tally)


def print_failures(console: Console, tally: Tally) -> None:
    shown = list(tally.failures.items())[:MAX_FAILURES_SHOWN]
    for (operation, title), sent in shown:
        problem = next(p for p in sent.problems if p.title == title)
        console.print(f"\n[red]{problem.kind}[/red] {operation} ({sent.mode} case, answered {sent.status}): {title}")
        console.print(f"  {problem.detail}", markup=False, highlight=False)
        console.print("  reproduce:", sent.request, markup=False, highlight=False, soft_wrap=True)
    if len(tally.failures) > len(shown):
        console.print(f"... and {len(tally.failures) - len(shown)} more distinct failures")
    for o in tally.hostile:
        for problem in o.problems:
            console.print(f"\n[red]hostile[/red] {o.case.name} (user {o.user!r}): ", end="")
            console.print(problem, markup=False, highlight=False)

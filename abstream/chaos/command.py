"""`abstream chaos`: arguments, the run (load on the main thread, faults on another), the tables, exit status.

Exit status: 0 when every acknowledged event is in ``event_logs FINAL`` exactly once, the gateway acknowledged
nothing while the broker was away and acknowledged the load again after every fault, ``verify`` is clean and
the loadgen truth check is equal; 1 otherwise; 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from abstream.chaos.faults import Fault, Plan

SHORT = Plan(worker_kills=2, clickhouse_outage_s=5, broker_outage_s=5, gateway_kills=1, pause_s=3, warmup_s=4)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", default="default", help="loadgen scenario whose population and effects are sent")
    p.add_argument("--rate", type=float, default=300.0, help="steady load, events/s (default 300)")
    p.add_argument("--workers", type=int, default=1, help="stream worker processes (default 1)")
    p.add_argument("--worker-kills", type=int, default=10, help="SIGKILLs of a worker (default 10)")
    p.add_argument("--clickhouse-outage", type=float, default=60.0, help="seconds ClickHouse is stopped (default 60)")
    p.add_argument("--broker-outage", type=float, default=30.0, help="seconds the broker is unreachable (default 30)")
    p.add_argument("--gateway-kills", type=int, default=1, help="SIGKILLs of the gateway (default 1)")
    p.add_argument("--pause", type=float, default=10.0, help="mean seconds between faults (default 10)")
    p.add_argument("--seed", type=int, default=None, help="fault moments and traffic (default: random, printed)")
    p.add_argument("--short", action="store_true", help="the CI run: 2 worker kills, 5 s outages, 1 gateway kill")
    p.add_argument("--keep", action="store_true", help="keep the stack's directory (logs, data) afterwards")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")


def plan_of(args: argparse.Namespace) -> Plan:
    if args.short:
        return SHORT
    return Plan(args.worker_kills, args.clickhouse_outage, args.broker_outage, args.gateway_kills, args.pause)


def main(args: argparse.Namespace) -> int:
    from abstream.loadgen.scenario import ScenarioError, load

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    try:
        scenario = load(args.scenario).with_overrides(users=10_000_000, rate=args.rate, seed=seed)
    except (ScenarioError, ValueError) as exc:
        print(f"abstream chaos: {exc}", file=sys.stderr)
        return 2
    console = Console(stderr=args.json, log_path=False)
    if not console.is_terminal:
        console = Console(stderr=args.json, width=120, log_path=False)
    console.print(f"abstream chaos: seed {seed} (--seed {seed} replays the fault moments and the traffic)")
    try:
        return _run(args, scenario, plan_of(args), seed, console)
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, scenario: object, plan: Plan, seed: int, console: Console) -> int:
    from abstream.chaos.faults import Executor, schedule
    from abstream.chaos.stack import chaos_stack
    from abstream.loadgen import check as checking
    from abstream.loadgen.scenario import Scenario

    assert isinstance(scenario, Scenario)  # noqa: S101
    t0 = time.monotonic()
    executor: Executor | None = None
    try:
        with chaos_stack(workers=args.workers, keep_dir=args.keep) as stack:
            console.print(f"stack up in {time.monotonic() - t0:.1f} s: gateway {stack.gateway_url}")
            faults = schedule(plan, random.Random(seed), stack.worker_names)
            before = checking.snapshot(stack.settings)
            progress = Progress(TextColumn("[bold]faults"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.description}"), TimeElapsedColumn(), console=console)  # fmt: skip
            task = progress.add_task("warm-up", total=len(faults))
            run_start = time.time()

            def on_fault(fault: Fault, phase: str) -> None:
                at = time.time() - run_start
                if phase == "start":
                    progress.update(task, description=fault.label)
                    progress.console.log(f"{at:6.1f} s  {fault.label}")
                else:
                    progress.advance(task)
                    progress.console.log(f"{at:6.1f} s  … back after {fault.recovered - fault.started:.1f} s")

            executor = Executor(stack, faults, on_fault)
            with progress:
                run = asyncio.run(_load(scenario, stack.gateway_url, stack.settings.admin_token, executor))
            return _account(args, stack, faults, run, before, seed, console)
    finally:
        if executor is not None:  # only now: the processes it restarted die with its thread
            executor.release.set()


async def _load(scenario: object, url: str, token: str, executor: object) -> object:
    """The load until the schedule is done (and a few seconds more); users in flight finish."""
    from abstream.chaos.faults import Executor
    from abstream.loadgen.runner import simulate
    from abstream.loadgen.scenario import Scenario

    assert isinstance(scenario, Scenario) and isinstance(executor, Executor)  # noqa: S101
    stop = asyncio.Event()
    executor.start()

    async def watch() -> None:
        await asyncio.to_thread(executor.done.wait)
        await asyncio.sleep(3.0)  # a little steady load after the last fault
        stop.set()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await simulate(scenario, url, admin_token=token, stop=stop, retry_for_s=600.0, on_ack=executor.note_ack)
    finally:
        executor.cancelled.set()
        watcher.cancel()
        await asyncio.to_thread(executor.done.wait, 120)
        if executor.error is not None:
            raise RuntimeError(f"a fault could not be carried out: {executor.error}") from executor.error


def _account(args: argparse.Namespace, stack: object, faults: list[Fault], run: object, before: object, seed: int,
             console: Console) -> int:  # fmt: skip
    """Drain, then the per-fault table, the truth check and verify; the exit status."""
    from abstream.chaos import accounting
    from abstream.chaos.stack import ChaosStack
    from abstream.loadgen import check as checking
    from abstream.loadgen.runner import Run
    from stream_workers import verify

    assert isinstance(run, Run) and isinstance(stack, ChaosStack)  # noqa: S101
    dead = stack.check_alive()
    prefix = f"lg-{run.run_id}-"
    console.print(f"load stopped after {run.seconds:.0f} s; waiting for the pipeline to drain …")
    report = checking.check(stack.settings, run, before, drain_timeout_s=300)  # type: ignore[arg-type]
    drained = report.waited_s
    stored = accounting.stored_counts(stack.settings, prefix)
    wins = accounting.windows(faults, run.ledger, stored, run.started_at)
    diffs = verify.differences(verify.expected_totals(stack.settings), verify.actual_totals(stack.settings))
    never_acked = sum(1 for key in stored if key not in run.ledger.acked)
    figures = {
        "seed": seed, "seconds": round(run.seconds, 1), "drained_s": round(drained, 1), "rate": run.scenario.rate,
        "acknowledged": len(run.ledger.acked), "stored": sum(1 for k in run.ledger.acked if k in stored),
        "missing": sum(w.missing for w in wins), "twice": sum(w.twice for w in wins),
        "stored_never_acknowledged": never_acked, "verify_differences": len(diffs), "died_on_their_own": dead,
        "counts_equal": report.counts_equal, "check_reads": report.reads, "caught_up": report.caught_up,
        "retried": dict(run.ledger.retried),
        "windows": [w.__dict__ for w in wins],
    }  # fmt: skip
    broker = [w for w in wins if w.acked_while_away is not None]
    resumed = all(w.acked_again_in_s is not None for w in wins[1:])  # the load was acknowledged after every fault
    ok = (figures["missing"] == 0 and figures["twice"] == 0 and not diffs and report.counts_equal and not dead
          and all(w.acked_while_away == 0 for w in broker) and resumed)  # fmt: skip
    if args.json:
        import orjson

        print(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    else:
        from abstream.loadgen import report as reporting

        console.print(fault_table(wins))
        console.print(reporting.check_table(report))
        console.print(summary(figures, diffs))
    return 0 if ok else 1


def fault_table(wins: list[object]) -> Table:
    from abstream.chaos.accounting import Window
    from abstream.chaos.faults import ACK_WAIT_S

    t = Table(title="per fault: events acknowledged in its window, and where they are now", title_justify="left")
    for col in (
        "fault",
        "back in",
        "acks again",
        "acknowledged",
        "in event_logs FINAL",
        "missing",
        "counted twice",
        "while away",
    ):
        t.add_column(col, justify="left" if col in ("fault", "while away") else "right")
    for w in wins:
        assert isinstance(w, Window)  # noqa: S101
        away = ""
        if w.acked_while_away is not None:
            away = f"{w.acked_while_away} acknowledged, {w.failed_while_away} answered 503/refused; {w.note}"
        back = "" if w.recovered_in_s is None else f"{w.recovered_in_s:.1f} s"
        again = "" if w.acked_again_in_s is None else f"{w.acked_again_in_s:.1f} s"
        if w.recovered_in_s is not None and w.acked_again_in_s is None:
            again = Text(f"not within {ACK_WAIT_S:.0f} s", style="bold red")
        t.add_row(w.label, back, again, f"{w.acknowledged:,}", f"{w.stored:,}", _zero(w.missing), _zero(w.twice), away)
    return t


def _zero(n: int) -> Text:
    return Text(f"{n:,}", style="green" if n == 0 else "bold red")


def summary(figures: dict[str, object], diffs: list[str]) -> str:
    lines = [
        f"acknowledged {figures['acknowledged']:,}, in event_logs FINAL {figures['stored']:,}, "
        f"missing {figures['missing']}, counted twice {figures['twice']}; "
        f"stored but never acknowledged (answered 503, then written): {figures['stored_never_acknowledged']}",
        f"abstream verify: {'clean' if not diffs else f'{len(diffs)} difference(s): ' + '; '.join(diffs[:3])}",
        f"drained in {figures['drained_s']} s after the load stopped",
    ]
    if figures["died_on_their_own"]:
        lines.append(f"processes that died on their own: {figures['died_on_their_own']}")
    return "\n".join(lines)

"""`abstream loadgen`: arguments, the progress bar, the run, the tables and the exit status.

Exit status: 0 when the run finished (and, with ``--check``, every count equals the truth); 1 when a count
differs; 2 when the run could not be made (scenario file, gateway unreachable, an experiment not created).
Intervals that miss the true effect are reported, not failed: at 95% one in twenty should.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from abstream.config import Settings
from abstream.loadgen.scenario import ScenarioError, load


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", default="default", help="shipped name (ci, default, aa) or a TOML file path")
    p.add_argument("--url", help="gateway base URL (default: http://ABSTREAM_GATEWAY_HOST:ABSTREAM_GATEWAY_PORT)")
    p.add_argument("--users", type=int, help="override the scenario's population size")
    p.add_argument("--days", type=int, help="override the scenario's days of pre-exposure history (≤ 28)")
    p.add_argument("--rate", type=float, help="override the scenario's target events/s")
    p.add_argument("--seed", type=int, help="override the scenario's random seed")
    p.add_argument("--run-id", help="user ids and experiment names carry it (default: random); fix it to replay")
    p.add_argument("--check", action="store_true",
                   help="after the run, compare the pipeline (ClickHouse at CLICKHOUSE_URL, the results API) "
                        "with the exact truth and each interval with the true effect")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")


def main(args: argparse.Namespace, settings: Settings) -> int:
    from abstream.loadgen import check as checking
    from abstream.loadgen import report as reporting
    from abstream.loadgen.runner import simulate

    try:
        scenario = load(args.scenario).with_overrides(users=args.users, days=args.days, rate=args.rate,
                                                      seed=args.seed)  # fmt: skip
    except (ScenarioError, ValueError) as exc:
        print(f"abstream loadgen: {exc}", file=sys.stderr)
        return 2
    url = args.url or f"http://{settings.gateway_host}:{settings.gateway_port}"
    console = Console(stderr=args.json)
    if not console.is_terminal:
        console = Console(stderr=args.json, width=120)  # a log or CI output: room for the tables, not 80 columns
    before = None
    if args.check:
        try:
            before = checking.snapshot(settings)
        except Exception as exc:  # noqa: BLE001 - any failure to read ClickHouse: the check cannot be made
            print(
                f"abstream loadgen: --check needs ClickHouse at CLICKHOUSE_URL: {type(exc).__name__}", file=sys.stderr
            )
            return 2
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("users"),
        TextColumn("{task.fields[events]:>9,} events {task.fields[rate]:>7,.0f}/s"), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )  # fmt: skip
    task = progress.add_task(f"loadgen {scenario.name}", total=scenario.users, events=0, rate=0.0)

    def on_progress(run: object) -> None:
        from abstream.loadgen.runner import Run

        assert isinstance(run, Run)  # noqa: S101
        rate = run.ledger.events_sent / run.seconds if run.seconds > 0 else 0.0
        progress.update(task, completed=run.users_done, events=run.ledger.events_sent, rate=rate)

    try:
        with progress:
            run = asyncio.run(simulate(scenario, url, admin_token=settings.admin_token, run_id=args.run_id,
                                       on_progress=on_progress))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a run that cannot be made: one line, exit 2
        print(f"abstream loadgen: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    result = checking.check(settings, run, before) if args.check else None
    if args.json:
        import orjson

        print(orjson.dumps(as_json(run, result), option=orjson.OPT_INDENT_2).decode())
    else:
        reporting.print_all(console, run, result)
    return 0 if result is None or result.counts_equal else 1


def as_json(run: object, report: object) -> dict[str, object]:
    from dataclasses import asdict

    from abstream.loadgen.check import Report
    from abstream.loadgen.runner import Run

    assert isinstance(run, Run)  # noqa: S101
    led = run.ledger
    out: dict[str, object] = {
        "scenario": run.scenario.name, "run_id": run.run_id, "seconds": round(run.seconds, 3),
        "users": run.users_done, "experiments": {e.spec.name: e.id for e in run.experiments},
        "requests": led.requests, "gzip_requests": led.gzip_requests, "resent_after_success": led.resent_after_success,
        "retried": dict(led.retried), "events_sent": led.events_sent, "events_acknowledged": len(led.acked),
        "duplicates_flagged": led.duplicates_flagged, "rejected": dict(led.rejected), "refused": dict(led.refused),
        "refused_expected": run.refused_expected, "gave_up_events": led.gave_up_events,
    }  # fmt: skip
    if isinstance(report, Report):
        out["check"] = [asdict(r) | {"pipeline": str(r.pipeline), "truth": str(r.truth)} for r in report.rows]
        out["coverage"] = [asdict(c) for c in report.coverage]
        out["counts_equal"] = report.counts_equal
        out["check_reads"], out["caught_up"] = report.reads, report.caught_up
    return out

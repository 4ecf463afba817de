"""`abstream fuzz`: fuzz the gateway (its own private stack, or --url), then the hostile requests; a table of what
was seen; exit 1 on any failure, each printed with a command that replays it."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from abstream.config import Settings
from abstream.fuzz.target import Target

DEFAULT_REQUESTS = 2_000


DESCRIPTION = (
    "Property-based fuzzing (Schemathesis) of every endpoint of the gateway's /openapi.json, then hostile requests "
    "(bombs, deep nesting, huge numbers, bad UTF-8, duplicate keys, 10 MB headers, slow clients, NUL ids); a table "
    "per endpoint, exit 1 on any failure with a command that replays it. Without --url, on a private stack of its "
    "own (broker, ClickHouse, worker, gateway)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help=f"Schemathesis requests over all endpoints (default {DEFAULT_REQUESTS:,})",
    )
    parser.add_argument(
        "--url",
        help="fuzz this running gateway (it is written to: never production); tokens "
        "from ABSTREAM_ADMIN_TOKEN / ABSTREAM_METRICS_TOKEN or the flags below",
    )
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed: the same seed draws the same cases")
    parser.add_argument("--admin-token", help="with --url: the gateway's admin token")
    parser.add_argument("--metrics-token", help="with --url: the gateway's metrics token")
    parser.add_argument("--no-hostile", action="store_true", help="skip the hostile requests (~15 s)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the private stack's logs")


def main(args: argparse.Namespace) -> int:
    """`abstream fuzz` with its parsed arguments."""
    console = Console() if sys.stdout.isatty() else Console(width=160)  # a log keeps the table whole
    try:
        import schemathesis  # noqa: F401
    except ImportError:
        console.print("abstream fuzz needs Schemathesis: pip install 'abstream[fuzz]'")
        return 2
    if args.requests < 0:
        console.print("--requests must be at least 0")
        return 2
    with _target(args, console) as target:
        return run(target, args.requests, args.seed, not args.no_hostile, console)


@contextlib.contextmanager
def _target(args: argparse.Namespace, console: Console) -> Iterator[Target]:
    if args.url:
        env = Settings.from_env()
        yield Target(args.url.rstrip("/"), args.admin_token or env.admin_token, args.metrics_token or env.metrics_token)
        return
    from abstream.fuzz.stack import private_stack

    with contextlib.ExitStack() as stack:
        with console.status("starting a private stack: broker, ClickHouse, migrations, worker, gateway"):
            target = stack.enter_context(private_stack(worker=not args.no_hostile, keep_dir=args.keep_logs))
        console.print(f"private stack: gateway {target.url}")
        yield target


def run(target: Target, requests: int, seed: int, hostile: bool, console: Console) -> int:
    """The whole run against ``target``: 0 clean, 1 any failure, 130 interrupted (the table so far printed)."""
    from abstream.fuzz import hostile as hostile_requests
    from abstream.fuzz import schema_run
    from abstream.fuzz.report import Tally, print_report

    tally = Tally()
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("schemathesis", total=requests)

            def on_sent(sent: schema_run.Sent) -> None:
                tally.add(sent)
                bad = len(tally.failures)
                progress.update(task, advance=1, description=f"{sent.operation:45.45s} failures: {bad}")

            if requests:
                tally.last = time.perf_counter()
                tally.skipped = schema_run.run(target, requests, seed, on_sent)
                progress.update(task, completed=requests)
            if hostile:
                cases = hostile_requests.CASES
                task = progress.add_task("hostile requests", total=len(cases))
                tally.hostile = hostile_requests.run_all(
                    target.url,
                    on_done=lambda o: progress.update(task, advance=1, description=f"hostile: {o.case.name}"),
                )
                tally.hostile_proven = target.settings is not None
                if target.settings is not None:
                    progress.update(task, description="hostile: reading event_logs")
                    hostile_requests.prove_nothing_accepted(target.settings, tally.hostile)
    except KeyboardInterrupt:
        print_report(console, tally, time.perf_counter() - start)
        console.print("interrupted")
        return 130
    print_report(console, tally, time.perf_counter() - start)
    if tally.failed:
        console.print("[red]FAILED[/red]: see the failures above")
        return 1
    refused = f"; {len(tally.hostile)} hostile requests refused as documented" if tally.hostile else ""
    console.print(
        f"[green]OK[/green]: {tally.requests:,} requests, no server error, every answer as documented{refused}"
    )
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m abstream.fuzz.main", description=DESCRIPTION)
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))

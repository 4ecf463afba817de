"""`abstream`: every command in one place. Settings come from the environment (abstream.config); flags win."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from urllib.parse import urlsplit

from abstream.config import Settings, SettingsError, redacted_url, settings_table
from abstream.devstack.ports import PortBusyError

Handler = Callable[[argparse.Namespace], int]


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    return Settings.from_env(**overrides)


def cmd_broker(args: argparse.Namespace) -> int:
    from abstream.devstack import broker

    settings = _settings(args, broker_port=args.port)
    return broker.run(args.host, settings.broker_port)


def cmd_clickhouse_local(args: argparse.Namespace) -> int:
    from abstream.devstack import clickhouse_local

    settings = _settings(args, clickhouse_port=args.port)
    path = args.path or f"{settings.data_dir}/clickhouse"
    clickhouse_local.serve(args.host, settings.clickhouse_port, path)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from abstream.migrate import MigrationError, migrate

    try:
        applied = migrate(_settings(args))
    except MigrationError as exc:
        print(f"abstream migrate: {exc}", file=sys.stderr)
        return 1
    print(f"{len(applied)} migration(s) applied" if applied else "schema up to date")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.auth import check_exposure
    from gateway.server import serve

    settings = _settings(args, gateway_port=args.port, gateway_host=args.host, gateway_workers=args.workers)
    refusal = check_exposure(settings)
    if refusal:
        print(f"abstream gateway: {refusal}", file=sys.stderr)
        return 2
    serve(settings)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from stream_workers.main import run

    run(_settings(args), web_port=args.web_port)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from abstream.devstack.supervisor import run_dev

    settings = _settings(
        args,
        broker_port=args.broker_port,
        clickhouse_port=args.clickhouse_port,
        gateway_port=args.gateway_port,
        worker_web_port=args.worker_web_port,
        data_dir=args.data_dir,
        gateway_workers=args.gateway_workers,
    )
    return run_dev(settings, workers=args.workers)


def cmd_verify(args: argparse.Namespace) -> int:
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from abstream.clickhouse import describe_failure
    from stream_workers.verify import run

    settings = _settings(args)
    try:
        return run(settings)
    except ClickHouseError as exc:  # unreachable, or it answered an error: nothing was compared
        print(f"abstream verify: {describe_failure(settings, exc)}", file=sys.stderr)
        return 2


def cmd_results(args: argparse.Namespace) -> int:
    from abstream.results_view import run
    from gateway.results import parse_level
    from schemas.errors import ApiError

    try:
        level = parse_level(args.level)
    except ApiError as exc:
        print(f"abstream results: {exc.message}", file=sys.stderr)
        return 2
    return run(_settings(args), args.experiment, level, args.metric, args.json)


def cmd_loadgen(args: argparse.Namespace) -> int:
    from abstream.loadgen.command import main as loadgen_main

    return loadgen_main(args, _settings(args))


def cmd_chaos(args: argparse.Namespace) -> int:
    from abstream.chaos.command import main as chaos_main

    return chaos_main(args)


BENCHMARKS = ("ingest", "assign", "bucketing", "validation", "worker", "results", "metrics")


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"abstream.bench.{args.benchmark}")
    return int(module.main(args.bench_args) or 0)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from abstream.fuzz.main import main as fuzz_main

    return fuzz_main(args)


def cmd_config(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    current = settings.as_env()
    # Secrets are not printed (terminals and CI logs keep them): whether one is set is what this answers.
    hidden = "(set, not shown)"
    if settings.admin_token:
        current["ABSTREAM_ADMIN_TOKEN"] = hidden
    if settings.metrics_token:
        current["ABSTREAM_METRICS_TOKEN"] = hidden
    if urlsplit(settings.clickhouse_url).password:
        current["CLICKHOUSE_URL"] = f"{redacted_url(settings.clickhouse_url)}  (password set, not shown)"
    for env, default, doc in settings_table():
        print(f"{env}={current[env]}    # {doc} (default: {default})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = add("broker", cmd_broker, "Run the embedded Kafka-compatible broker (tansu, in memory; development only).")
    p.add_argument("--port", type=int, help="listen port (default: ABSTREAM_BROKER_PORT or 9092)")
    p.add_argument("--host", default="127.0.0.1")

    p = add(
        "clickhouse-local",
        cmd_clickhouse_local,
        "Serve the ClickHouse HTTP protocol over chDB. A development and test component: "
        "production points CLICKHOUSE_URL at a ClickHouse server.",
    )
    p.add_argument("--port", type=int, help="listen port (default: ABSTREAM_CLICKHOUSE_PORT or 8123)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--path", help="chDB data directory (default: $ABSTREAM_DATA_DIR/clickhouse)")

    add("migrate", cmd_migrate, "Apply the ordered SQL migrations in clickhouse/ (each once).")

    p = add("gateway", cmd_gateway, "Run the Starlette gateway (both API surfaces).")
    p.add_argument("--port", type=int, help="listen port (default: ABSTREAM_GATEWAY_PORT or 20000)")
    p.add_argument("--host", help="bind address (default: ABSTREAM_GATEWAY_HOST or 127.0.0.1)")
    p.add_argument(
        "--workers",
        type=int,
        help="server processes, own SO_REUSEPORT socket each (default: ABSTREAM_GATEWAY_WORKERS or 1)",
    )

    p = add("worker", cmd_worker, "Run one Faust stream worker.")
    p.add_argument("--web-port", type=int, help="health/web port (default: ABSTREAM_WORKER_WEB_PORT or 6066)")

    p = add(
        "dev",
        cmd_dev,
        "Run the whole pipeline on the embedded stack: broker, ClickHouse endpoint, migrations, worker(s), gateway.",
    )
    p.add_argument("--broker-port", type=int, help="default: ABSTREAM_BROKER_PORT or 9092")
    p.add_argument("--clickhouse-port", type=int, help="default: ABSTREAM_CLICKHOUSE_PORT or 8123")
    p.add_argument("--gateway-port", type=int, help="default: ABSTREAM_GATEWAY_PORT or 20000")
    p.add_argument("--worker-web-port", type=int, help="default: ABSTREAM_WORKER_WEB_PORT or 6066")
    p.add_argument("--workers", type=int, default=1, help="stream worker processes (default 1)")
    p.add_argument("--gateway-workers", type=int, help="gateway server processes (default: ABSTREAM_GATEWAY_WORKERS)")
    p.add_argument("--data-dir", help="default: ABSTREAM_DATA_DIR or ./.abstream-data")

    add(
        "verify",
        cmd_verify,
        "Recompute every rollup from event_logs and assignments in ClickHouse and print any difference.",
    )

    p = add(
        "results",
        cmd_results,
        "An experiment's results from the rollups: per metric and variant, lift with its interval drawn, "
        "p-values (raw and Holm), chance to win, CUPED; SRM warning and data freshness at the top.",
    )
    p.add_argument("experiment", help="experiment id or key")
    p.add_argument("--json", action="store_true", help="print exactly the API's JSON body instead of the table")
    p.add_argument("--level", default="0.95", help="confidence level: 0.90, 0.95 or 0.99 (default 0.95)")
    p.add_argument("--metric", help="only this metric (its key)")

    from abstream.loadgen.command import add_arguments as loadgen_arguments

    p = add(
        "loadgen",
        cmd_loadgen,
        "Simulate a population through the public HTTP surfaces (a scenario with true effects, fixed seed); "
        "--check compares the pipeline with the exact truth and each interval with the true effect.",
    )
    loadgen_arguments(p)

    from abstream.chaos.command import add_arguments as chaos_arguments

    p = add(
        "chaos",
        cmd_chaos,
        "Loadgen at a steady rate on a private stack while workers and the gateway are SIGKILLed, ClickHouse is "
        "stopped and the broker cut off; then, per fault, acknowledged events against event_logs and verify.",
    )
    chaos_arguments(p)

    p = add(
        "bench",
        cmd_bench,
        "Run a benchmark and print its figures (ingest, assign: a private broker + gateway under load; "
        "bucketing, validation: in-process). `abstream bench NAME --help` lists its options.",
    )
    p.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options passed to that benchmark")

    from abstream.fuzz.main import DESCRIPTION as FUZZ_DESCRIPTION
    from abstream.fuzz.main import add_arguments as fuzz_arguments

    fuzz_arguments(add("fuzz", cmd_fuzz, FUZZ_DESCRIPTION))

    add("config", cmd_config, "Print every setting, its environment variable, value and default.")
    return parser


ONE_SHOT = ("migrate", "verify", "results", "loadgen", "chaos")
"""Commands that run once and exit (not services)."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        log_level = Settings.from_env().log_level.upper()
    except SettingsError as exc:
        print(f"abstream {args.command}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in ONE_SHOT:
        # A one-line error says what went wrong; the client libraries' retry warnings would bury it in tracebacks.
        # (urllib3.connectionpool itself: clickhouse-connect sets the "urllib3" logger's level when imported)
        for name in ("urllib3.connectionpool", "clickhouse_connect", "httpx"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return int(args.handler(args) or 0)
    except (PortBusyError, SettingsError) as exc:
        print(f"abstream {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

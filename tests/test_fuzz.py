"""Schemathesis against a running gateway (ClickHouse migrated, so the read endpoints answer 200, not 503): every
operation of /openapi.json fuzzed, positive and negative cases, a fixed seed; no server error, every answer as
documented. The CI-sized run of `abstream fuzz` (docs/fuzzing.md has the full run); the command itself is run too,
against the gateway and against a stub server whose one endpoint fails, to see it report and exit 1.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from abstream.fuzz import schema_run
from abstream.fuzz.main import add_arguments
from abstream.fuzz.main import main as fuzz_main
from abstream.fuzz.report import Tally
from abstream.fuzz.target import Target
from tests.stack import Infra, app_process, isolated_settings, log_dir

CI_REQUESTS = 1_000
SEED = 0


@pytest.fixture(scope="module")
def target(infra: Infra) -> Iterator[Target]:
    from abstream.migrate import migrate

    admin, metrics = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    settings = isolated_settings(infra, admin_token=admin, metrics_token=metrics)
    migrate(settings, log=False)
    with app_process("gateway", settings, log_dir()) as gw:
        yield Target(gw.address, admin, metrics, settings)


def test_every_endpoint_fuzzed_without_a_failure(target: Target) -> None:
    tally = Tally()
    skipped = schema_run.run(target, CI_REQUESTS, SEED, tally.add)
    documented = {
        f"{method.upper()} {path}"
        for path, item in requests.get(f"{target.url}/openapi.json", timeout=10).json()["paths"].items()
        for method in item
    }
    assert set(tally.operations) == documented
    assert tally.requests == CI_REQUESTS
    failures = [
        f"{op}: {title} ({sent.status}) {next(p.detail for p in sent.problems if p.title == title)}\n  {sent.request}"
        for (op, title), sent in tally.failures.items()
    ]
    assert not failures, "\n".join(failures)
    # the cases reach the handlers, not only the refusals: nearly every operation answered 2xx at least once
    answered = {op for op, t in tally.operations.items() if any(s is not None and s < 300 for s in t.statuses)}
    assert len(answered) >= len(documented) - 2, documented - answered
    # only operations without any input cannot be given invalid data
    assert all(note.endswith("(Unsatisfiable)") and "(negative)" in note for note in skipped), skipped
    assert {note.split(" (")[0] for note in skipped} <= {
        "GET /health/live", "GET /health/ready", "GET /apiv1/ab-tests", "GET /v1/metrics/summary",
    }  # fmt: skip


def test_the_command_prints_its_table(target: Target) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "abstream.cli", "fuzz", "--url", target.url, "--requests", "60", "--no-hostile",
         f"--admin-token={target.admin_token}", f"--metrics-token={target.metrics_token}", "--seed", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for column in ("endpoint", "requests", "status codes seen", "server errors", "schema mismatches", "time"):
        assert column in result.stdout
    assert "POST /v1/events" in result.stdout and "OK: 60 requests" in result.stdout


# --------------------------------------------------------------------- a failure is reported and replayable

_N = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
STUB_SCHEMA = {
    "openapi": "3.1.0",
    "info": {"title": "stub", "version": "1"},
    "paths": {
        "/boom": {
            "post": {
                "requestBody": {"required": True, "content": {"application/json": {"schema": _N}}},
                "responses": {"200": {"description": "ok"}},
            }
        }
    },
}


class _Stub(BaseHTTPRequestHandler):
    """POST /boom answers 500 for a negative n: a server error the fuzzer must find and print a replay of."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(200, json.dumps(STUB_SCHEMA).encode())

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            n = json.loads(body).get("n")
        except (ValueError, AttributeError):
            n = None
        if isinstance(n, int) and n < 0:
            self._answer(500, b'{"error":{"code":"internal_error","message":"boom"}}')
        else:
            self._answer(200, b"{}")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_error_fails_the_run_with_a_replayable_request(
    stub_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = fuzz_main(parser.parse_args(["--url", stub_url, "--requests", "40", "--no-hostile"]))
    out = capsys.readouterr().out
    assert code == 1, out
    assert "server error" in out and "POST /boom" in out and "FAILED" in out
    replay = next(line for line in out.splitlines() if "reproduce:" in line).split("reproduce:", 1)[1].strip()
    assert replay.startswith("printf %s") and "curl" in replay and f"{stub_url}/boom" in replay
    # the command as printed reproduces the 500
    result = subprocess.run(["bash", "-c", replay], capture_output=True, text=True, timeout=30)
    assert result.stdout.startswith("HTTP/1.0 500"), result.stdout + result.stderr

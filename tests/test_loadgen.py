"""The benchmarks' fixed-rate load clients (C and asyncio): same schedule, same accounting, right latencies.

Against a small keep-alive HTTP server that answers every POST after a known delay, so what each client
reports can be checked against what the server did.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest

from abstream.bench import loadgen

DELAY_S = 0.005


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the gateway
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle would hold the body ~40 ms
    bodies: list[bytes]
    close_after = False

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.bodies.append(body)
        time.sleep(DELAY_S)
        answer = orjson.dumps({"accepted": 3, "rejected": 0, "duplicates": 1, "results": []})
        self.send_response(200)
        if self.close_after:
            self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, list[bytes]]]:
    bodies: list[bytes] = []
    handler = type("Handler", (_Handler,), {"bodies": bodies})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/events", bodies
    finally:
        httpd.shutdown()
        httpd.server_close()


def _pool(tmp_path: Path) -> tuple[Path, list[bytes]]:
    bodies = [b'{"n":%d,"pad":"%s"}' % (i, b"x" * (i * 97 % 20_000)) for i in range(40)]
    return loadgen.write_pool(tmp_path / "pool.bin", bodies), bodies


@pytest.mark.parametrize("client", ["c", "python"])
def test_fixed_rate_client_reports_what_the_server_did(
    server: tuple[str, list[bytes]], tmp_path: Path, client: str
) -> None:
    if client == "c" and loadgen.openloop_binary()[0] is None:
        pytest.skip(loadgen.openloop_binary()[1])
    url, received = server
    pool, bodies = _pool(tmp_path)
    rate, warmup, duration = 200.0, 0.5, 2.0
    result = loadgen.run_client(
        url, pool, rate=rate, duration_s=duration, warmup_s=warmup, connections=4, client=client
    )

    assert result["client"].startswith("C open loop" if client == "c" else "python asyncio, open loop")
    assert result["mode"] == "fixed" and result["offered_rps"] == rate
    assert result["errors"] == 0 and result["status"] == {"200": result["requests"]}
    # every scheduled request was sent (warm-up included), the measured ones counted once each
    assert len(received) == int(rate * (warmup + duration))
    assert result["requests"] == pytest.approx(rate * duration, abs=2)
    assert result["rps"] == pytest.approx(rate, rel=0.05)
    # the bodies went out whole and in pool order (with the client's own framing)
    assert received[: len(bodies)] == bodies
    # 3 accepted, 1 duplicate per answer -> 2 published events per request
    assert result["accepted_events"] == 3 * result["requests"]
    assert result["duplicates"] == result["requests"]
    assert result["events_per_s"] == pytest.approx(2 * rate, rel=0.05)
    # the server took DELAY_S per request, so no latency can be shorter, and at 1/5 of the 4 connections'
    # capacity most are not much longer
    latency = result["latency_ms"]
    assert DELAY_S * 1000 <= latency["p50"] < DELAY_S * 1000 + 15
    assert result["service_ms"]["p50"] >= DELAY_S * 1000
    assert result["send_lateness_ms"]["p50"] < 2


def test_the_c_client_opens_connections_when_every_one_is_busy(server: tuple[str, list[bytes]], tmp_path: Path) -> None:
    """Open loop: 1 connection cannot carry 400 requests/s of 5 ms each, so the client opens more, up to the cap."""
    if loadgen.openloop_binary()[0] is None:
        pytest.skip(loadgen.openloop_binary()[1])
    url, _ = server
    pool, _ = _pool(tmp_path)
    result = loadgen.run_client(
        url, pool, rate=400, duration_s=1.0, warmup_s=0.2, connections=1, max_connections=6, client="c"
    )
    assert result["errors"] == 0
    assert 1 < result["connections_used"] <= 6
    assert result["rps"] == pytest.approx(400, rel=0.05)


def test_the_c_client_replaces_connections_the_server_closes(server: tuple[str, list[bytes]], tmp_path: Path) -> None:
    """A server may close an idle keep-alive connection (uvicorn does after 5 s): not an error, the client opens
    another. Here the server closes every connection after its answer."""
    if loadgen.openloop_binary()[0] is None:
        pytest.skip(loadgen.openloop_binary()[1])
    url, received = server
    _Handler.close_after = True
    try:
        pool, _ = _pool(tmp_path)
        result = loadgen.run_client(url, pool, rate=100, duration_s=1.0, warmup_s=0.0, connections=2, client="c")
    finally:
        _Handler.close_after = False
    assert result["errors"] == 0, result["error_samples"]
    assert result["ok"] == result["requests"] == pytest.approx(100, abs=2)
    assert result["connections_used"] >= result["requests"]


def test_the_c_client_reports_a_server_that_goes_away(tmp_path: Path) -> None:
    if loadgen.openloop_binary()[0] is None:
        pytest.skip(loadgen.openloop_binary()[1])
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def close_each() -> None:  # accept, read a little, hang up: no answer ever
        for _ in range(8):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(100)
            conn.close()

    threading.Thread(target=close_each, daemon=True).start()
    pool, _ = _pool(tmp_path)
    try:
        result = loadgen.run_client(
            f"http://127.0.0.1:{port}/v1/events", pool, rate=50, duration_s=1.0, warmup_s=0.0, connections=2, client="c"
        )
    finally:
        listener.close()
    assert result["errors"] >= 1
    assert any("connection lost" in e for e in result["error_samples"])
    assert result["ok"] == 0


def test_ingest_ratio_baseline_is_interpolated_between_the_bare_slices_around_each_gateway_slice() -> None:
    """The box's speed drifts: each gateway slice is compared with the bare rate at its own time."""
    from abstream.bench.ingest import bare_at, median_slice

    bare = [{"t_mid": 10.0, "events_per_s": 40_000.0}, {"t_mid": 20.0, "events_per_s": 60_000.0}]
    bare.append({"t_mid": 30.0, "events_per_s": 60_000.0})
    assert bare_at(bare, 10.0) == 40_000.0
    assert bare_at(bare, 12.5) == pytest.approx(45_000.0)
    assert bare_at(bare, 15.0) == pytest.approx(50_000.0)
    assert bare_at(bare, 25.0) == pytest.approx(60_000.0)
    assert bare_at(bare, 5.0) == 40_000.0  # outside the bare slices: the nearest one
    assert bare_at(bare, 35.0) == 60_000.0
    slices = [{"ratio": 2.5}, {"ratio": 1.9}, {"ratio": 2.2}, {"ratio": 3.0}]
    assert median_slice(slices[:3])["ratio"] == 2.2
    assert median_slice(slices)["ratio"] == 2.2  # even count: the lower middle one

"""Load processes of the end-to-end benchmarks (``abstream bench ingest``, ``abstream bench assign``), and the
one namespace those commands use (``loadgen.<name>``) for the rest of the benchmark toolkit.

Load processes, never the benchmark's own process:

- ``wrk`` (closed loop: as fast as N connections go) with ``wrk/events.lua``, which replays a pool file;
- **open loop at a fixed rate**, each request's latency counted from its *scheduled* send time, so a stalled
  server cannot hide its queue by slowing the client down (no coordinated omission, as wrk2 does it):
  ``openloop.c``, compiled on first use with the system's C compiler into ``~/.cache/abstream``, or, without
  one, the asyncio client (``python -m abstream.bench.http_client``), the same schedule and accounting
  at ~1.5-2.5x the CPU per request (at 1,168 requests/s: 19-21% of a core against 8-15%), taken from the server it
  measures on a small box. The asyncio client with ``--rate 0`` is a closed loop, the fallback for wrk.

The toolkit, one job per module (re-exported here, see ``__all__``):

- ``payloads``: realistic request bodies and the pool files (``<length>\\n`` then the body) that carry them;
- ``stack``: :func:`private_stack`, a broker and a gateway of our own on free ports, stopped on every exit;
- ``http_client``: the asyncio load client (and ``run_async``, asyncio on uvloop);
- ``cpu``: CPU metering of a run and waiting for a quiet machine;
- ``report``: percentiles, a run's result, the table printer, results as JSON;
- ``profiling``: py-spy profiles of the gateway; ``procs``: child processes that die with the benchmark.
"""

from __future__ import annotations

import array
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from abstream.bench.cpu import CpuMeter, add_quiet_args, measured_run, wait_for_quiet
from abstream.bench.http_client import http_requests, run_async
from abstream.bench.payloads import (
    gzip_all,
    iso_ms,
    make_assignment_bodies,
    make_v1_payload,
    make_v1_payloads,
    read_pool,
    v1_body,
    write_pool,
)
from abstream.bench.procs import run_process
from abstream.bench.profiling import py_spy, py_spy_path
from abstream.bench.report import (
    client_summary,
    failures,
    latency_summary,
    machine,
    percentile,
    print_table,
    write_json,
)
from abstream.bench.stack import PrivateStack, private_stack, stop_on_sigterm

__all__ = [
    "OPENLOOP_C",
    "WRK_INSTALL",
    "WRK_LUA",
    "CpuMeter",
    "LoadSpec",
    "PrivateStack",
    "add_quiet_args",
    "client_summary",
    "failures",
    "gzip_all",
    "http_requests",
    "iso_ms",
    "latency_summary",
    "machine",
    "make_assignment_bodies",
    "make_v1_payload",
    "make_v1_payloads",
    "measured_run",
    "openloop_binary",
    "percentile",
    "print_table",
    "private_stack",
    "py_spy",
    "py_spy_path",
    "read_pool",
    "run_async",
    "run_client",
    "run_process",
    "run_wrk",
    "stop_on_sigterm",
    "v1_body",
    "wait_for_quiet",
    "wrk_path",
    "write_json",
    "write_pool",
]

WRK_INSTALL = "apt-get install -y wrk"
WRK_LUA = Path(__file__).resolve().parent / "wrk" / "events.lua"


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(
    url: str,
    pool: Path,
    *,
    gzip_bodies: bool,
    duration_s: float,
    threads: int,
    connections: int,
    wrk: str = "wrk",
) -> dict[str, Any]:
    """Closed loop: ``connections`` keep-alive connections posting pool bodies as fast as answers come."""
    env = {
        "ABSTREAM_WRK_POOL": str(pool),
        "ABSTREAM_WRK_GZIP": "1" if gzip_bodies else "0",
        "ABSTREAM_WRK_THREADS": str(threads),
    }
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_LUA),
        url,
    ]
    out = run_process(argv, env, timeout=duration_s + 60)
    for line in out.splitlines():
        if line.startswith("ABSTREAM_WRK_JSON "):
            data: dict[str, Any] = orjson.loads(line.split(" ", 1)[1])
            data["client"] = f"wrk -t{threads} -c{connections}"
            return data
    raise RuntimeError(f"wrk printed no result line:\n{out}")


OPENLOOP_C = Path(__file__).resolve().parent / "openloop.c"


@functools.cache
def openloop_binary() -> tuple[str | None, str]:
    """The C fixed-rate client, compiled once per source version: ``(path, "")``, or ``(None, why not)``."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc) found"
    digest = hashlib.sha256(OPENLOOP_C.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "abstream"
    binary = cache / f"openloop-{digest}"
    if binary.exists():
        return str(binary), ""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return None, f"cannot create {cache} for the C load client: {exc.strerror}"
    tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    proc = subprocess.run([cc, "-O2", "-o", str(tmp), str(OPENLOOP_C), "-lm"], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        return None, f"{cc} could not build {OPENLOOP_C.name}: {proc.stderr.strip()[-300:]}"
    os.replace(tmp, binary)
    return str(binary), ""


@dataclass(frozen=True)
class LoadSpec:
    """What a load run offers: ``rate`` requests/s (0: closed loop, as fast as answers come) for ``duration_s``
    after ``warmup_s``, over ``connections`` (the fixed-rate clients open more, up to ``max_connections``, when
    none is idle at a request's time)."""

    rate: float
    duration_s: float
    warmup_s: float
    connections: int
    max_connections: int = 512
    gzip_bodies: bool = False
    expect_events: bool = True


def run_client(
    url: str,
    pool: Path,
    *,
    rate: float,
    duration_s: float,
    warmup_s: float,
    connections: int,
    gzip_bodies: bool = False,
    expect_events: bool = True,
    client: str = "auto",
    max_connections: int = 512,
) -> dict[str, Any]:
    """A load process replaying ``pool`` against ``url``: at a fixed ``rate`` the C client when it builds
    (``client="auto"``; ``"c"`` insists on it, ``"python"`` takes the asyncio client), else the asyncio client."""
    spec = LoadSpec(rate, duration_s, warmup_s, connections, max_connections, gzip_bodies, expect_events)
    if rate > 0 and client != "python":
        binary, why_not = openloop_binary()
        if binary is not None:
            return _run_openloop(binary, url, pool, spec)
        if client == "c":
            raise RuntimeError(f"the C load client is not available: {why_not}")
        print(f"note: {why_not}; using the asyncio load client (more CPU per request)", file=sys.stderr)
    return _run_asyncio_client(url, pool, spec)


def _run_asyncio_client(url: str, pool: Path, spec: LoadSpec) -> dict[str, Any]:
    argv = [sys.executable, "-m", "abstream.bench.http_client", url, str(pool)]
    argv += ["--rate", str(spec.rate), "--duration", str(spec.duration_s), "--warmup", str(spec.warmup_s)]
    argv += ["--connections", str(spec.connections), "--max-connections", str(spec.max_connections)]
    if spec.gzip_bodies:
        argv.append("--gzip")
    if not spec.expect_events:
        argv.append("--no-events")
    out = run_process(argv, timeout=spec.warmup_s + spec.duration_s + 120)
    return dict(orjson.loads(out.strip().splitlines()[-1]))


def _run_openloop(binary: str, url: str, pool: Path, spec: LoadSpec) -> dict[str, Any]:
    host, port, requests = http_requests(url, read_pool(pool), spec.gzip_bodies)
    requests_file = write_pool(pool.with_name(pool.name + ".http"), requests)
    samples_file = pool.with_name(pool.name + ".samples")
    argv = [binary, host, str(port), str(requests_file), repr(spec.rate), repr(spec.duration_s), repr(spec.warmup_s)]
    argv += [str(spec.connections), str(spec.max_connections), str(samples_file)]
    try:
        out = orjson.loads(run_process(argv, timeout=spec.warmup_s + spec.duration_s + 120).strip().splitlines()[-1])
        samples = array.array("d")
        samples.frombytes(samples_file.read_bytes())
    finally:
        requests_file.unlink(missing_ok=True)
        samples_file.unlink(missing_ok=True)
    statuses = {int(code): n for code, n in out["status"].items()}
    if out["other_status"]:
        statuses[0] = statuses.get(0, 0) + out["other_status"]
    return client_summary(
        client=f"C open loop, {spec.connections}..{spec.max_connections} connections",
        rate=spec.rate,
        duration_s=spec.duration_s,
        warmup_s=spec.warmup_s,
        count_events=spec.expect_events,
        latencies=list(samples[0::3]),
        service=list(samples[1::3]),
        lateness=list(samples[2::3]),
        statuses=statuses,
        error_samples=out["error_samples"],
        error_count=out["errors"],
        measure_from=out["measure_from"],
        last_done=out["last_done"],
        queued=out["queued"],
        connections_used=out["connections_used"],
        accepted=out["accepted"],
        duplicates=out["duplicates"],
    )

"""Shared helpers of the end-to-end benchmarks (``abstream bench ingest``, ``abstream bench assign``).

* Realistic request bodies, generated before any clock starts and written to a *pool file* (``<length>\\n``
  then the body, repeated) that the load process only replays: no JSON work while it measures.
* :func:`private_stack`: an embedded broker (tansu) and an ``abstream gateway`` process on free ports with a
  unique topic prefix; both are stopped when the block ends, on an error, on Ctrl-C and on SIGTERM (and they
  get SIGTERM from the kernel if this process dies without cleaning up).
* Load processes, never the benchmark's own process:
  - ``wrk`` (closed loop: as fast as N connections go) with ``wrk/events.lua``, which replays a pool file;
  - **open loop at a fixed rate**, each request's latency counted from its *scheduled* send time, so a stalled
    server cannot hide its queue by slowing the client down (no coordinated omission, as wrk2 does it):
    ``openloop.c``, compiled on first use with the system's C compiler into ``~/.cache/abstream``, or, without
    one, this module's asyncio client (``python -m abstream.bench.loadgen``), the same schedule and accounting
    at ~1.5-2.5x the CPU per request (at 1,168 requests/s: 19-21% of a core against 8-15%), taken from the server it
    measures on a small box. The asyncio client with ``--rate 0`` is a closed loop, the fallback for wrk.
* Percentiles, results as JSON, and the table printer.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import functools
import gc
import gzip
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from abstream.config import Settings
from abstream.devstack.broker import die_with_parent

WRK_INSTALL = "apt-get install -y wrk"
WRK_LUA = Path(__file__).resolve().parent / "wrk" / "events.lua"

# ------------------------------------------------------------------------------------------ bodies

_PLATFORMS = ("ios", "android")
_APP_VERSIONS = ("1.4.2", "1.4.1", "1.5.0", "1.3.9")
_LOCALES = ("en-US", "en-GB", "de-DE", "fr-FR", "pt-BR", "ja-JP")
_ZONES = ("Europe/Berlin", "America/New_York", "America/Sao_Paulo", "Asia/Tokyo", "Europe/London")
_SCREENS = ("home", "workout_list", "workout_player", "creature_detail", "shop", "achievements", "settings")
_CREATURES = ("sprout", "ember", "pebble", "drizzle", "zephyr")
_EVENT_WEIGHTS = (
    ("screen_viewed", 30),
    ("button_tapped", 20),
    ("workout_started", 10),
    ("workout_completed", 8),
    ("creature_fed", 8),
    ("app_opened", 6),
    ("achievement_unlocked", 4),
    ("session_submitted", 6),
    ("notification_opened", 4),
    ("purchase_completed", 2),
    ("$pageview", 2),
)
_EVENT_NAMES = tuple(n for n, _ in _EVENT_WEIGHTS)
_EVENT_W = tuple(w for _, w in _EVENT_WEIGHTS)


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _properties(rng: random.Random, name: str, seq: int) -> dict[str, Any]:
    screen = rng.choice(_SCREENS)
    if name in ("workout_started", "workout_completed"):
        props: dict[str, Any] = {
            "screen": "workout_player",
            "workout_id": f"w_{rng.randint(1, 4000):05d}",
            "difficulty": rng.choice(("easy", "medium", "hard")),
            "duration_ms": rng.randint(60_000, 2_400_000),
            "calories": rng.randint(20, 600),
        }
        if name == "workout_completed":
            props["score"] = round(rng.random() * 100, 2)
    elif name == "creature_fed":
        props = {
            "screen": "creature_detail",
            "creature": rng.choice(_CREATURES),
            "food": "berry",
            "level": rng.randint(1, 40),
        }
    elif name == "purchase_completed":
        props = {"screen": "shop", "sku": f"gems_{rng.choice((100, 500, 1200))}", "price": 4.99, "currency": "USD"}
    elif name == "button_tapped":
        props = {
            "screen": screen,
            "button": rng.choice(("start", "next", "close", "share", "feed")),
            "position": seq % 7,
        }
    else:
        props = {"screen": screen, "referrer": rng.choice(_SCREENS), "load_ms": rng.randint(40, 1800)}
    props["seq"] = seq
    return props


def make_v1_payload(rng: random.Random, now_ms: int, user: str, n_events: int) -> dict[str, Any]:
    """One Calicritters ``POST /v1/events`` body: one user's session, ``n_events`` of ~300 bytes each."""
    platform = rng.choice(_PLATFORMS)
    start = now_ms - rng.randint(5_000, 240_000)
    events = []
    for seq in range(n_events):
        name = rng.choices(_EVENT_NAMES, weights=_EVENT_W)[0]
        events.append(
            {
                "event_name": name,
                "occurred_at": iso_ms(start + seq * rng.randint(200, 4000)),
                "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "properties": _properties(rng, name, seq),
                "context": {
                    "locale": rng.choice(_LOCALES),
                    "timezone": rng.choice(_ZONES),
                    "network": rng.choice(("wifi", "cellular")),
                    "os_version": "17.4" if platform == "ios" else "14",
                },
            }
        )
    return {
        "anonymous_user_id": user,
        "session_id": f"s_{rng.getrandbits(48):012x}",
        "platform": platform,
        "app_version": rng.choice(_APP_VERSIONS),
        "install_id": f"i_{rng.getrandbits(48):012x}",
        "sent_at": iso_ms(now_ms - rng.randint(0, 2000)),
        "events": events,
    }


def make_v1_payloads(n_requests: int, n_events: int, seed: int = 42) -> list[dict[str, Any]]:
    """``n_requests`` bodies from a population of ``n_requests // 3`` users (users come back, as they do)."""
    rng = random.Random(seed)
    now_ms = time.time_ns() // 1_000_000
    users = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(max(1, n_requests // 3))]
    return [make_v1_payload(rng, now_ms, rng.choice(users), n_events) for _ in range(n_requests)]


def v1_body(payload: dict[str, Any], tag: str) -> bytes:
    """The body with the user id suffixed by ``tag``: another ``tag`` gives other dedup keys (user, event_id),
    so each run posts events the gateway's dedup cache has not seen (it would skip publishing them)."""
    return orjson.dumps({**payload, "anonymous_user_id": f"{payload['anonymous_user_id']}.{tag}"})


def make_assignment_bodies(n: int, seed: int = 7) -> list[bytes]:
    """Distinct users asking ``POST /v1/assignment`` the way the Calicritters app does at launch."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        platform = rng.choice(_PLATFORMS)
        out.append(
            orjson.dumps(
                {
                    "anonymous_user_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "platform": platform,
                    "app_version": rng.choice(_APP_VERSIONS),
                    "session_id": f"s_{rng.getrandbits(48):012x}",
                    "install_id": f"i_{rng.getrandbits(48):012x}",
                }
            )
        )
    return out


def write_pool(path: Path, bodies: Sequence[bytes]) -> Path:
    with open(path, "wb") as f:
        for body in bodies:
            f.write(b"%d\n" % len(body))
            f.write(body)
    return path


def read_pool(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        n = int(data[pos:nl])
        out.append(data[nl + 1 : nl + 1 + n])
        pos = nl + 1 + n
    return out


def gzip_all(bodies: Sequence[bytes], level: int = 6) -> list[bytes]:
    return [gzip.compress(b, level, mtime=0) for b in bodies]


# ---------------------------------------------------------------------------------------- figures


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return float(sorted_values[rank - 1])


def failures(result: dict[str, Any]) -> int:
    """Requests that did not end in a 200 (wrk's or the asyncio client's result)."""
    if isinstance(result.get("errors"), dict):  # wrk: socket errors plus non-200 answers
        return int(sum(result["errors"].values()) - result["errors"].get("status", 0) + result.get("non_200", 0))
    return int(result["requests"] - result["ok"] + result["errors"])


def latency_summary(values_ms: list[float]) -> dict[str, float]:
    values = sorted(values_ms)
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "p999": percentile(values, 99.9),
        "max": values[-1] if values else 0.0,
        "mean": sum(values) / len(values) if values else 0.0,
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}


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


# ------------------------------------------------------------------------------------ the stack


_PREEXEC = die_with_parent if sys.platform.startswith("linux") else None


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C inside the block, so ``finally`` clauses stop every child."""

    def _raise(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class PrivateStack:
    settings: Settings
    gateway_url: str
    work_dir: Path
    children: list[Any] = field(default_factory=list)

    @property
    def gateway_pid(self) -> int:
        return int(self.children[-1].proc.pid)

    def pids(self) -> dict[str, int]:
        return {child.name: int(child.proc.pid) for child in self.children}

    def check_alive(self) -> None:
        for child in self.children:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited (code {child.proc.returncode}); see {child.log_path}")


@contextlib.contextmanager
def private_stack(gateway: bool = True, keep_dir: bool = False, gateway_workers: int = 1) -> Iterator[PrivateStack]:
    """A broker and a gateway of our own on free ports; everything is stopped when the block ends.

    ``gateway_workers`` > 1 runs the gateway as in production on several cores: uvicorn server processes
    sharing the port (ABSTREAM_GATEWAY_WORKERS); ``gateway_pid`` is then their parent.

    ClickHouse is deliberately absent (CLICKHOUSE_URL points at a closed port): the gateway never writes it,
    and its registry only tries it, best effort, to restore experiments when the topic is empty.
    """
    from abstream.devstack.broker import broker_command, kafka_answers
    from abstream.devstack.ports import free_port, port_open
    from abstream.devstack.supervisor import Child, abstream_argv, http_ok, wait_healthy

    work_dir = Path(tempfile.mkdtemp(prefix="abstream-bench-stack-"))
    host = "127.0.0.1"
    broker_port, gateway_port, nowhere = free_port(), free_port(), free_port()
    settings = Settings.from_env(
        kafka_bootstrap_servers=f"{host}:{broker_port}",
        broker_port=broker_port,
        gateway_host=host,
        gateway_port=gateway_port,
        clickhouse_url=f"http://default:@{host}:{nowhere}",
        kafka_topic_prefix=f"bench{uuid.uuid4().hex[:8]}.",
        log_level="WARNING",
        admin_token="",
        data_dir=str(work_dir),
        gateway_workers=gateway_workers,
    )
    bootstrap = settings.kafka_bootstrap_servers
    broker = Child(
        "broker",
        broker_command(host, broker_port),
        f"kafka://{bootstrap}",
        lambda: port_open(host, broker_port) and asyncio.run(kafka_answers(bootstrap)),
        log_path=work_dir / "broker.log",
    )
    stack = PrivateStack(settings, f"http://{host}:{gateway_port}", work_dir, [broker])
    ok = False
    with stop_on_sigterm():
        try:
            broker.start({})
            wait_healthy(broker, 30)
            if gateway:
                gw = Child(
                    "gateway",
                    abstream_argv("gateway", "--port", str(gateway_port)),
                    stack.gateway_url,
                    lambda: http_ok(f"{stack.gateway_url}/health/ready"),
                    log_path=work_dir / "gateway.log",
                )
                stack.children.append(gw)
                gw.start(settings.as_env())
                wait_healthy(gw, 60)
            yield stack
            ok = True
        finally:
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                for child in reversed(stack.children):
                    child.stop()
            finally:
                signal.signal(signal.SIGINT, old_int)
            if ok and not keep_dir:
                shutil.rmtree(work_dir, ignore_errors=True)
            else:
                for pool in work_dir.glob("*.bin"):  # request pools: large, and rebuilt by every run
                    pool.unlink(missing_ok=True)
                print(f"(logs of the stack kept in {work_dir})", file=sys.stderr)


# --------------------------------------------------------------------------------- load processes


def run_process(argv: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    """Run a load process to completion and return its stdout; it is killed if we are interrupted."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        preexec_fn=_PREEXEC,  # noqa: PLW1509
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
    argv = [sys.executable, "-m", "abstream.bench.loadgen", url, str(pool)]
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


def client_summary(
    *,
    client: str,
    rate: float,
    duration_s: float,
    warmup_s: float,
    count_events: bool,
    latencies: list[float],
    service: list[float],
    lateness: list[float],
    statuses: dict[int, int],
    error_samples: list[str],
    error_count: int,
    measure_from: float,
    last_done: float,
    queued: int,
    connections_used: int,
    accepted: int,
    duplicates: int,
) -> dict[str, Any]:
    """One run's result, the same shape from either fixed-rate client (and the asyncio closed loop)."""
    n = len(latencies)
    elapsed = (last_done - measure_from) if n else 0.0
    if rate <= 0:
        elapsed = duration_s
    ok = statuses.get(200, 0)
    out: dict[str, Any] = {
        "client": client,
        "mode": "fixed" if rate > 0 else "closed",
        "offered_rps": rate if rate > 0 else None,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "requests": n,
        "ok": ok,
        "status": {str(k): v for k, v in sorted(statuses.items())},
        "errors": error_count,
        "error_samples": error_samples[:5],
        "elapsed_s": elapsed,
        "rps": ok / elapsed if elapsed else 0.0,
        "latency_ms": latency_summary(latencies),
        "service_ms": latency_summary(service),
        "send_lateness_ms": latency_summary(lateness),
        "requests_due_with_no_idle_connection": queued,
        "connections_used": connections_used,
    }
    if count_events:
        out["accepted_events"] = accepted
        out["duplicates"] = duplicates
        # published events only: a duplicate is answered "accepted" but not sent to Kafka again
        out["events_per_s"] = (accepted - duplicates) / elapsed if elapsed else 0.0
    return out


def py_spy_path() -> str:
    """py-spy on PATH, else beside this interpreter (the project's venv, where ``pip install py-spy`` puts it)."""
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


@contextlib.contextmanager
def py_spy(pid: int, path: str | None, duration_s: float) -> Iterator[None]:
    """Record a flame graph (``.svg``) or collapsed stacks (``.txt``) of ``pid`` while the block runs."""
    if not path:
        yield
        return
    exe = py_spy_path()
    if not Path(exe).exists():
        print("py-spy is not installed (.venv/bin/pip install py-spy); no profile recorded", file=sys.stderr)
        yield
        return
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))), "-o", path]
    argv += ["--nonblocking", "--subprocesses"]  # uvicorn's server processes too, with ABSTREAM_GATEWAY_WORKERS
    if path.endswith(".txt"):
        argv += ["--format", "raw"]  # collapsed stacks: easy to sum self time per function
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_PREEXEC)  # noqa: PLW1509
    try:
        yield
        proc.wait(timeout=30)
        print(f"profile of the gateway (pid {pid}) written to {path}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------- the asyncio HTTP client


TICK_S = 0.001


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; parses responses with Content-Length (all the gateway sends)."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: Any = None
        self.buf = bytearray()
        self.need = -1
        self.body_at = 0
        self.status = 0
        self.scheduled = 0.0
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self, request: bytes, scheduled: float) -> None:
        self.scheduled = scheduled
        self.sent = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while buf:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                self.status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    self.client.fail(self, "response without Content-Length")
                    return
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop > 0 else len(head)])
                self.body_at = end + 4
                self.need = self.body_at + length
            if len(buf) < self.need:
                return
            body = bytes(buf[self.body_at : self.need])
            del buf[: self.need]
            self.need = -1
            self.client.done(self, self.status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self, exc)


class _Client:
    """Open loop at ``rate`` requests/s (``rate == 0``: closed loop, every connection sends back to back)."""

    def __init__(self, args: argparse.Namespace, requests: list[bytes]) -> None:
        self.args = args
        self.requests = requests
        self.next_request = 0
        self.idle: deque[_Conn] = deque()
        self.pending: deque[float] = deque()
        self.in_flight = 0
        self.measure_from = 0.0
        self.measure_until = float("inf")
        self.latencies: list[float] = []
        self.service: list[float] = []
        self.lateness: list[float] = []
        self.statuses: dict[int, int] = {}
        self.accepted = 0
        self.duplicates = 0
        self.errors: list[str] = []
        self.first_done = 0.0
        self.last_done = 0.0
        self.stopping = False
        self.all_done = asyncio.Event()
        self.queued = 0
        self.conns: list[_Conn] = []
        self.connecting = 0
        self.tasks: set[asyncio.Future[None]] = set()

    def _request(self) -> bytes:
        req = self.requests[self.next_request]
        self.next_request = (self.next_request + 1) % len(self.requests)
        return req

    def pump(self) -> None:
        while self.pending and self.idle:
            conn = self.idle.popleft()
            self.in_flight += 1
            conn.send(self._request(), self.pending.popleft())
        # Open loop: a request due while every connection is busy gets a new connection (as many independent
        # clients would have), up to --max-connections; past that it waits, and the wait counts.
        want = min(len(self.pending) - self.connecting, self.args.max_connections - len(self.conns) - self.connecting)
        for _ in range(max(0, want)):
            self.connecting += 1
            task = asyncio.ensure_future(self._connect())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _connect(self) -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _Conn(self), self.args.host, self.args.port
            )
        except OSError as exc:
            self.errors.append(f"connect: {exc}")
            return
        finally:
            self.connecting -= 1
        self.conns.append(conn)
        self.idle.append(conn)
        self.pump()

    def done(self, conn: _Conn, status: int, body: bytes) -> None:
        now = time.perf_counter()
        self.in_flight -= 1
        if self.measure_from <= conn.scheduled < self.measure_until:
            # From the scheduled time when the request left late (the wait is the server's doing, or ours:
            # send_lateness_ms tells), from the actual send when a tick released it up to 0.5 ms early.
            self.latencies.append((now - min(conn.scheduled, conn.sent)) * 1000)
            self.service.append((now - conn.sent) * 1000)
            self.lateness.append((conn.sent - conn.scheduled) * 1000)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if not self.first_done:
                self.first_done = now
            self.last_done = now
            if status == 200 and self.args.events:
                self.accepted += _int_after(body, b'"accepted":')
                self.duplicates += _int_after(body, b'"duplicates":')
        if self.args.rate <= 0:  # closed loop
            if not self.stopping:
                self.in_flight += 1
                conn.send(self._request(), time.perf_counter())
                return
        else:
            self.idle.append(conn)
            self.pump()
        if self.stopping and self.in_flight == 0 and not self.pending:
            self.all_done.set()

    def fail(self, conn: _Conn, why: str) -> None:
        self.errors.append(why)
        if conn.transport is not None:
            conn.transport.abort()

    def lost(self, conn: _Conn, exc: Exception | None) -> None:
        if not self.stopping:
            self.errors.append(f"connection lost: {exc}")
            self.stopping = True
            self.all_done.set()

    async def run(self) -> dict[str, Any]:
        a = self.args
        loop = asyncio.get_running_loop()
        for _ in range(a.connections):
            _, conn = await loop.create_connection(lambda: _Conn(self), a.host, a.port)
            self.conns.append(conn)
        self.idle.extend(self.conns)
        start = time.perf_counter() + 0.02
        self.measure_from = start + a.warmup
        self.measure_until = self.measure_from + a.duration
        total_s = a.warmup + a.duration
        try:
            if a.rate > 0:
                await self._open_loop(start, total_s)
            else:
                await asyncio.sleep(max(0.0, start - time.perf_counter()))
                for conn in list(self.idle):
                    self.in_flight += 1
                    conn.send(self._request(), time.perf_counter())
                self.idle.clear()
                await asyncio.sleep(total_s)
            self.stopping = True
            if self.in_flight or self.pending:
                try:
                    await asyncio.wait_for(self.all_done.wait(), 15)
                except TimeoutError:
                    self.errors.append(f"{self.in_flight + len(self.pending)} requests unanswered after 15 s")
        finally:
            for conn in self.conns:
                if conn.transport is not None:
                    conn.transport.close()
        return self.summary()

    async def _open_loop(self, start: float, total_s: float) -> None:
        """Release every request whose scheduled time is within half a tick; sleep a tick (1 ms, the event
        loop's timer resolution: shorter sleeps spin and starve the server of CPU on a small box)."""
        rate = self.args.rate
        total = int(rate * total_s)
        half_tick = TICK_S / 2
        i = 0
        while i < total and not self.stopping:
            due = min(total, int((time.perf_counter() + half_tick - start) * rate) + 1)
            if due > i:
                if not self.idle:
                    self.queued += due - i
                self.pending.extend(start + k / rate for k in range(i, due))
                i = due
                self.pump()
            await asyncio.sleep(max(TICK_S, start + i / rate - time.perf_counter() - half_tick))

    def summary(self) -> dict[str, Any]:
        a = self.args
        return client_summary(
            client=(
                f"python asyncio, open loop, {a.connections}..{a.max_connections} connections"
                if a.rate > 0
                else f"python asyncio, closed loop, {a.connections} connections"
            ),
            rate=a.rate,
            duration_s=a.duration,
            warmup_s=a.warmup,
            count_events=a.events,
            latencies=self.latencies,
            service=self.service,
            lateness=self.lateness,
            statuses=self.statuses,
            error_samples=self.errors,
            error_count=len(self.errors),
            measure_from=self.measure_from,
            last_done=self.last_done,
            queued=self.queued,
            connections_used=len(self.conns),
            accepted=self.accepted,
            duplicates=self.duplicates,
        )


def _int_after(body: bytes, marker: bytes) -> int:
    at = body.find(marker)
    if at < 0:
        return 0
    at += len(marker)
    end = at
    while end < len(body) and 48 <= body[end] <= 57:
        end += 1
    return int(body[at:end] or 0)


def http_requests(url: str, bodies: Sequence[bytes], gzip_bodies: bool) -> tuple[str, int, list[bytes]]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        + ("Content-Encoding: gzip\r\n" if gzip_bodies else "")
    ).encode()
    return host, port, [head + b"Content-Length: %d\r\n\r\n" % len(b) + b for b in bodies]


def run_async(coro: Any) -> Any:
    """asyncio.run on uvloop (as uvicorn runs the gateway) when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    """The load process: replay a pool file against a URL; print one JSON line of results."""
    parser = argparse.ArgumentParser(prog="python -m abstream.bench.loadgen", description=main.__doc__)
    parser.add_argument("url", help="e.g. http://127.0.0.1:20000/v1/events")
    parser.add_argument("pool", type=Path, help="pool file of request bodies (see write_pool)")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s, open loop (0: closed loop)")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--connections", type=int, default=64, help="connections opened up front")
    parser.add_argument(
        "--max-connections", type=int, default=512, help="open loop: more connections when all are busy, up to this"
    )
    parser.add_argument("--gzip", action="store_true", help="bodies are gzip: send Content-Encoding: gzip")
    parser.add_argument("--no-events", dest="events", action="store_false", help="do not count accepted events")
    args = parser.parse_args(argv)
    args.host, args.port, requests = http_requests(args.url, read_pool(args.pool), args.gzip)
    gc.collect()
    gc.freeze()
    gc.disable()  # a collection pause would be charged to the server's latency
    try:
        result = run_async(_Client(args, requests).run())
    except KeyboardInterrupt:
        return 130
    print(orjson.dumps(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

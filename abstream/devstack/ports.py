"""Port checks shared by the embedded stack commands: a busy port is a one-line error, not a traceback."""

from __future__ import annotations

import socket


class PortBusyError(RuntimeError):
    """A port the embedded stack wants is taken; the message names the port and the flag to change it."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_port_free(host: str, port: int, what: str, flag: str) -> None:
    """Raise PortBusyError if something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortBusyError(
                f"port {port} on {host} is busy, so the {what} cannot start: free it or choose another with {flag}"
            ) from exc


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False

"""A TCP proxy in front of the broker, for the broker outage of ``abstream chaos``.

``python -m abstream.chaos.proxy LISTEN_PORT TARGET_PORT``: SIGUSR1 cuts (every connection reset, the
listening socket closed, so new connections are refused, as with a stopped broker); SIGUSR2 listens again.

Why a cut and not a stopped broker: the embedded broker (tansu) keeps its log in memory, so stopping it loses
every topic, which is a disk failure, not an outage. Apache Kafka keeps its log on disk; what its clients see
of a stop is what they see here: connections reset, refused for a while, then the same log again. tansu
advertises this proxy's address, so every client (gateway, workers, the group coordinator) goes through it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

CHUNK = 1 << 16


class Proxy:
    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.listen_port = listen_port
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()

    async def listen(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._client, self.host, self.listen_port, reuse_address=True)

    def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.open):
            sock = writer.get_extra_info("socket")
            if sock is not None:  # RST, not FIN: what a dead broker's peer sees
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()
        self.open.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.open.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self.open.discard(writer)
        self.open.discard(up_writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()


async def serve(listen_port: int, target_port: int) -> None:
    proxy = Proxy(listen_port, target_port)
    await proxy.listen()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, proxy.cut)
    loop.add_signal_handler(signal.SIGUSR2, lambda: loop.create_task(proxy.listen()))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    proxy.cut()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not all(a.isdigit() for a in args):
        print("usage: python -m abstream.chaos.proxy LISTEN_PORT TARGET_PORT", file=sys.stderr)
        return 2
    asyncio.run(serve(int(args[0]), int(args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

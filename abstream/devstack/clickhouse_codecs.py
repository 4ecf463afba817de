"""Bodies on the wire: request bodies in a Content-Encoding (several back-to-back frames or members, as
clickhouse-connect sends lz4 and zstd inserts), multipart/form-data query fields, and compressed responses.

gzip, deflate, lz4, zstd, xz and bz2 are always available; br only when ``brotli`` is installed (as in
ClickHouse builds without it). ClickHouse's own ``decompress=1`` block framing is not supported.
"""

from __future__ import annotations

import bz2
import email.parser
import email.policy
import gzip
import lzma
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import lz4.frame
import zstandard

from abstream.devstack.clickhouse_errors import (
    BAD_ARGUMENTS,
    CANNOT_DECOMPRESS,
    NOT_IMPLEMENTED,
    UNSUPPORTED_METHOD,
    ClickHouseError,
)

try:  # optional, as in ClickHouse builds without it
    import brotli  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    brotli = None


class _Decompressor(Protocol):
    eof: bool

    @property
    def unused_data(self) -> bytes | None: ...

    def decompress(self, data: bytes) -> bytes: ...


class StreamDecoder:
    """Decode a body made of one or more concatenated frames/members of one codec.

    clickhouse-connect compresses each insert block as its own lz4 (or zstd) frame: decoding only
    the first frame would silently keep the first 131,072 rows of a larger insert.
    """

    def __init__(self, factory: Callable[[], _Decompressor], name: str) -> None:
        self._factory = factory
        self._name = name
        self._current = factory()
        self._pending = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        try:
            while data:
                chunk = self._current.decompress(data)
                if chunk:
                    out.append(chunk)
                self._pending = True
                if self._current.eof:
                    data = self._current.unused_data or b""
                    self._current = self._factory()
                    self._pending = False
                else:
                    data = b""
        except Exception as exc:
            raise ClickHouseError.new(
                CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS", f"Cannot decode {self._name} request body: {exc}"
            ) from None
        return out

    def finish(self) -> None:
        if self._pending:
            raise ClickHouseError.new(
                CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS", f"Truncated {self._name} request body (incomplete frame)"
            )


def _decoder_factory(encoding: str) -> Callable[[], _Decompressor] | None:
    """The incremental decompressor for a Content-Encoding, None for identity."""
    factories: dict[str, Callable[[], Any]] = {
        "gzip": lambda: zlib.decompressobj(wbits=31),
        "x-gzip": lambda: zlib.decompressobj(wbits=31),
        "deflate": lambda: zlib.decompressobj(),
        "lz4": lz4.frame.LZ4FrameDecompressor,
        "zstd": lambda: zstandard.ZstdDecompressor().decompressobj(),
        "xz": lzma.LZMADecompressor,
        "bz2": bz2.BZ2Decompressor,
    }
    if brotli is not None:
        factories["br"] = _BrotliAdapter
    if encoding in ("", "identity", "none"):
        return None
    factory = factories.get(encoding)
    if factory is None:
        raise ClickHouseError.new(
            UNSUPPORTED_METHOD, "UNSUPPORTED_METHOD", f"Unknown Content-Encoding of HTTP request: {encoding}"
        )
    return factory


class _BrotliAdapter:
    """Adapts brotli's Decompressor (no eof/unused_data) to the interface StreamDecoder uses."""

    def __init__(self) -> None:
        self.eof = False
        self.unused_data = b""
        self._decoder = brotli.Decompressor()

    def decompress(self, data: bytes) -> bytes:
        out = self._decoder.process(data)
        self.eof = self._decoder.is_finished()
        return out


def decode_body(chunks: list[bytes], encoding: str) -> list[bytes]:
    """Decompress a request body per its Content-Encoding, keeping it as a list of chunks."""
    factory = _decoder_factory(encoding.strip().lower())
    if factory is None:
        return chunks
    decoder = StreamDecoder(factory, encoding)
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    decoder.finish()
    return out


def parse_multipart(body: bytes, content_type: str) -> dict[str, str]:
    """Plain fields of a multipart/form-data body (query, param_*); files would be external tables."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    fields: dict[str, str] = {}
    if not message.is_multipart():
        raise ClickHouseError.new(BAD_ARGUMENTS, "BAD_ARGUMENTS", "Cannot parse multipart/form-data body")
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        if part.get_filename() is not None:
            raise ClickHouseError.new(
                NOT_IMPLEMENTED,
                "NOT_IMPLEMENTED",
                f"External data (file part {name!r}) is not supported by the embedded endpoint",
            )
        payload = part.get_payload(decode=True)
        fields[name] = payload.decode("utf-8") if isinstance(payload, bytes) else str(payload or "")
    return fields


# ClickHouse's chooseHTTPCompressionMethod order.
_RESPONSE_CODECS = ("zstd", "br", "lz4", "gzip", "deflate")


def choose_response_encoding(accept_encoding: str) -> str | None:
    offered = {item.split(";", 1)[0].strip().lower() for item in accept_encoding.split(",")}
    for codec in _RESPONSE_CODECS:
        if codec in offered and (codec != "br" or brotli is not None):
            return codec
    return None


def compress_response(body: bytes, codec: str, level: int) -> bytes:
    """One frame/stream per response: what clickhouse-connect's decoders expect."""
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(body)
    if codec == "lz4":
        return lz4.frame.compress(body)
    if codec == "gzip":
        return gzip.compress(body, compresslevel=level)
    if codec == "deflate":
        return zlib.compress(body, level)
    if codec == "br" and brotli is not None:
        return brotli.compress(body)
    return body

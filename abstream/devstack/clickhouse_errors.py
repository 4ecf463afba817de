"""ClickHouse-shaped errors of the embedded endpoint: ``Code: N. DB::Exception: ... (NAME)``, the engine's own
codes, and the HTTP status a real server sends for each (clients' retry logic keys on 503/408)."""

from __future__ import annotations

import re

# Error codes the endpoint raises itself (numbers from the engine's errorCodeToName).
UNSUPPORTED_METHOD = 1
BAD_ARGUMENTS = 36
NOT_IMPLEMENTED = 48
SYNTAX_ERROR = 62
UNKNOWN_SETTING = 115
READONLY = 164
CANNOT_DECOMPRESS = 271
SESSION_NOT_FOUND = 372
SESSION_IS_LOCKED = 373
AUTHENTICATION_FAILED = 516
STD_EXCEPTION = 1001

# ClickHouse's exceptionCodeToHTTPStatus (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp): clients
# (and retry logic keyed on 503/408) see the statuses a real server would send.
_STATUS_BY_CODE: dict[int, int] = {194: 401}
_STATUS_BY_CODE.update(dict.fromkeys((192, 193, 497, 512, 516), 403))
_STATUS_BY_CODE.update(
    dict.fromkeys(
        (6, 8, 15, 25, 26, 27, 36, 37, 38, 41, 44, 53, 62, 72, 117, 123, 167, 168, 223, 321, 376, 427, 441, 675, 676),
        400,
    )
)
_STATUS_BY_CODE.update(dict.fromkeys((46, 47, 50, 56, 60, 63, 73, 78, 81, 115, 152, 336, 511), 404))
_STATUS_BY_CODE.update({229: 413, 48: 501, 209: 503, 76: 503, 381: 411, 159: 408, 439: 503, 779: 415})

_CODE_RE = re.compile(r"Code: (\d+)\. ")


class ClickHouseError(Exception):
    """An error to send the way ClickHouse does; carries the engine's code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """Keep the engine's own ``Code: N. DB::Exception: ...`` text, minus chDB's wrapper prefixes."""
        text = str(exc)
        match = _CODE_RE.search(text)
        if match is None:
            return cls(STD_EXCEPTION, f"Code: {STD_EXCEPTION}. DB::Exception: {text or type(exc).__name__}")
        return cls(int(match.group(1)), text[match.start() :])

    @classmethod
    def new(cls, code: int, name: str, text: str) -> ClickHouseError:
        return cls(code, f"Code: {code}. DB::Exception: {text}. ({name})")

    @property
    def status(self) -> int:
        return _STATUS_BY_CODE.get(self.code, 500)

    def body(self, version: str) -> bytes:
        text = self.message.rstrip()
        if "(version " not in text:
            text = f"{text} (version {version})"
        return (text + "\n").encode("utf-8", "replace")


def not_utf8(exc: UnicodeDecodeError) -> ClickHouseError:
    """chDB takes SQL as text: a statement that is not UTF-8 is refused before it reaches the engine."""
    return ClickHouseError.new(BAD_ARGUMENTS, "BAD_ARGUMENTS", f"Query is not valid UTF-8: {exc}")

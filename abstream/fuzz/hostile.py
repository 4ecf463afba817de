"""Hostile requests: each must be refused with its documented status and code, and nothing of it accepted.

Sent over raw sockets (a client library would refuse to send most of them, or fix them on the way): a gzip bomb,
nesting beyond any reader, huge numbers, invalid UTF-8, duplicate keys, a 10 MB header, bodies and heads trickled a
byte at a time, NUL in ids. Each case carries its own user id; once it is answered, a good sentinel event is sent
for the same user, and :func:`prove_nothing_accepted` reads ``event_logs FINAL`` to check that, for every case, the
sentinel arrived and nothing else did: the refusal held end to end, through Kafka and the worker.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from abstream.config import Settings

ANSWER_TIMEOUT_S = 30.0
TRICKLE_EVERY_S = 0.5
"""A trickled request sends one byte this often: ~20 bytes before the gateway's 10 s allowance runs out."""


@dataclass(frozen=True)
class Answer:
    status: int | None
    """None: no answer (reset or closed before a status line)."""
    code: str | None
    """The error's code; for a 200 ingestion answer, the first rejected event's code."""
    accepted: int
    """Events a 200 ingestion answer reports accepted (0 otherwise)."""
    text: str = ""

    def summary(self) -> str:
        return f"{self.status} {self.code}" + (f" ({self.accepted} accepted)" if self.accepted else "")


@dataclass(frozen=True)
class Hostile:
    name: str
    what: str
    status: int
    code: str
    request: Callable[[str], bytes]
    """The request for one user id, as bytes on the wire."""
    trickle: str = ""
    """``"body"``: the head at once, then the body one byte every TRICKLE_EVERY_S; ``"all"``: every byte so."""


@dataclass
class Outcome:
    case: Hostile
    user: str
    answer: Answer
    elapsed_s: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def http(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 request as bytes; Content-Length unless the headers give one, Connection: close."""
    head = {"Host": "gateway", "Content-Type": "application/json", "Connection": "close", **(headers or {})}
    if body and not any(k.lower() == "content-length" for k in head):
        head["Content-Length"] = str(len(body))
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body


def v1_body(user: str, event: str = "", envelope: str = "") -> bytes:
    """A /v1/events body for ``user``: ``event`` is JSON text added to its one event, ``envelope`` to the request."""
    ev = f'{{"event_name":"hostile","occurred_at":"{_now_iso()}"{"," + event if event else ""}}}'
    return f'{{"anonymous_user_id":{json.dumps(user)}{"," + envelope if envelope else ""},"events":[{ev}]}}'.encode()


def _bomb(user: str) -> bytes:
    pack = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = b'{"anonymous_user_id":%s,"events":[' % json.dumps(user).encode()
    spaces = b" " * (1 << 20)
    body = pack.compress(head) + b"".join(pack.compress(spaces) for _ in range(16)) + pack.compress(b"]}")
    body += pack.flush()  # 16 MiB of whitespace in ~16 KiB: ~1,000x
    return http("POST", "/v1/events", body, {"Content-Encoding": "gzip"})


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CASES: tuple[Hostile, ...] = (
    Hostile("gzip_bomb", "16 MiB of gzip'd whitespace in 16 KiB", 413, "compression_ratio_exceeded", _bomb),
    Hostile("declared_huge", "Content-Length: 2 GiB, a few bytes sent", 413, "payload_too_large",
            lambda u: http("POST", "/v1/events", v1_body(u), {"Content-Length": str(2**31)})),
    Hostile("deep_body", "arrays nested 100,000 deep", 400, "malformed_json",
            lambda u: http("POST", "/v1/events", v1_body(u, envelope=f'"x":{_nested(100_000)}'))),
    Hostile("deep_properties", "properties nested 600 deep", 200, "properties_too_deep",
            lambda u: http("POST", "/v1/events", v1_body(u, event='"properties":{"a":' + _nested(600) + "}"))),
    Hostile("huge_integer", "a 100,000-digit integer in properties", 200, "integer_out_of_range",
            lambda u: http("POST", "/v1/events", v1_body(u, event='"properties":{"n":1' + "0" * 100_000 + "}"))),
    Hostile("huge_exponent", "1e999999 in properties", 200, "non_finite_value",
            lambda u: http("POST", "/v1/events", v1_body(u, event='"properties":{"x":1e999999}'))),
    Hostile("huge_number_elsewhere", "a 400-digit integer in an assignment request", 400, "integer_out_of_range",
            lambda u: http("POST", "/v1/assignment",
                           b'{"anonymous_user_id":%s,"n":%s}' % (json.dumps(u).encode(), b"9" * 400))),
    Hostile("invalid_utf8", "bytes FF FE in an event name", 400, "malformed_json",
            lambda u: http("POST", "/v1/events", v1_body(u).replace(b'"hostile"', b'"host\xff\xfeile"'))),
    Hostile("lone_surrogate", "\\ud800 in a property", 400, "malformed_json",
            lambda u: http("POST", "/v1/events", v1_body(u, event='"properties":{"s":"\\ud800"}'))),
    Hostile("duplicate_user", "anonymous_user_id twice, two users", 400, "duplicate_key",
            lambda u: http("POST", "/v1/events", v1_body(u, envelope=f'"anonymous_user_id":{json.dumps(u + "-b")}'))),
    Hostile("duplicate_property", "properties.price twice", 400, "duplicate_key",
            lambda u: http("POST", "/v1/events", v1_body(u, event='"properties":{"price":1,"price":1000}'))),
    Hostile("duplicate_in_batch", "user_id twice in an ArkForge batch event", 400, "duplicate_key",
            lambda u: http("POST", "/apiv1/events/batch", b'[{"event_type":"h","user_id":%s,"user_id":"x"}]'
                           % json.dumps(u).encode())),
    Hostile("header_10mb", "a 10 MB header before a good body", 431, "headers_too_large",
            lambda u: http("POST", "/v1/events", v1_body(u), {"X-Pad": "a" * 10_000_000})),
    Hostile("slow_body", "a good body, one byte every 0.5 s", 408, "body_timeout",
            lambda u: http("POST", "/v1/events", v1_body(u)), trickle="body"),
    Hostile("slow_head", "a head, one byte every 0.5 s", 408, "header_timeout",
            lambda u: http("POST", "/v1/events", v1_body(u), {"X-Pad": "a" * 200}), trickle="all"),
    Hostile("nul_user_id", "NUL in anonymous_user_id", 400, "invalid_anonymous_user_id",
            lambda u: http("POST", "/v1/events", v1_body(u + "\x00x"))),
    Hostile("nul_event_id", "NUL in an event_id", 200, "invalid_event_id",
            lambda u: http("POST", "/v1/events", v1_body(u, event='"event_id":"e\\u0000"'))),
    Hostile("nul_arkforge_user", "NUL in an ArkForge user_id", 400, "invalid_user_id",
            lambda u: http("POST", "/apiv1/events",
                           b'{"event_type":"h","user_id":%s}' % json.dumps(u + "\x00").encode())),
)  # fmt: skip
"""Every case, its documented answer (README "Errors"; a 200 is an ingestion answer rejecting the event)."""


def exchange(url: str, request: bytes, trickle: str = "", timeout_s: float = ANSWER_TIMEOUT_S) -> Answer:
    """Send ``request`` to the gateway at ``url`` on a connection of its own and read the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout_s) as sock:
        data = b""
        try:
            if trickle:
                start = request.index(b"\r\n\r\n") + 4 if trickle == "body" else 0
                sock.sendall(request[:start])
                sock.settimeout(TRICKLE_EVERY_S)
                for i in range(start, len(request)):
                    sock.sendall(request[i : i + 1])
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        continue
                    data += chunk
                    break  # answered (or closed) before the end: stop sending
            else:
                sock.sendall(request)
        except OSError:
            pass  # refused mid-send (the 431): the answer may still be there to read
        sock.settimeout(timeout_s)
        data += _read_all(sock)
    return parse_answer(data)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        pass  # a reset after the answer
    return b"".join(chunks)


def parse_answer(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return Answer(None, None, 0, data[:200].decode("latin-1"))
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    try:
        doc = json.loads(body)
    except ValueError:
        return Answer(status, None, 0, body[:200].decode("latin-1"))
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return Answer(status, doc["error"].get("code"), 0, body[:300].decode("utf-8", "replace"))
    if isinstance(doc, dict) and "results" in doc:
        codes = [r.get("code") for r in doc["results"] if r.get("status") == "rejected"]
        return Answer(status, codes[0] if codes else None, int(doc.get("accepted", 0)), body[:300].decode())
    return Answer(status, None, 0, body[:300].decode("utf-8", "replace"))


def _unchunk(body: bytes) -> bytes:
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)


def sentinel(url: str, user: str) -> Answer:
    """One good event for ``user``: the only row the case may leave in event_logs."""
    body = json.dumps(
        {"anonymous_user_id": user,
         "events": [{"event_name": "sentinel", "occurred_at": _now_iso(), "event_id": f"sentinel-{user}"}]}
    ).encode()  # fmt: skip
    return exchange(url, http("POST", "/v1/events", body))


def run_case(url: str, case: Hostile, user: str) -> Outcome:
    """The hostile request, its answer checked, then the sentinel for the same user."""
    start = time.perf_counter()
    try:
        answer = exchange(url, case.request(user), trickle=case.trickle)
    except OSError as exc:
        answer = Answer(None, None, 0, f"{type(exc).__name__}: {exc}")
    outcome = Outcome(case, user, answer, time.perf_counter() - start)
    if (answer.status, answer.code) != (case.status, case.code):
        outcome.problems.append(f"answered {answer.summary()}, documented {case.status} {case.code}: {answer.text}")
    if answer.accepted:
        outcome.problems.append(f"{answer.accepted} event(s) accepted")
    good = sentinel(url, user)
    if (good.status, good.accepted) != (200, 1):
        outcome.problems.append(f"the sentinel was answered {good.summary()}: {good.text}")
    return outcome


def run_all(url: str, cases: tuple[Hostile, ...] = CASES, on_done: Callable[[Outcome], None] | None = None,
            prefix: str | None = None) -> list[Outcome]:  # fmt: skip
    """Every case at once (the trickled ones take ~10 s each), each with its own user under ``prefix``."""
    prefix = prefix or f"hostile-{uuid.uuid4().hex[:8]}-"
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = [pool.submit(run_case, url, case, f"{prefix}{case.name}") for case in cases]
        outcomes = []
        for future in futures:
            outcome = future.result()
            if on_done is not None:
                on_done(outcome)
            outcomes.append(outcome)
    return outcomes


def prove_nothing_accepted(settings: Settings, outcomes: list[Outcome], timeout_s: float = 60.0) -> None:
    """Wait for every sentinel in ``event_logs FINAL``; then any other row of a case's user (or of a user its
    request named, which starts with it) is a problem of that case. Adds to each outcome's problems."""
    from abstream.clickhouse import client

    users = {o.user: o for o in outcomes}
    wanted = {(o.user, f"sentinel-{o.user}") for o in outcomes}
    prefix = _common_prefix(list(users))
    ch = client(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = set(
                ch.query(
                    "SELECT user_id, event_id FROM event_logs FINAL WHERE startsWith(user_id, {p:String})",
                    parameters={"p": prefix},
                ).result_rows
            )
            if wanted <= rows or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    finally:
        ch.close()
    for user, event_id in sorted(rows - wanted):
        owner = max((u for u in users if user.startswith(u)), key=len, default=None)
        if owner is not None:
            users[owner].problems.append(f"stored in event_logs: user {user!r}, event {event_id!r}")
    for user, event_id in sorted(wanted - rows):
        users[user].problems.append(f"the sentinel {event_id!r} never reached event_logs (nothing proven)")


def _common_prefix(names: list[str]) -> str:
    first, last = min(names), max(names)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]

"""Hostile requests against a running gateway and worker: each refused with its documented status and code, and,
proven in ClickHouse (``event_logs FINAL``), nothing of it accepted: after each, a good sentinel event for the same
user is the only row that user has. The requests are ``abstream.fuzz.hostile``'s (raw sockets); what each must be
answered is stated here, from README "Errors".

All cases run at once in the module fixture (the trickled ones need the gateway's 10 s allowance), then ClickHouse is
read once. The duplicate-key proof of ``gateway.body`` is also checked in process, with Hypothesis.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abstream.config import Settings
from abstream.fuzz import hostile
from abstream.fuzz.hostile import Hostile, Outcome, exchange, http, prove_nothing_accepted, run_all, v1_body
from gateway.body import decode_body, refuse_duplicate_keys
from gateway.ingest import ingest_apiv1_batch, ingest_v1
from schemas.errors import ApiError
from tests.stack import Infra, app_process, isolated_settings, log_dir

# the module fixture sends every case at once (~13 s): one pytest-xdist process runs the whole module
pytestmark = pytest.mark.xdist_group("hostile_bodies")

DOCUMENTED = {
    "gzip_bomb": (413, "compression_ratio_exceeded"),
    "declared_huge": (413, "payload_too_large"),
    "deep_body": (400, "malformed_json"),
    "deep_properties": (200, "properties_too_deep"),
    "huge_integer": (200, "integer_out_of_range"),
    "huge_exponent": (200, "non_finite_value"),
    "huge_number_elsewhere": (400, "integer_out_of_range"),
    "invalid_utf8": (400, "malformed_json"),
    "lone_surrogate": (400, "malformed_json"),
    "duplicate_user": (400, "duplicate_key"),
    "duplicate_property": (400, "duplicate_key"),
    "duplicate_in_batch": (400, "duplicate_key"),
    "header_10mb": (431, "headers_too_large"),
    "slow_body": (408, "body_timeout"),
    "slow_head": (408, "header_timeout"),
    "nul_user_id": (400, "invalid_anonymous_user_id"),
    "nul_event_id": (200, "invalid_event_id"),
    "nul_arkforge_user": (400, "invalid_user_id"),
}
"""README "Errors": a 200 is an ingestion answer with the event rejected (and nothing accepted)."""

ACCEPTED = Hostile("control_accepted", "a good event", 200, "", lambda u: http("POST", "/v1/events", v1_body(u)))
"""A control: accepted, so the ClickHouse check that clears the hostile cases must flag it."""


@dataclass
class Run:
    settings: Settings
    url: str
    outcomes: dict[str, Outcome]
    trickled_after_answer: tuple[bytes, float]


def _trickle_after_answer(url: str) -> tuple[bytes, float]:
    """A body sent a byte every 0.5 s to a route that answers 404 before reading it: (what came back, seconds
    until the gateway closed the connection)."""
    request = http("POST", "/apiv1/ab-tests/999999/track", v1_body("late") * 10, {"Connection": "keep-alive"})
    head_end = request.index(b"\r\n\r\n") + 4
    parts = urlsplit(url)
    received = b""
    start = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=0.5) as sock:
        sock.sendall(request[:head_end])
        for i in range(head_end, len(request)):
            try:
                sock.sendall(request[i : i + 1])
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - start


@pytest.fixture(scope="module")
def run(infra: Infra) -> Iterator[Run]:
    from abstream.migrate import migrate

    settings = isolated_settings(infra)
    migrate(settings, log=False)
    with app_process("gateway", settings, log_dir()) as gw, app_process("worker", settings, log_dir()):
        prefix = f"hostile-{random.getrandbits(32):08x}-"
        with ThreadPoolExecutor(1) as pool:  # beside the hostile cases: ~10 s each, all at once
            trickled = pool.submit(_trickle_after_answer, gw.address)
            outcomes = run_all(gw.address, (*hostile.CASES, ACCEPTED), prefix=prefix)
            prove_nothing_accepted(settings, outcomes)
            yield Run(settings, gw.address, {o.case.name: o for o in outcomes}, trickled.result())
    from abstream.clickhouse import client

    c = client(settings, database=None)
    c.command(f"DROP DATABASE IF EXISTS `{settings.clickhouse_database}`")
    c.close()


def test_every_hostile_case_is_documented_here() -> None:
    assert {c.name for c in hostile.CASES} == set(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_refused_as_documented_and_nothing_accepted(run: Run, name: str) -> None:
    outcome = run.outcomes[name]
    assert (outcome.answer.status, outcome.answer.code) == DOCUMENTED[name], outcome.answer.text
    assert outcome.answer.accepted == 0
    assert outcome.ok, outcome.problems  # including: only the sentinel in event_logs FINAL


def test_the_proof_sees_an_accepted_event(run: Run) -> None:
    # the control case is accepted: the same ClickHouse check that clears the hostile cases flags it
    control = run.outcomes["control_accepted"]
    assert control.answer.status == 200 and control.answer.accepted == 1
    assert any("stored in event_logs" in p for p in control.problems), control.problems


def test_slow_clients_are_cut_off_in_time(run: Run) -> None:
    assert run.outcomes["slow_body"].elapsed_s < 15
    assert run.outcomes["slow_head"].elapsed_s < 15


def test_a_body_trickled_after_its_answer_is_cut_off(run: Run) -> None:
    # answered 404 before the body is read; uvicorn alone reads the rest forever, each byte also resetting its
    # keep-alive timer: the gateway closes the connection once a body's allowance is spent
    received, closed_after = run.trickled_after_answer
    assert received.startswith(b"HTTP/1.1 404 ") and b"test_not_found" in received
    assert 9 < closed_after < 15, closed_after


def test_connection_level_refusals_use_the_error_shape(run: Run) -> None:
    answer = exchange(run.url, b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
    assert (answer.status, answer.code) == (400, "invalid_http"), answer.text
    assert exchange(run.url, http("GET", "/health/live")).status == 200


# ----------------------------------------------------------------------- duplicate keys, in process

S = Settings()
NOW = time.time_ns() // 1_000_000


def _ingest(raw: bytes, ingest: Any = ingest_v1) -> Any:
    return ingest(decode_body("application/json", None, raw, S, big_integers="mark"), NOW, S)


def _refused(raw: bytes, ingest: Any = ingest_v1) -> str | None:
    try:
        _ingest(raw, ingest)
    except ApiError as err:
        assert err.status == 400 and err.code == "duplicate_key", err
        assert err.sent == raw, "the dead letter shows the body as sent, both keys in it"
        return err.details[0]["field"]
    return None


def _event(extra: str = "") -> str:
    return '{"event_name":"e","occurred_at":' + str(NOW) + ("," + extra if extra else "") + "}"


def _v1(*events: str, head: str = '"anonymous_user_id":"u"') -> str:
    return "{" + head + ',"events":[' + ",".join(events or (_event(),)) + "]}"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_v1(), None),
        (_v1(head='"anonymous_user_id":"u","anonymous_user_id":"v"'), "anonymous_user_id"),
        (_v1(_event(), _event('"event_name":"f"')), "events.1.event_name"),
        (_v1(_event('"properties":{"p":1,"p":2}')), "events.0.properties.p"),
        (_v1(_event('"context":{"a":{"b":1,"b":1}}')), "events.0.context.a.b"),
        (_v1(head='"anonymous_user_id" : "u" , "x" : 1 , "x" : 2'), "x"),  # whitespace before the colons
        (_v1(_event('"properties":{"a":1,"\\u0061":2}')), "events.0.properties.a"),  # the same key, escaped
        (_v1(head='"anonymous_user_id":"u","unknown":{"a":1,"a":2}'), "unknown.a"),
        # no duplicate, but more ":" pairs than keys, or keys where the ingestion core does not count: cleared
        (_v1(_event('"properties":{"q":"\\":","ip":"::1"}')), None),
        (_v1(_event('"properties":{"n":{"m":{"k":[{"a":1}]}}}')), None),
    ],
    # a body holds the current time: named "body", so that every pytest-xdist process collects the same ids
    ids=lambda value: "body" if isinstance(value, str) and value.startswith("{") else None,
)
def test_duplicate_keys_refused_wherever_they_are(raw: str, field: str | None) -> None:
    assert _refused(raw.encode()) == field


def test_duplicate_keys_in_other_bodies() -> None:
    assert _refused(b'[{"event_type":"e","user_id":"u","properties":{"a":[{"x":1,"x":2}]}}]', ingest_apiv1_batch) == (
        "0.properties.a.0.x"
    )
    with pytest.raises(ApiError) as caught:  # routes other than ingestion: read_json checks after decoding
        value = decode_body("application/json", None, b'{"anonymous_user_id":"u","platform":"ios","platform":1}', S)
        refuse_duplicate_keys(value)
    assert caught.value.details[0]["field"] == "platform"


_keys = st.text(alphabet=st.sampled_from('ab:" \\é'), min_size=0, max_size=3)
_scalars = st.one_of(st.integers(-5, 5), st.text(alphabet=st.sampled_from('a:"\\ é'), max_size=4), st.none())
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=12,
)


def _write(value: Any, rng: random.Random, dup: list[bool]) -> str:
    """``value`` as JSON with random whitespace; once, an object gets one of its keys again (dup[0] set)."""
    sp = lambda: rng.choice(["", " ", "\n", "\t ", "  "])  # noqa: E731
    if isinstance(value, dict):
        members = [f"{sp()}{json.dumps(k)}{sp()}:{sp()}{_write(v, rng, dup)}{sp()}" for k, v in value.items()]
        if value and not dup[0] and rng.random() < 0.3:
            key = rng.choice(list(value))
            members.insert(rng.randrange(len(members) + 1), f"{json.dumps(key)}:{_write(value[key], rng, [True])}")
            dup[0] = True
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(f"{sp()}{_write(v, rng, dup)}{sp()}" for v in value) + "]"
    return json.dumps(value, ensure_ascii=rng.random() < 0.5)


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=st.dictionaries(_keys, _json, max_size=4), seed=st.integers(0, 2**32))
def test_refused_exactly_when_a_key_repeats(value: dict[str, Any], seed: int) -> None:
    """Any JSON, any whitespace, keys full of quotes, colons and escapes: refused if and only if a duplicate was
    written, whatever the count of ``":`` pairs says."""
    dup = [False]
    raw = _write(value, random.Random(seed), dup).encode()
    decoded = decode_body("application/json", None, raw, S)
    try:
        refuse_duplicate_keys(decoded)
    except ApiError as err:
        assert dup[0], (raw, err)
        assert err.code == "duplicate_key"
    else:
        assert not dup[0], raw

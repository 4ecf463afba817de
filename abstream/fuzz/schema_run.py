"""Schemathesis against the gateway: every operation of its /openapi.json, positive and negative cases drawn by
Hypothesis from the documented schemas, each sent over HTTP and its answer checked (``abstream.fuzz.checks``).

Why our own loop rather than ``st run``: the run has a budget of requests (``--requests``) spread over the
operations (one with nothing to vary, like ``GET /health/live``, is exhausted after a few cases and its share goes
to the others), it reports each request as it goes (progress, per-operation tally), and it sends what a client
would: a body whose generated ``Content-Encoding`` is gzip or deflate is compressed that way, and protected
operations get their bearer token, except one case in ten without one and one with a wrong one.

Reproducible: Hypothesis draws from ``seed`` (derived per operation, mode and round), with no example database
and no shrinking (a failure is recorded with its request, ready to replay, and the run goes on).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shlex
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from abstream.fuzz.checks import SERVER_ERROR, Problem, conformance, error_shape, server_error
from abstream.fuzz.target import Target

if TYPE_CHECKING:
    import requests
    from schemathesis import APIOperation, BaseSchema, Case

REQUEST_TIMEOUT_S = 30.0
POSITIVE_SHARE = 0.6
"""Of an operation's requests, the share drawn from its documented schemas (the rest violate them)."""
_QUIET_HEADERS = frozenset(
    {"user-agent", "accept-encoding", "accept", "connection", "x-schemathesis-testcaseid", "content-length"}
)


@dataclass
class Sent:
    """One request and what came of it."""

    operation: str
    mode: str
    status: int | None
    """None: no answer (reset, closed, timed out)."""
    elapsed_s: float
    problems: list[Problem] = field(default_factory=list)
    request: str = ""
    """How to send it again (a curl command), when there are problems."""


def load_schema(target: Target) -> BaseSchema:
    import schemathesis

    return schemathesis.openapi.from_url(f"{target.url}/openapi.json", timeout=REQUEST_TIMEOUT_S)


def operations(schema: BaseSchema) -> list[APIOperation]:
    """Every operation of the document, in its order; an operation Schemathesis cannot read is an error here."""
    ops = []
    for result in schema.get_all_operations():
        ops.append(result.ok())  # raises the InvalidSchema: a document we cannot fuzz is a failure
    return ops


def run(target: Target, total: int, seed: int, on_sent: Callable[[Sent], None]) -> list[str]:
    """Send about ``total`` requests over every operation; ``on_sent`` sees each one. Returns what could not be
    fuzzed (an operation with nothing to violate in negative mode)."""
    import requests
    from schemathesis import GenerationMode

    schema = load_schema(target)
    ops = operations(schema)
    session = requests.Session()
    pending: list[tuple[APIOperation, GenerationMode, int]] = []
    for op in ops:
        pending.append((op, GenerationMode.POSITIVE, 0))
        pending.append((op, GenerationMode.NEGATIVE, 0))
    remaining = total
    skipped: list[str] = []
    round_no = 0
    while remaining > 0 and pending:
        weights = [POSITIVE_SHARE if mode == GenerationMode.POSITIVE else 1 - POSITIVE_SHARE for _, mode, _ in pending]
        unit = remaining / sum(weights)
        still: list[tuple[APIOperation, GenerationMode, int]] = []
        for (op, mode, _), weight in zip(pending, weights, strict=True):
            quota = min(remaining, max(1, round(unit * weight)))
            if quota <= 0:
                break
            sent = _fuzz_operation(
                target, session, op, mode, quota, _seed(seed, op.label, mode.value, round_no), on_sent, skipped
            )
            remaining -= sent
            if sent * 2 >= quota:  # not exhausted: it may take more in the next round
                still.append((op, mode, sent))
            if remaining <= 0:
                break
        pending = still
        round_no += 1
    return skipped


def _seed(seed: int, *parts: object) -> int:
    text = ":".join(map(str, (seed, *parts))).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def _fuzz_operation(
    target: Target,
    session: requests.Session,
    op: APIOperation,
    mode: Any,
    quota: int,
    seed: int,
    on_sent: Callable[[Sent], None],
    skipped: list[str],
) -> int:
    """Up to ``quota`` cases of ``op`` in ``mode``; the number actually sent (fewer: Hypothesis ran out of cases)."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, Verbosity, given

    security = {name for requirement in op.definition.raw.get("security") or [] for name in requirement}
    strategy = op.as_strategy(generation_mode=mode)
    known = _known_tests(target, session, op.path.endswith("/results")) if "{test_id}" in op.path else []
    if known:  # half the cases on tests that exist: a random id is a 404 that never reaches the handler's logic
        from hypothesis import strategies as st

        on_known = [op.as_strategy(generation_mode=mode, path_parameters={"test_id": ref}) for ref in known]
        strategy = st.one_of(strategy, st.one_of(on_known))
    count = 0

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=quota,
        database=None,
        deadline=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
    )
    @given(case=strategy)
    def draw(case: Case) -> None:
        nonlocal count
        if count >= quota:
            return
        headers = _auth(target, security, count)
        count += 1
        on_sent(send(target, session, case, mode.value, headers))

    try:
        draw()
    except Exception as exc:
        if count or mode.value != "negative":
            raise
        skipped.append(f"{op.label} (negative): no case can violate its schema ({type(exc).__name__})")
    return count


KNOWN_TESTS = 6


def _known_tests(target: Target, session: requests.Session, with_key: bool) -> list[int | str]:
    """Ids of tests the gateway has (the first and the latest few) for ``{test_id}``, and one key where the
    operation takes keys too."""
    try:
        tests = session.get(f"{target.url}/apiv1/ab-tests", timeout=REQUEST_TIMEOUT_S).json()
    except Exception:  # noqa: BLE001 - no list, no hint: the operation is fuzzed on random ids only
        return []
    if not isinstance(tests, list) or not tests:
        return []
    chosen = tests[: KNOWN_TESTS // 2] + tests[-(KNOWN_TESTS // 2) :]
    refs: list[int | str] = sorted({t["id"] for t in chosen if isinstance(t, dict) and "id" in t})
    key = tests[0].get("key") if isinstance(tests[0], dict) else None
    return [*refs, key] if with_key and isinstance(key, str) else refs


def _auth(target: Target, security: set[str], index: int) -> dict[str, str]:
    """The operation's bearer token; every tenth case none, and the next a wrong one (401/403 are contract too)."""
    token = target.metrics_token if "metricsToken" in security else target.admin_token if security else ""
    if not token or index % 10 == 7:
        return {}
    if index % 10 == 8:
        return {"Authorization": "Bearer not-the-token"}
    return {"Authorization": f"Bearer {token}"}


def send(target: Target, session: requests.Session, case: Case, mode: str, headers: dict[str, str]) -> Sent:
    """Send ``case`` (its body compressed as its Content-Encoding says) and check the answer."""
    import requests

    kwargs = case.as_transport_kwargs(base_url=target.url, headers=headers)
    raw = _body_bytes(kwargs)
    coding = str(kwargs["headers"].get("Content-Encoding", "")).strip().lower()
    if raw is not None:
        kwargs["data"] = _compress(raw, coding)
    label = case.operation.label
    start = time.perf_counter()
    try:
        response = session.request(**kwargs, timeout=REQUEST_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as exc:
        problem = Problem(SERVER_ERROR, "no answer", f"{type(exc).__name__}: {exc}"[:400])
        return Sent(label, mode, None, time.perf_counter() - start, [problem], curl(kwargs, raw, coding))
    elapsed = time.perf_counter() - start
    documented = {int(s) for s in case.operation.definition.raw.get("responses", {}) if s.isdigit()}
    checked = (server_error(response.status_code, response.headers, documented),
               error_shape(response.status_code, response.content))  # fmt: skip
    problems = [p for p in checked if p is not None]
    problems += conformance(case, response)
    sent = Sent(label, mode, response.status_code, elapsed, problems)
    if problems:
        sent.request = curl(kwargs, raw, coding)
    return sent


def _body_bytes(kwargs: dict[str, Any]) -> bytes | None:
    """The body as bytes (a JSON body serialised as requests would), taken out of ``kwargs``."""
    if "json" in kwargs:
        value = kwargs.pop("json")
        kwargs["headers"].setdefault("Content-Type", "application/json")
        return json.dumps(value, allow_nan=False).encode()
    data = kwargs.pop("data", None)
    if data is None:
        return None
    return data if isinstance(data, bytes) else str(data).encode()


def _compress(raw: bytes, coding: str) -> bytes:
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(raw, mtime=0)
    if coding == "deflate":
        return zlib.compress(raw)
    return raw


def curl(kwargs: dict[str, Any], raw: bytes | None, coding: str) -> str:
    """A shell command that sends the same request again (the body compressed on the way when it was)."""
    from urllib.parse import urlencode

    url = kwargs["url"]
    params = kwargs.get("params") or {}
    if params:
        url = f"{url}?{urlencode(params, doseq=True)}"
    parts = ["curl", "-sS", "-i", "-X", kwargs["method"]]
    for name, value in kwargs["headers"].items():
        if name.lower() not in _QUIET_HEADERS:
            parts += ["-H", _shell(f"{name}: {value}")]
    if raw is None:
        return " ".join([*parts, shlex.quote(url)])
    parts += ["--data-binary", "@-", shlex.quote(url)]
    pipe = {"gzip": "gzip -c", "x-gzip": "gzip -c", "deflate": "python3 -c 'import sys,zlib;"
            "sys.stdout.buffer.write(zlib.compress(sys.stdin.buffer.read()))'"}.get(coding)  # fmt: skip
    feed = f"printf %s {_shell(raw)}"
    return " | ".join(x for x in (feed, pipe, " ".join(parts)) if x)


def _shell(value: str | bytes) -> str:
    """Quoted for bash: plain quotes for printable ASCII, $'...' with escapes otherwise."""
    data = value.encode() if isinstance(value, str) else value
    if all(32 <= b < 127 for b in data):
        return shlex.quote(data.decode())
    escaped = "".join(
        chr(b) if 32 <= b < 127 and b not in (39, 92) else f"\\x{b:02x}" for b in data
    )  # ' and \ escaped too
    return f"$'{escaped}'"

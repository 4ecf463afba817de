"""End-to-end: assignment and experiments through real HTTP against running `abstream gateway` processes.

Both seed surfaces (Calicritters ``POST /v1/assignment``, ArkForge ``/apiv1/ab-tests``) are checked field by
field against the seeds and issue 3, with the embedded stack's real Kafka (tansu) underneath: assignment
records are read back from the ``assignments`` topic, the registry is shared between two gateway processes
through the ``experiments`` topic, and gateways are restarted mid-test. Nothing is mocked.

Bucketing is re-implemented here from docs/assignment.md (not imported from gateway/), so these tests also
check that the documented algorithm is the one the gateway runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import multiprocessing
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from scipy.stats import chi2_contingency, chisquare

from abstream.config import REPO_ROOT, Settings
from abstream.devstack.ports import free_port
from abstream.devstack.supervisor import Child, abstream_argv, http_ok, wait_healthy
from schemas.assignment_record import AssignmentRecord
from tests.stack import UNDER_LOAD, Infra, app_process, isolated_settings, log_dir

JSON = {"content-type": "application/json"}
CODE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
HEX16_RE = re.compile(r"^[0-9a-f]{16}$")
SEEDED = orjson.loads((REPO_ROOT / "tests.json").read_bytes())
SEEDED_BY_ID = {e["id"]: e for e in SEEDED["experiments"]}

# ------------------------------------------------------------------------------------------ helpers


def counts(weights: list[float]) -> list[int]:
    """Largest-remainder bucket counts, exactly as docs/assignment.md section 2 specifies."""
    w = [Fraction(repr(float(x))) for x in weights]
    shares = [x * 10000 / sum(w) for x in w]
    c = [int(s) for s in shares]
    for i in sorted(range(len(c)), key=lambda i: (c[i] - shares[i], i))[: 10000 - sum(c)]:
        c[i] += 1
    return c


def ref_variant(seed: str, key: str, user_id: str, coverage: float, weights: list[float]) -> int | None:
    """docs/assignment.md section 1-3: index of the user's variant, or None outside coverage."""
    d = hashlib.sha256(f"{seed}:{key}:{user_id}".encode()).digest()
    bucket, cov = int.from_bytes(d[:8], "big") % 10000, int.from_bytes(d[8:16], "big") % 10000
    if cov >= int(Fraction(repr(float(coverage))) * 10000 + Fraction(1, 2)):
        return None
    bound = 0
    for i, c in enumerate(counts(weights)):
        bound += c
        if bucket < bound:
            return i
    raise AssertionError("unreachable")


def seeded_variant(experiment_id: int, user_id: str) -> dict[str, Any] | None:
    exp = SEEDED_BY_ID[experiment_id]
    index = ref_variant(exp["hash_seed"], exp["key"], user_id, exp["coverage"], [v["weight"] for v in exp["variants"]])
    return None if index is None else exp["variants"][index]


def deep_merge(target: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """docs/assignment.md section 6: objects merge recursively; scalars, arrays and null replace."""
    for key, value in override.items():
        if isinstance(value, dict):
            current = target.get(key)
            target[key] = deep_merge(current if isinstance(current, dict) else {}, value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def expected_config(experiments: list[dict[str, Any]], chosen: dict[int, str]) -> dict[str, Any]:
    """Baselines of RUNNING/PAUSED experiments by ascending id, then the chosen variants' overrides."""
    ordered = sorted(experiments, key=lambda e: e["id"])
    config: dict[str, Any] = {}
    for exp in ordered:
        if exp["status"] in ("RUNNING", "PAUSED"):
            deep_merge(config, exp.get("baseline_config", {}))
    for exp in ordered:
        if exp["id"] in chosen:
            variant = next(v for v in exp["variants"] if v["key"] == chosen[exp["id"]])
            deep_merge(config, variant.get("config_overrides", {}))
    return config


def error_fields(resp: httpx.Response) -> dict[str, str]:
    """field -> code of a 400 answer, after checking the error shape itself."""
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "details"}, err
    assert CODE_RE.match(err["code"]) and err["message"], err
    out: dict[str, str] = {}
    for d in err["details"]:
        assert set(d) == {"field", "code", "message"}, d
        assert CODE_RE.match(d["code"]) and d["message"], d
        out[d["field"]] = d["code"]
    return out


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None, f"{text!r} carries no zone"
    return moment


def epoch_ms(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@dataclass
class Rec:
    partition: int
    offset: int
    key: str | None
    value: Any


async def _consume(bootstrap: str, topic: str, done: Callable[[list[Rec]], bool], timeout_s: float) -> list[Rec]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    records: list[Rec] = []
    try:
        await consumer.topics()  # metadata of every topic, without creating any
        partitions = consumer.partitions_for_topic(topic)
        assert partitions, f"topic {topic} does not exist"
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300, max_records=20000)
            for tp, msgs in batch.items():
                records += [
                    Rec(tp.partition, m.offset, m.key.decode() if m.key is not None else None, orjson.loads(m.value))
                    for m in msgs
                ]
            if not batch and done(records):
                break  # what was asked for is there and the log is drained: nothing more was written
    finally:
        await consumer.stop()
    return records


def read_topic(
    settings: Settings, name: str, done: Callable[[list[Rec]], bool] = lambda r: True, timeout_s: float = 15
) -> list[Rec]:
    """Every record of one of abstream's topics (from the beginning) once ``done`` holds and the log is drained."""
    return asyncio.run(_consume(settings.kafka_bootstrap_servers, settings.topic(name), done, timeout_s))


@dataclass
class Answer:
    """An HTTP answer carried back from a load process (status and body)."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        return orjson.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


async def _post_many(base_url: str, path: str, bodies: list[bytes], concurrency: int) -> list[Answer]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        out: list[Answer | None] = [None] * len(bodies)
        queue = iter(enumerate(bodies))

        async def worker() -> None:
            for i, body in queue:
                resp = await client.post(path, content=body, headers=JSON)
                out[i] = Answer(resp.status_code, resp.content)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out  # type: ignore[return-value]


def _run_job(job: tuple[str, str, list[bytes], int]) -> list[Answer]:
    return asyncio.run(_post_many(*job))


def post_many(jobs: list[tuple[str, str, list[bytes]]], concurrency: int = 8) -> list[list[Answer]]:
    """Post each (base_url, path, bodies) job, all at once, one load process per job (the HTTP client, not the
    gateways, is the bottleneck on a 2-core box); answers in body order."""
    if len(jobs) == 1:
        return [_run_job((*jobs[0], concurrency))]
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_run_job, [(*job, concurrency) for job in jobs]))


def assign_body(user: str, **extra: Any) -> bytes:
    return orjson.dumps({"anonymous_user_id": user, **extra})


def assign_many(address: str, test_id: int, users: list[str]) -> dict[str, dict[str, Any]]:
    """ArkForge assign answers of many users, by user."""
    bodies = [orjson.dumps({"user_id": u}) for u in users]
    (answers,) = post_many([(address, f"/apiv1/ab-tests/{test_id}/assign", bodies)])
    assert all(a.status_code == 200 for a in answers)
    return {u: a.json() for u, a in zip(users, answers, strict=True)}


class Gateways:
    """Named `abstream gateway` processes sharing one Settings (one registry), restartable."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._running: dict[str, contextlib.AbstractContextManager[Any]] = {}
        self.address: dict[str, str] = {}

    def start(self, name: str) -> None:
        cm = app_process("gateway", self.settings, log_dir())
        self.address[name] = cm.__enter__().address
        self._running[name] = cm

    def stop(self, name: str) -> None:
        self._running.pop(name).__exit__(None, None, None)

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def client(self, name: str) -> httpx.Client:
        return httpx.Client(base_url=self.address[name], timeout=15)

    def close(self) -> None:
        for name in list(self._running):
            self.stop(name)


@pytest.fixture(scope="module")
def pair(infra: Infra) -> Iterator[Gateways]:
    """Two gateway processes (A, B) over one Kafka registry, running the repository's tests.json."""
    gws = Gateways(isolated_settings(infra))
    try:
        gws.start("A")
        gws.start("B")
        yield gws
    finally:
        gws.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_test(client: httpx.Client, name: str, weights: tuple[float, ...] = (0.5, 0.5), **kw: Any) -> dict[str, Any]:
    body = {
        "test_name": name,
        "description": f"{name} description",
        "variants": [
            {"variant_name": f"v{i}", "description": f"variant {i}", "weight": w} for i, w in enumerate(weights)
        ],
    }
    resp = client.post("/apiv1/ab-tests", json=body, **kw)
    assert resp.status_code == 201, resp.text
    return resp.json()


def poll(fn: Callable[[], Any], timeout_s: float, interval_s: float = 0.02) -> tuple[Any, float]:
    """Call ``fn`` until it returns something truthy; (result, seconds it took). Fails after ``timeout_s``."""
    start = time.monotonic()
    while True:
        result = fn()
        elapsed = time.monotonic() - start
        if result:
            return result, elapsed
        assert elapsed < timeout_s, f"condition not met within {timeout_s}s"
        time.sleep(interval_s)


# ====================================================================== Calicritters /v1/assignment

ENTRY_KEYS = {"experiment_key", "experiment_id", "variant_key", "variant_id", "variant_name", "phase"}


def check_assignment_answer(body: dict[str, Any], user: str) -> dict[int, dict[str, Any]]:
    """The seed contract of one /v1/assignment answer; returns its entries by experiment id."""
    assert set(body) == {"anonymous_user_id", "assignments", "config", "assignment_version", "generated_at"}, body
    assert body["anonymous_user_id"] == user
    assert isinstance(body["assignments"], list)
    assert isinstance(body["config"], dict)
    assert HEX16_RE.match(body["assignment_version"]), body["assignment_version"]
    generated = parse_time(body["generated_at"])
    assert abs((datetime.now(UTC) - generated).total_seconds()) < 10
    ids = [a["experiment_id"] for a in body["assignments"]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "assignments in ascending experiment id, once each"
    for entry in body["assignments"]:
        assert set(entry) == ENTRY_KEYS, entry
        for name in ("experiment_id", "variant_id", "phase"):
            assert type(entry[name]) is int, entry
        for name in ("experiment_key", "variant_key", "variant_name"):
            assert isinstance(entry[name], str) and entry[name], entry
    by_id = {a["experiment_id"]: a for a in body["assignments"]}
    for exp_id in SEEDED_BY_ID:  # the two seeded experiments: everyone is in (coverage 1, no targeting)
        expected = seeded_variant(exp_id, user)
        assert expected is not None
        entry = by_id[exp_id]
        assert entry == {
            "experiment_key": SEEDED_BY_ID[exp_id]["key"],
            "experiment_id": exp_id,
            "variant_key": expected["key"],
            "variant_id": expected["id"],
            "variant_name": expected["name"],
            "phase": 1,
        }
    return by_id


def test_v1_assignment_contract_and_merged_config(pair: Gateways) -> None:
    user = str(uuid.uuid4())
    request = {
        "anonymous_user_id": user,
        "platform": "ios",
        "app_version": "0.1.0",
        "session_id": "s_123",
        "install_id": "i_123",
    }
    with pair.client("A") as a:
        resp = a.post("/v1/assignment", json=request)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        body = resp.json()
    by_id = check_assignment_answer(body, user)
    chosen = {i: by_id[i]["variant_key"] for i in SEEDED_BY_ID}
    # Exactly the seeded baselines deep-merged with the chosen variants' overrides.
    assert body["config"] == expected_config(list(SEEDED_BY_ID.values()), chosen)
    # Seeded baselines are complete objects: every key the overrides touch exists in the baseline.
    assert set(body["config"]["landing"]) == set(SEEDED_BY_ID[3]["baseline_config"]["landing"])


def test_v1_assignment_covers_every_seeded_variant_and_config(pair: Gateways) -> None:
    """Over enough users every variant of each seeded experiment appears, each with its own config."""
    seen: dict[tuple[int, str], dict[str, Any]] = {}
    with pair.client("B") as b:
        for i in range(60):
            user = f"cover-{i}"
            body = b.post("/v1/assignment", json={"anonymous_user_id": user}).json()
            by_id = check_assignment_answer(body, user)
            chosen = {e: by_id[e]["variant_key"] for e in SEEDED_BY_ID}
            want = expected_config(list(SEEDED_BY_ID.values()), chosen)
            assert {k: body["config"][k] for k in want} == want, (user, chosen)
            for e, key in chosen.items():
                seen[(e, key)] = body["config"]
    assert set(seen) == {(e["id"], v["key"]) for e in SEEDED_BY_ID.values() for v in e["variants"]}
    assert seen[(3, "B")]["landing"]["journey"] == "workouts_starter"
    assert seen[(3, "C")]["landing"]["show_creature_recommendation"] is True
    assert seen[(4, "B")]["achievements"]["badges_per_screen"] == 4


LONG = "x" * 129


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, {"anonymous_user_id": "missing"}),
        ({"anonymous_user_id": ""}, {"anonymous_user_id": "string_too_short"}),
        ({"anonymous_user_id": LONG}, {"anonymous_user_id": "string_too_long"}),
        ({"anonymous_user_id": "   "}, {"anonymous_user_id": "blank_string"}),
        ({"anonymous_user_id": 42}, {"anonymous_user_id": "string_type"}),
        ({"anonymous_user_id": None}, {"anonymous_user_id": "string_type"}),
        ({"anonymous_user_id": "u", "platform": "web"}, {"platform": "literal_error"}),
        ({"anonymous_user_id": "u", "platform": "IOS"}, {"platform": "literal_error"}),
        ({"anonymous_user_id": "u", "platform": 1}, {"platform": "literal_error"}),
        ({"anonymous_user_id": "u", "app_version": 5}, {"app_version": "string_type"}),
        ({"anonymous_user_id": "u", "app_version": 1.2}, {"app_version": "string_type"}),
        ({"anonymous_user_id": "u", "session_id": []}, {"session_id": "string_type"}),
        ({"anonymous_user_id": "u", "install_id": {}}, {"install_id": "string_type"}),
        ({"anonymous_user_id": "u", "install_id": ""}, {"install_id": "string_too_short"}),
        ({"anonymous_user_id": "u", "session_id": LONG}, {"session_id": "string_too_long"}),
        (
            {"anonymous_user_id": "", "platform": "web", "app_version": 5, "session_id": 3, "install_id": LONG},
            {
                "anonymous_user_id": "string_too_short",
                "platform": "literal_error",
                "app_version": "string_type",
                "session_id": "string_type",
                "install_id": "string_too_long",
            },
        ),
    ],
)
def test_v1_assignment_validation_names_every_bad_field(
    pair: Gateways, body: dict[str, Any], expected: dict[str, str]
) -> None:
    with pair.client("A") as a:
        resp = a.post("/v1/assignment", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "validation_failed"
    assert error_fields(resp) == expected


def test_v1_assignment_accepts_boundaries_and_unknown_fields(pair: Gateways) -> None:
    with pair.client("A") as a:
        for body in (
            {"anonymous_user_id": "y" * 128},  # the longest id
            {"anonymous_user_id": "u-null", "platform": None, "app_version": None},  # optional: null = absent
            {"anonymous_user_id": "u-android", "platform": "android"},
            {"anonymous_user_id": "u-extra", "unknown_field": {"x": 1}},  # seed servers ignored extras
        ):
            resp = a.post("/v1/assignment", json=body)
            assert resp.status_code == 200, (body, resp.text)
            check_assignment_answer(resp.json(), body["anonymous_user_id"])


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b'{"anonymous_user_id": "u"', JSON, 400, "malformed_json"),
        (b"", JSON, 400, "malformed_json"),
        (b"[]", JSON, 400, "invalid_body"),
        (b'"u"', JSON, 400, "invalid_body"),
        (b"null", JSON, 400, "invalid_body"),
        (b'{"anonymous_user_id": "u"}', {"content-type": "text/xml"}, 415, "unsupported_media_type"),
        (
            b'{"anonymous_user_id": "u"}',
            {"content-type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
        ),
        (b'{"anonymous_user_id": "u"}', {}, 415, "unsupported_media_type"),
        (
            b'{"anonymous_user_id": "u"}',
            {"content-type": "application/json; charset=latin-1"},
            415,
            "unsupported_media_type",
        ),
    ],
)
def test_v1_assignment_body_errors(
    pair: Gateways, content: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    with pair.client("B") as b:
        req = b.build_request("POST", "/v1/assignment", content=content, headers=headers)
        if "content-type" not in headers:
            req.headers.pop("content-type", None)
        resp = b.send(req)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code
    fields = error_fields(resp)
    if code == "invalid_body":
        assert fields == {"body": "invalid_body"}


def test_v1_assignment_sticky_across_calls_and_gateways(pair: Gateways) -> None:
    users = [unique("sticky") for _ in range(20)]
    answers: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with pair.client("A") as a, pair.client("B") as b:
        for _ in range(3):
            for user in users:
                for client in (a, b):
                    resp = client.post("/v1/assignment", json={"anonymous_user_id": user, "platform": "ios"})
                    assert resp.status_code == 200, resp.text
                    answers[user].append(resp.json())
    for user, bodies in answers.items():
        first = bodies[0]
        for body in bodies[1:]:
            assert body["assignments"] == first["assignments"], user
            assert body["config"] == first["config"], user
            assert body["assignment_version"] == first["assignment_version"], "replicas agree on the version"


def test_assignment_records_published_before_the_answer(pair: Gateways) -> None:
    user = unique("record")
    with pair.client("A") as a:
        resp = a.post(
            "/v1/assignment",
            json={"anonymous_user_id": user, "platform": "android", "app_version": "2.3.4", "session_id": "s"},
        )
        assert resp.status_code == 200
        body = resp.json()
        ab = a.post("/apiv1/ab-tests/3/assign", json={"user_id": user})
        assert ab.status_code == 200
    answered_at = time.monotonic()
    n = len(body["assignments"])
    mine = lambda recs: [r for r in recs if r.key == user]  # noqa: E731
    records = mine(read_topic(pair.settings, "assignments", lambda recs: len(mine(recs)) >= n + 1, timeout_s=10))
    # Acknowledged before the answer, so readable at once (no waiting on a lagging producer).
    assert time.monotonic() - answered_at < 5
    assert len(records) == n + 1, records
    assert len({r.partition for r in records}) == 1, "keyed by user: one partition per user"
    v1_records = [r.value for r in records if r.value["surface"] == "v1"]
    assert len(v1_records) == n
    generated_ms = epoch_ms(parse_time(body["generated_at"]))
    for entry, value in zip(body["assignments"], sorted(v1_records, key=lambda v: v["experiment_id"]), strict=True):
        AssignmentRecord.model_validate(value)
        assert set(value) == set(AssignmentRecord.model_fields), value
        assert value == {
            "v": 1,
            "user_id": user,
            "experiment_key": entry["experiment_key"],
            "experiment_id": entry["experiment_id"],
            "variant_key": entry["variant_key"],
            "variant_id": entry["variant_id"],
            "phase": entry["phase"],
            "assignment_version": body["assignment_version"],
            "assigned_at": generated_ms,
            "platform": "android",
            "app_version": "2.3.4",
            "surface": "v1",
        }
    (ab_record,) = [r.value for r in records if r.value["surface"] == "apiv1"]
    assert ab_record["experiment_id"] == 3
    assert ab_record["variant_id"] == ab.json()["variant_id"] == seeded_variant(3, user)["id"]  # type: ignore[index]
    assert ab_record["platform"] is None and ab_record["app_version"] is None
    assert ab_record["assignment_version"] == ab.json()["assignment_version"]


# ============================================================================ targeting and windows


def _variants(exp_id: int, overrides: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"key": k, "id": exp_id * 1000 + i + 1, "name": f"e{exp_id}_{k}", "weight": 1, "config_overrides": o}
        for i, (k, o) in enumerate(zip("AB", overrides, strict=True))
    ]


def targeting_manifest() -> dict[str, Any]:
    now = datetime.now(UTC)
    past = "2026-01-01T00:00:00Z"
    return {
        "version": 1,
        "experiments": [
            {
                "key": "ios_new",
                "id": 10,
                "name": "iOS, new app",
                "status": "RUNNING",
                "targeting": {"platform": ["ios"], "min_app_version": "0.10.0"},
                "baseline_config": {"shared": {"k": "ten", "only10": 1}, "list": [1, 2, 3], "n": 1},
                "variants": _variants(10, [{}, {"shared": {"k": "ten-B"}, "list": [9], "n": None}]),
            },
            {
                "key": "version_window",
                "id": 11,
                "name": "0.9.1 to 0.10.0",
                "status": "RUNNING",
                "targeting": {"min_app_version": "0.9.1", "max_app_version": "0.10.0"},
                "baseline_config": {"shared": {"k": "eleven"}},
                "variants": _variants(11, [{}, {"eleven": {"b": True}}]),
            },
            {
                "key": "android_only",
                "id": 12,
                "name": "Android only",
                "status": "RUNNING",
                "targeting": {"platform": ["android"]},
                "variants": _variants(12, [{}, {}]),
            },
            {
                "key": "draft",
                "id": 13,
                "name": "Draft",
                "status": "DRAFT",
                "baseline_config": {"draft": 1},
                "variants": _variants(13, [{}, {}]),
            },
            {
                "key": "paused",
                "id": 14,
                "name": "Paused",
                "status": "PAUSED",
                "baseline_config": {"paused": 1},
                "phase_started_at": past,
                "variants": _variants(14, [{}, {}]),
            },
            {
                "key": "completed",
                "id": 15,
                "name": "Completed",
                "status": "COMPLETED",
                "baseline_config": {"completed": 1},
                "variants": _variants(15, [{}, {}]),
            },
            {
                "key": "ended",
                "id": 16,
                "name": "Ended",
                "status": "RUNNING",
                "start_at": past,
                "end_at": (now - timedelta(days=1)).isoformat(),
                "baseline_config": {"ended": 1},
                "variants": _variants(16, [{}, {}]),
            },
            {
                "key": "future",
                "id": 17,
                "name": "Future",
                "status": "RUNNING",
                "start_at": (now + timedelta(days=1)).isoformat(),
                "variants": _variants(17, [{}, {}]),
            },
            {
                "key": "half",
                "id": 18,
                "name": "Half coverage",
                "status": "RUNNING",
                "coverage": 0.5,
                "hash_seed": "half.p1",
                "variants": _variants(18, [{}, {}]),
            },
        ],
    }


@pytest.fixture(scope="module")
def targeted(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Gateways]]:
    manifest = targeting_manifest()
    path: Path = tmp_path_factory.mktemp("manifest") / "tests.json"
    path.write_bytes(orjson.dumps(manifest))
    gws = Gateways(isolated_settings(infra, manifest_path=str(path)))
    try:
        gws.start("T")
        yield manifest, gws
    finally:
        gws.close()


@pytest.mark.parametrize(
    ("platform", "app_version", "in_ids"),
    [
        ("ios", "0.10.0", {10, 11}),  # 0.10.0 > 0.9.1 as versions (as strings it would be smaller)
        ("ios", "0.10.1", {10}),  # above version_window's max
        ("ios", "0.9.5", {11}),  # below ios_new's min; inside 0.9.1..0.10.0 (as strings it would be above)
        ("ios", "0.9.1", {11}),  # inclusive min
        ("ios", "0.9.0", set()),
        ("ios", "1.0", {10}),
        ("android", "0.10.0", {11, 12}),  # platform-targeted ios_new excluded, android_only included
        (None, "0.10.0", {11}),  # no platform: not eligible where platforms are listed
        ("ios", None, set()),  # no app_version: not eligible where versions are bounded
        ("ios", "banana", set()),  # not a version: not eligible
    ],
)
def test_targeting_by_platform_and_version(
    targeted: tuple[dict[str, Any], Gateways], platform: str | None, app_version: str | None, in_ids: set[int]
) -> None:
    manifest, gws = targeted
    request: dict[str, Any] = {"anonymous_user_id": unique("tgt")}
    if platform:
        request["platform"] = platform
    if app_version:
        request["app_version"] = app_version
    with gws.client("T") as t:
        body = t.post("/v1/assignment", json=request).json()
    got = {a["experiment_id"] for a in body["assignments"]}
    half = {18} if ref_variant("half.p1", "half", request["anonymous_user_id"], 0.5, [1, 1]) is not None else set()
    assert got == in_ids | half, body
    exps = manifest["experiments"]
    for a in body["assignments"]:
        exp = next(e for e in exps if e["id"] == a["experiment_id"])
        index = ref_variant(
            exp.get("hash_seed", exp["key"]),
            exp["key"],
            request["anonymous_user_id"],
            1.0 if exp["id"] != 18 else 0.5,
            [1, 1],
        )
        assert a["variant_key"] == exp["variants"][index]["key"]  # type: ignore[index]
    chosen = {a["experiment_id"]: a["variant_key"] for a in body["assignments"]}
    # Baselines: RUNNING (eligible or not, in their window or not) and PAUSED; never DRAFT or COMPLETED.
    assert body["config"] == expected_config(exps, chosen)
    assert "draft" not in body["config"] and "completed" not in body["config"]
    assert body["config"]["paused"] == 1 and body["config"]["ended"] == 1


def test_config_merge_order_and_replacement(targeted: tuple[dict[str, Any], Gateways]) -> None:
    """Experiment 10's variant B over experiment 11's baseline: overrides come after every baseline;
    arrays and null replace; objects merge."""
    manifest, gws = targeted
    seen = set()
    with gws.client("T") as t:
        for i in range(40):
            user = f"merge-{i}"
            body = t.post(
                "/v1/assignment", json={"anonymous_user_id": user, "platform": "ios", "app_version": "0.10.0"}
            ).json()
            variant = {a["experiment_id"]: a["variant_key"] for a in body["assignments"]}[10]
            seen.add(variant)
            if variant == "B":
                assert body["config"]["shared"] == {"k": "ten-B", "only10": 1}
                assert body["config"]["list"] == [9] and body["config"]["n"] is None
            else:
                assert body["config"]["shared"] == {"k": "eleven", "only10": 1}  # higher id's baseline wins
                assert body["config"]["list"] == [1, 2, 3] and body["config"]["n"] == 1
    assert seen == {"A", "B"}


def test_arkforge_assign_reasons(targeted: tuple[dict[str, Any], Gateways]) -> None:
    _, gws = targeted
    with gws.client("T") as t:
        for test_id, reason in (
            (13, "not_running"),
            (14, "not_running"),
            (15, "not_running"),
            (16, "ended"),
            (17, "not_started"),
            (10, "platform_not_targeted"),
        ):
            body = t.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": "reason-user"}).json()
            assert body["assigned"] is False and body["reason"] == reason, body
            assert body["variant_id"] is None and body["variant_name"] is None and body["variant_key"] is None


# ================================================================================ ArkForge ab-tests

TEST_KEYS = {"id", "test_name", "description", "created_at", "status", "key", "phase", "variants", "metrics",
             "exposure_event", "cuped_lookback_days", "sequential_testing"}  # fmt: skip
VARIANT_KEYS = {"id", "test_id", "variant_name", "description", "weight", "created_at", "key", "is_control"}
ASSIGN_KEYS = {
    "test_id",
    "test_name",
    "user_id",
    "assigned",
    "variant_id",
    "variant_name",
    "variant_key",
    "phase",
    "reason",
    "assignment_version",
}


def test_arkforge_create_list_get(pair: Gateways) -> None:
    name = unique("homepage_button_color")
    body = {
        "test_name": name,
        "description": "Testing different button colors on homepage",
        "variants": [
            {"variant_name": "red", "description": "Red button", "weight": 1},
            {"variant_name": "blue", "description": "Blue button", "weight": 3},
        ],
    }
    with pair.client("A") as a:
        before = a.post("/v1/assignment", json={"anonymous_user_id": "version-probe"}).json()["assignment_version"]
        resp = a.post("/apiv1/ab-tests", json=body)
        assert resp.status_code == 201, resp.text
        test = resp.json()
        assert set(test) == TEST_KEYS, test
        assert type(test["id"]) is int and test["id"] > 0
        assert test["test_name"] == name and test["description"] == body["description"]
        assert test["status"] == "RUNNING"
        parse_time(test["created_at"])
        assert [v["variant_name"] for v in test["variants"]] == ["red", "blue"]
        for v in test["variants"]:
            assert set(v) == VARIANT_KEYS, v
            assert type(v["id"]) is int and v["test_id"] == test["id"]
        assert len({v["id"] for v in test["variants"]}) == 2
        assert [v["weight"] for v in test["variants"]] == pytest.approx([0.25, 0.75])  # normalised
        assert [v["description"] for v in test["variants"]] == ["Red button", "Blue button"]

        got = a.get(f"/apiv1/ab-tests/{test['id']}")
        assert got.status_code == 200 and got.json() == test
        listed = a.get("/apiv1/ab-tests")
        assert listed.status_code == 200
        tests = listed.json()
        assert isinstance(tests, list)
        assert [t for t in tests if t["id"] == test["id"]] == [test]
        assert {3, 4} <= {t["id"] for t in tests}
        for t in tests:
            assert set(t) == TEST_KEYS and sum(v["weight"] for v in t["variants"]) == pytest.approx(1.0)
        seeded = next(t for t in tests if t["id"] == 3)
        assert [(v["variant_name"], v["weight"]) for v in seeded["variants"]] == [
            ("workouts_preloaded", pytest.approx(0.34)),
            ("workouts_starter", pytest.approx(0.33)),
            ("creatures_recommended", pytest.approx(0.33)),
        ]
        after = a.post("/v1/assignment", json={"anonymous_user_id": "version-probe"}).json()["assignment_version"]
        assert after != before, "assignment_version changes when the set of experiments changes"

        dup = a.post("/apiv1/ab-tests", json=body)
        assert dup.status_code == 409 and dup.json()["error"]["code"] == "duplicate_test_name"
        dup_spaced = a.post("/apiv1/ab-tests", json={**body, "test_name": f"  {name} "})
        assert dup_spaced.status_code == 409
    with pair.client("B") as b:  # the other replica knows the name too (one registry)
        poll(lambda: b.get(f"/apiv1/ab-tests/{test['id']}").status_code == 200, 1.0)
        dup_b = b.post("/apiv1/ab-tests", json=body)
        assert dup_b.status_code == 409 and dup_b.json()["error"]["code"] == "duplicate_test_name"


@pytest.mark.parametrize(
    "test_id", ["999999", "abc", "1.5", "-1", "0", "99999999999999999999", "+3", "%203", "3%20", "0x3", "1_0", "٣"]
)
def test_arkforge_unknown_ids_are_404(pair: Gateways, test_id: str) -> None:
    with pair.client("A") as a:
        for method, path, body in (
            ("GET", f"/apiv1/ab-tests/{test_id}", None),
            ("POST", f"/apiv1/ab-tests/{test_id}/assign", {"user_id": "u"}),
            ("POST", f"/apiv1/ab-tests/{test_id}/track", {"user_id": "u", "metric_name": "m", "value": 1}),
            ("PATCH", f"/apiv1/ab-tests/{test_id}", {"description": "x"}),
        ):
            resp = a.request(method, path, json=body)
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "test_not_found"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"variants": [{"variant_name": "a"}, {"variant_name": "b"}]}, {"test_name": "missing"}),
        (
            {"test_name": "   ", "variants": [{"variant_name": "a"}, {"variant_name": "b"}]},
            {"test_name": "string_too_short"},
        ),
        ({"test_name": "t1", "variants": [{"variant_name": "a"}]}, {"variants": "too_short"}),
        ({"test_name": "t1"}, {"variants": "missing"}),
        (
            {"test_name": "t1", "variants": [{"variant_name": "a", "weight": 0}, {"variant_name": "b", "weight": -1}]},
            {"variants.0.weight": "greater_than", "variants.1.weight": "greater_than"},
        ),
        (
            {"test_name": "t1", "variants": [{"variant_name": "a", "weight": "x"}, {"variant_name": "b"}]},
            {"variants.0.weight": "float_parsing"},
        ),
        (
            {"test_name": "t1", "variants": [{"variant_name": "a"}, {"variant_name": "a"}]},
            {"variants.1.variant_name": "duplicate_name"},
        ),
        (
            {"test_name": "t1", "variants": [{"variant_name": "a", "weight": 1e-9}, {"variant_name": "b"}]},
            {"variants.0.weight": "weight_too_small"},
        ),
        (
            {"test_name": 5, "variants": [{}, {"variant_name": "b"}]},
            {"test_name": "string_type", "variants.0.variant_name": "missing"},
        ),
    ],
)
def test_arkforge_create_validation(pair: Gateways, body: dict[str, Any], expected: dict[str, str]) -> None:
    with pair.client("B") as b:
        resp = b.post("/apiv1/ab-tests", json=body)
    assert resp.status_code == 400, resp.text
    assert error_fields(resp) == expected


def test_arkforge_created_on_a_is_assigned_by_b_within_1s(pair: Gateways) -> None:
    with pair.client("A") as a, pair.client("B") as b:
        test = create_test(a, unique("cross_replica"), weights=(0.2, 0.3, 0.5))
        test_id = test["id"]

        def b_assigns() -> dict[str, Any] | None:
            resp = b.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": "first-user"})
            return resp.json() if resp.status_code == 200 else None

        first, elapsed = poll(b_assigns, 1.0)
        assert elapsed < 1.0
        assert set(first) == ASSIGN_KEYS, first
        assert first["test_id"] == test_id and first["test_name"] == test["test_name"]
        assert first["assigned"] is True and first["reason"] is None and first["phase"] == 1

        by_key = {v["key"]: v for v in test["variants"]}
        for i in range(30):
            user = f"ab-user-{i}"
            answers = [c.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": user}).json() for c in (a, b, a, b)]
            assert all(ans == answers[0] for ans in answers), answers
            ans = answers[0]
            assert ans["user_id"] == user and ans["assigned"] is True
            index = ref_variant(test["key"], test["key"], user, 1.0, [0.2, 0.3, 0.5])
            expected = test["variants"][index]  # type: ignore[index]
            assert (ans["variant_id"], ans["variant_name"], ans["variant_key"]) == (
                expected["id"],
                expected["variant_name"],
                expected["key"],
            )
            assert by_key[ans["variant_key"]]["id"] == ans["variant_id"]
        # the new test is also part of /v1/assignment on both replicas
        ab0 = a.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": "ab-user-0"}).json()
        for c in (a, b):
            body = c.post("/v1/assignment", json={"anonymous_user_id": "ab-user-0"}).json()
            entry = next(e for e in body["assignments"] if e["experiment_id"] == test_id)
            assert entry["variant_id"] == ab0["variant_id"]
        bad = b.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user": "x"})
        assert bad.status_code == 400 and error_fields(bad) == {"user_id": "missing"}
        bad = b.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": ""})
        assert bad.status_code == 400 and error_fields(bad) == {"user_id": "string_too_short"}
        bad = b.post(f"/apiv1/ab-tests/{test_id}/assign", json=["u"])
        assert bad.status_code == 400 and error_fields(bad) == {"body": "invalid_body"}


def test_arkforge_patch_rules_and_new_phase(pair: Gateways) -> None:
    with pair.client("A") as a, pair.client("B") as b:
        test = create_test(a, unique("patch"), weights=(1, 1))
        test_id = test["id"]
        users = [f"phase-user-{i}" for i in range(40)]
        phase1 = {u: a.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": u}).json() for u in users}
        assert {ans["phase"] for ans in phase1.values()} == {1}

        def refused(edit: dict[str, Any], codes: set[str]) -> None:
            resp = a.patch(f"/apiv1/ab-tests/{test_id}", json=edit)
            assert resp.status_code == 409, (edit, resp.text)
            assert resp.json()["error"]["code"] == "edit_would_move_users"
            assert set(error_fields(resp).values()) == codes, resp.text

        refused({"variants": [{"key": "A", "weight": 3}, {"key": "B", "weight": 1}]}, {"weight_changed"})
        refused(
            {"variants": [{"key": "A", "weight": 1}, {"key": "B", "weight": 1}, {"key": "C", "weight": 1}]},
            {"variants_changed"},
        )
        refused({"variants": [{"key": "B", "weight": 1}, {"key": "A", "weight": 1}]}, {"variants_changed"})
        refused({"coverage": 0.5}, {"coverage_lowered"})
        refused({"hash_seed": "another-seed"}, {"hash_seed_changed"})
        refused({"targeting": {"platform": ["ios"]}}, {"targeting_narrowed"})
        assert a.get(f"/apiv1/ab-tests/{test_id}").json() == test, "refused edits change nothing"

        draft = a.patch(f"/apiv1/ab-tests/{test_id}", json={"status": "DRAFT"})
        assert draft.status_code == 409 and draft.json()["error"]["code"] == "invalid_status_transition"
        extra = a.patch(f"/apiv1/ab-tests/{test_id}", json={"surprise": 1})
        assert extra.status_code == 400 and error_fields(extra) == {"surprise": "extra_forbidden"}

        # harmless edits are allowed and move nobody
        same_scale = a.patch(
            f"/apiv1/ab-tests/{test_id}",
            json={"description": "edited", "variants": [{"key": "A", "weight": 5}, {"key": "B", "weight": 5}]},
        )
        assert same_scale.status_code == 200, same_scale.text
        assert same_scale.json()["description"] == "edited"
        for u in users[:10]:
            assert (
                b.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": u}).json()["variant_id"]
                == phase1[u]["variant_id"]
            )

        # a new phase: weights may change, later assignments carry phase 2 (on the other replica within 1 s)
        resp = b.patch(
            f"/apiv1/ab-tests/{test_id}",
            json={"new_phase": True, "variants": [{"key": "A", "weight": 1}, {"key": "B", "weight": 3}]},
        )
        assert resp.status_code == 200, resp.text
        assert [v["weight"] for v in resp.json()["variants"]] == pytest.approx([0.25, 0.75])
        assert resp.json()["phase"] == 2

        def phase2_on_a() -> dict[str, Any] | None:
            ans = a.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": users[0]}).json()
            return ans if ans["phase"] == 2 else None

        _, elapsed = poll(phase2_on_a, 1.0)
        assert elapsed < 1.0
        phase2 = {u: b.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": u}).json() for u in users}
        key = a.get(f"/apiv1/ab-tests/{test_id}").json()["key"]
        for u, ans in phase2.items():
            assert ans["phase"] == 2
            index = ref_variant(f"{key}.p2", key, u, 1.0, [1, 3])  # documented seed convention <key>.p<phase>
            assert ans["variant_key"] == "AB"[index]  # type: ignore[index]
        v1 = a.post("/v1/assignment", json={"anonymous_user_id": users[0]}).json()
        entry = next(e for e in v1["assignments"] if e["experiment_id"] == test_id)
        assert entry["phase"] == 2 and entry["variant_id"] == phase2[users[0]]["variant_id"]
        mine = lambda recs: [r.value for r in recs if r.key == users[0] and r.value["experiment_id"] == test_id]  # noqa: E731
        records = mine(
            read_topic(
                pair.settings,
                "assignments",
                lambda recs: any(v["phase"] == 2 and v["surface"] == "v1" for v in mine(recs)),
            )
        )
        assert {v["phase"] for v in records} == {1, 2}
        assert all(
            v["phase"] == 1 for v in records if v["assignment_version"] == phase1[users[0]]["assignment_version"]
        )

        # coverage: a new phase at 0.3, then raising to 0.6 adds users and moves nobody
        resp = a.patch(f"/apiv1/ab-tests/{test_id}", json={"new_phase": True, "coverage": 0.3})
        assert resp.status_code == 200, resp.text
        poll(lambda: b.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": "x"}).json()["phase"] == 3, 1.0)
        many = [f"cov-{i}" for i in range(300)]
        low = assign_many(pair.address["B"], test_id, many)
        in_low = {u for u, ans in low.items() if ans["assigned"]}
        assert {ans["reason"] for u, ans in low.items() if u not in in_low} == {"not_in_coverage"}
        assert 0.15 < len(in_low) / len(many) < 0.45
        raised = a.patch(f"/apiv1/ab-tests/{test_id}", json={"coverage": 0.6})
        assert raised.status_code == 200, raised.text
        poll(
            lambda: (
                b.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": "x"}).json()["assignment_version"]
                == a.post(f"/apiv1/ab-tests/{test_id}/assign", json={"user_id": "x"}).json()["assignment_version"]
            ),
            1.0,
        )
        high = assign_many(pair.address["B"], test_id, many)
        in_high = {u for u, ans in high.items() if ans["assigned"]}
        assert in_low < in_high, "raising coverage only adds users"
        assert 0.45 < len(in_high) / len(many) < 0.75
        assert all(high[u]["variant_id"] == low[u]["variant_id"] and high[u]["phase"] == 3 for u in in_low)
        refused({"coverage": 0.4}, {"coverage_lowered"})


def test_admin_token_and_masked_request_logs(infra: Infra) -> None:
    token = "s3cret-" + uuid.uuid4().hex
    secret_user = unique("do-not-log-me")
    gws = Gateways(isolated_settings(infra, admin_token=token, log_level="INFO"))
    gws.start("ADMIN")
    try:
        with gws.client("ADMIN") as c:
            body = {"test_name": unique("admin"), "variants": [{"variant_name": "a"}, {"variant_name": "b"}]}
            for headers, status, code in (
                ({}, 401, "unauthorized"),
                ({"authorization": f"Basic {token}"}, 401, "unauthorized"),
                ({"authorization": "Bearer"}, 401, "unauthorized"),
                ({"authorization": "Bearer wrong"}, 403, "forbidden"),
                ({"authorization": f"Bearer {token}x"}, 403, "forbidden"),
            ):
                resp = c.post("/apiv1/ab-tests", json=body, headers=headers)
                assert resp.status_code == status, (headers, resp.text)
                assert resp.json()["error"]["code"] == code
                if status == 401:
                    assert resp.headers["www-authenticate"].lower().startswith("bearer")
            assert c.get("/apiv1/ab-tests").status_code == 200, "reading needs no token"
            assert all(t["test_name"] != body["test_name"] for t in c.get("/apiv1/ab-tests").json())
            created = c.post("/apiv1/ab-tests", json=body, headers={"authorization": f"Bearer {token}"})
            assert created.status_code == 201, created.text
            test_id = created.json()["id"]
            path = f"/apiv1/ab-tests/{test_id}"
            assert c.patch(path, json={"description": "x"}).status_code == 401
            assert c.patch(path, json={"description": "x"}, headers={"authorization": "Bearer nope"}).status_code == 403
            assert c.get(path).json()["description"] == ""
            ok = c.patch(path, json={"description": "x"}, headers={"authorization": f"bearer {token}"})
            assert ok.status_code == 200 and ok.json()["description"] == "x"
            # assignment and tracking are client traffic: no token
            assert c.post(f"{path}/assign", json={"user_id": secret_user}).status_code == 200
            assert c.post("/v1/assignment", json={"anonymous_user_id": secret_user}).status_code == 200
            short_user = "qz" + uuid.uuid4().hex[:5]  # 7 characters: a 4-character prefix would show most of it
            assert c.post("/v1/assignment", json={"anonymous_user_id": short_user}).status_code == 200
            # an encoded newline in the path must not forge a log line
            forged = "/apiv1/ab-tests/3%0A2026-01-01 INFO abstream.access: POST /v1/events 200 user=FORGED/track"
            assert c.post(forged, json={}).status_code == 404
    finally:
        gws.close()
    # request logs mask user identifiers (a prefix and the length, never the whole id) and never show the token
    log_text = (log_dir() / f"gateway-{gws.address['ADMIN'].rsplit(':', 1)[1]}.log").read_text()
    assert "POST /v1/assignment 200" in log_text and f"user={secret_user[:4]}" in log_text
    assert secret_user not in log_text and token not in log_text
    assert short_user[:4] not in log_text and "user=…(7)" in log_text
    assert "/apiv1/ab-tests/3\\n2026-01-01 INFO" in log_text
    assert not any(line.startswith("2026-01-01 INFO") for line in log_text.splitlines())


# ========================================================== split, stickiness across replicas + restart

N_USERS = 20_000


@UNDER_LOAD
def test_split_and_stickiness_across_two_gateways_and_a_restart(pair: Gateways) -> None:
    prefix = unique("split")
    users = [f"{prefix}-{i}" for i in range(N_USERS)]
    with pair.client("A") as a:
        ark = create_test(a, unique("survives_restart"), weights=(0.5, 0.5))
        ark_answers = {u: a.post(f"/apiv1/ab-tests/{ark['id']}/assign", json={"user_id": u}).json() for u in users[:20]}

    # pass 1: even users through A, odd users through B, concurrently
    halves = {"A": users[0::2], "B": users[1::2]}
    started = time.monotonic()
    answers_a, answers_b = post_many(
        [(pair.address[g], "/v1/assignment", [assign_body(u) for u in halves[g]]) for g in ("A", "B")]
    )
    pass1_s = time.monotonic() - started
    first: dict[str, dict[int, int]] = {}
    for g, answers in (("A", answers_a), ("B", answers_b)):
        for user, resp in zip(halves[g], answers, strict=True):
            assert resp.status_code == 200, resp.text
            first[user] = {e["experiment_id"]: e["variant_id"] for e in resp.json()["assignments"]}
    n_answered = sum(len(v) for v in first.values())

    # the documented algorithm reproduces every answer; the split matches the weights
    for exp_id, exp in SEEDED_BY_ID.items():
        observed = Counter(first[u][exp_id] for u in users)
        for user in users:
            assert first[user][exp_id] == seeded_variant(exp_id, user)["id"]  # type: ignore[index]
        expected = [N_USERS * c / 10000 for c in counts([v["weight"] for v in exp["variants"]])]
        obs = [observed[v["id"]] for v in exp["variants"]]
        assert sum(obs) == N_USERS
        p = chisquare(obs, expected).pvalue
        assert p > 0.001, (exp["key"], obs, expected, p)
    table = Counter((first[u][3], first[u][4]) for u in users)
    grid = [[table[(v3["id"], v4["id"])] for v4 in SEEDED_BY_ID[4]["variants"]] for v3 in SEEDED_BY_ID[3]["variants"]]
    assert chi2_contingency(grid).pvalue > 0.001, ("experiments must split independently", grid)

    # restart B, then ask every sampled user of each half through the OTHER process
    pair.restart("B")
    sample = random.Random(7).sample(users, 3000)
    to_a = [u for u in sample if int(u.rsplit("-", 1)[1]) % 2 == 1]  # odd users were first answered by B
    to_b = [u for u in sample if int(u.rsplit("-", 1)[1]) % 2 == 0]
    again_a, again_b = post_many(
        [
            (pair.address["A"], "/v1/assignment", [assign_body(u) for u in to_a]),
            (pair.address["B"], "/v1/assignment", [assign_body(u) for u in to_b]),
        ]
    )
    for user, resp in [*zip(to_a, again_a, strict=True), *zip(to_b, again_b, strict=True)]:
        assert resp.status_code == 200, resp.text
        now = {e["experiment_id"]: e["variant_id"] for e in resp.json()["assignments"]}
        assert now == first[user], user
        n_answered += len(now)

    # the ArkForge test created before the restart is still served, with the same variants
    with pair.client("B") as b:
        got = b.get(f"/apiv1/ab-tests/{ark['id']}")
        assert got.status_code == 200 and got.json() == ark
        for user, ans in ark_answers.items():
            again = b.post(f"/apiv1/ab-tests/{ark['id']}/assign", json={"user_id": user}).json()
            assert again["variant_id"] == ans["variant_id"], user

    # every answered assignment is on the topic exactly once per answer; no user has two variants
    def mine(recs: list[Rec]) -> list[Rec]:
        return [r for r in recs if r.key is not None and r.key.startswith(prefix) and r.value["surface"] == "v1"]

    records = mine(read_topic(pair.settings, "assignments", lambda recs: len(mine(recs)) >= n_answered, 30))
    assert len(records) == n_answered
    variants: dict[tuple[str, int], set[int]] = defaultdict(set)
    partitions: dict[str, set[int]] = defaultdict(set)
    for r in records:
        assert r.value["user_id"] == r.key
        variants[(r.key, r.value["experiment_id"])].add(r.value["variant_id"])  # type: ignore[index]
        partitions[r.key].add(r.partition)  # type: ignore[index]
    assert all(len(v) == 1 for v in variants.values())
    assert all(len(p) == 1 for p in partitions.values()), "one user, one partition"
    assert {(u, e): {v} for u, m in first.items() for e, v in m.items()} == dict(variants)
    print(f"\npass 1: {N_USERS} assignments through 2 gateways in {pass1_s:.1f}s")


def test_health_endpoints(pair: Gateways) -> None:
    with pair.client("A") as a:
        live = a.get("/health/live")
        assert live.status_code == 200 and live.json() == {"status": "live"}
        ready = a.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"kafka": True, "registry": True}


def test_malformed_manifest_stops_startup_naming_the_field(infra: Infra, tmp_path: Path) -> None:
    """A typo in tests.json stops start-up with the bad field's path (issue 3): it never serves traffic."""
    bad = targeting_manifest()
    bad["experiments"][1]["variants"][0]["wieght"] = 1
    path = tmp_path / "tests.json"
    path.write_bytes(orjson.dumps(bad))
    settings = replace(isolated_settings(infra), manifest_path=str(path))
    port = free_port()
    log_path = tmp_path / "gateway.log"
    child = Child(
        "gateway",
        abstream_argv("gateway", "--port", str(port)),
        f"http://127.0.0.1:{port}",
        lambda: http_ok(f"http://127.0.0.1:{port}/health/live"),
        log_path=log_path,
    )
    child.start(settings.as_env())
    try:
        with pytest.raises(RuntimeError, match="exited"):
            wait_healthy(child, 30)
    finally:
        child.stop()
    assert "experiments.1.variants.0.wieght" in log_path.read_text()

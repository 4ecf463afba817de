"""The Calicritters metrics API (/v1/metrics/*) through the real path: events and assignments posted over HTTP,
Kafka, the worker, ClickHouse rollups, and every figure checked against a recomputation from what was sent."""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jsonschema
import pytest
from statsmodels.stats.proportion import proportion_confint

from abstream.config import Settings
from abstream.migrate import migrate
from tests.stack import app_process, log_dir, rows, wait_for

METRICS_TOKEN = "metrics-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
FUNNEL = ["app_open", "workout_started", "session_submitted"]  # tests.json's workout_activation


@pytest.fixture
def metrics_stack(settings: Settings) -> Iterator[tuple[Settings, str]]:
    settings = dataclasses.replace(settings, metrics_token=METRICS_TOKEN, admin_token=ADMIN_TOKEN)
    migrate(settings, log=False)
    with app_process("gateway", settings, log_dir()) as gw, app_process("worker", settings, log_dir()):
        yield settings, gw.address


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def auth(token: str = METRICS_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_metrics_endpoints_match_what_was_sent(metrics_stack: tuple[Settings, str]) -> None:
    settings, base = metrics_stack
    http = httpx.Client(base_url=base, timeout=15)
    now = datetime.now(UTC)
    today = now.date()
    users = [f"m-{i}-{uuid.uuid4().hex[:6]}" for i in range(24)]
    sent: list[tuple[str, str, str, str, datetime]] = []  # user, event, platform, version, time
    variants: dict[str, dict[str, str]] = {}
    for i, user in enumerate(users):
        platform, version = ("ios", "1.2.0") if i % 3 else ("android", "2.0.1")
        if i % 4 == 0:  # active 10 days ago only (within 30 days, not 7), before any assignment
            when = now - timedelta(days=10)
            events = [("app_open", when)]
        else:
            r = http.post("/v1/assignment", json={"anonymous_user_id": user, "platform": platform,
                                                  "app_version": version})  # fmt: skip
            assert r.status_code == 200, r.text
            variants[user] = {a["experiment_key"]: a["variant_key"] for a in r.json()["assignments"]}
            steps = FUNNEL[: 1 + i % 3]
            events = [(name, now + timedelta(milliseconds=10 * k)) for k, name in enumerate(steps)]
            if i % 5 == 0:
                events.append(("app_open", now - timedelta(days=3)))  # an earlier day, this week
        body = {"anonymous_user_id": user, "platform": platform, "app_version": version,
                "events": [{"event_name": n, "occurred_at": iso(t)} for n, t in events]}  # fmt: skip
        r = http.post("/v1/events", json=body)
        assert r.status_code == 200 and r.json()["accepted"] == len(events), r.text
        sent += [(user, n, platform, version, t) for n, t in events]
    bad = http.post("/v1/events", json={"anonymous_user_id": users[1], "events": [{"event_name": "bad name!"}]})
    assert bad.status_code in (200, 400)
    wait_for(lambda: rows(settings, "SELECT count() FROM event_logs FINAL")[0][0] == len(sent), what="events")
    wait_for(lambda: rows(settings, "SELECT count() FROM rejected_events")[0][0] == 1, what="the rejection")
    wait_for(lambda: rows(settings, "SELECT sum(users) FROM user_last_active")[0][0] == len(users), what="rollups")

    # --- summary: public, aggregates only
    r = http.get("/v1/metrics/summary")
    assert r.status_code == 200, r.text
    summary = r.json()
    assert not any(u in r.text for u in users), "the public summary names no user"
    days = {"today": 0, "last_7_days": 6, "last_30_days": 29}
    for window, back in days.items():
        since = today - timedelta(days=back)
        assert summary["events"][window] == sum(1 for s in sent if s[4].date() >= since), window
        assert summary["active_users"][window] == len({s[0] for s in sent if s[4].date() >= since}), window
    assert summary["rejected_events"]["today"] == 1
    running = {e["key"]: e for e in summary["running_experiments"]}
    for key in ("exp_3_landing_journey", "exp_4_achievements_density"):
        exposed = {k: n for k, n in running[key]["variants"].items() if n}
        assert exposed == dict(Counter(v[key] for v in variants.values() if key in v)), key
        assert running[key]["exposed_users"] == sum(exposed.values())
    assert summary["latest_event_time"] is not None
    validate(http, "/v1/metrics/summary", summary)

    # --- tokens on the three protected endpoints: 401 missing, 403 wrong, the admin token is not a metrics token
    for path in ("/v1/metrics/daily", "/v1/metrics/experiments", "/v1/metrics/funnels"):
        assert http.get(path).status_code == 401
        assert http.get(path, headers=auth("wrong")).status_code == 403
        assert http.get(path, headers=auth(ADMIN_TOKEN)).status_code == 403
        assert http.get(path, headers=auth()).status_code == 200

    # --- daily: per day, event, platform, version; totals over platforms
    daily = http.get("/v1/metrics/daily", headers=auth()).json()
    validate(http, "/v1/metrics/daily", daily)
    want: Counter[tuple[str, str, str, str]] = Counter((s[4].date().isoformat(), s[1], s[2], s[3]) for s in sent)
    assert {(r["day"], r["event_name"], r["platform"], r["app_version"]): r["events"] for r in daily["rows"]} == want
    totals = {(t["day"], t["event_name"]): t["unique_users"] for t in daily["totals"]}
    assert totals[(today.isoformat(), "app_open")] == len({s[0] for s in sent if s[1] == "app_open"
                                                           and s[4].date() == today})  # fmt: skip
    only = http.get("/v1/metrics/daily", headers=auth(),
                    params={"platform": "android", "event_name": "app_open"}).json()  # fmt: skip
    assert {r["platform"] for r in only["rows"]} == {"android"} and only["totals"] is None
    assert sum(r["events"] for r in only["rows"]) == sum(1 for s in sent if s[2] == "android" and s[1] == "app_open")
    cases = [
        ({"from": "2026-13-01"}, "from"),
        ({"to": "yesterday"}, "to"),
        ({"platform": "web"}, "platform"),
        ({"from": "2026-01-01", "to": "2026-12-01"}, "from"),
        ({"form": "x"}, "form"),
        ({"event_name": "bad name!"}, "event_name"),
        ({"to": "0001-01-05"}, "to"),
        ({"from": (today - timedelta(days=200)).isoformat()}, "from"),
        ({"from": "2026-12-04T00:00:00Z"}, "from"),
        ({"from": "2026-12-04", "to": "2026-12-03"}, "from"),
        ([("to", "2026-12-01"), ("to", "2026-12-02")], "to"),
    ]
    for params, field in cases:  # fmt: skip
        r = http.get("/v1/metrics/daily", headers=auth(), params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["code"] == "invalid_parameter"
        assert field in {d["field"] for d in r.json()["error"]["details"]}, (params, r.json())

    for params, field in (({"LEVEL": "0.99"}, "LEVEL"), ({"level": "0.950"}, "level"), ({"level": ""}, "level"),
                          ([("metric", "a"), ("metric", "b")], "metric")):  # fmt: skip
        r = http.get("/apiv1/ab-tests/4/results", params=params)
        assert r.status_code == 400 and field in {d["field"] for d in r.json()["error"]["details"]}, (params, r.text)

    # --- experiments: exposures per variant to date and per day, each metric from the results core
    r = http.get("/v1/metrics/experiments", headers=auth(), params={"experiment": "exp_4_achievements_density"})
    assert r.status_code == 200, r.text
    (exp,) = r.json()["experiments"]
    validate(http, "/v1/metrics/experiments", r.json())
    expected = Counter(v["exp_4_achievements_density"] for v in variants.values())
    assert {e["variant_key"]: e["to_date"] for e in exp["exposures"]} == dict(expected)
    assert {e["variant_key"]: sum(d["users"] for d in e["by_day"]) for e in exp["exposures"]} == dict(expected)
    metrics = {m["key"]: m for m in exp["results"]["metrics"]}
    opens = metrics["conversion:app_open"]["variants"]
    assert {m["variant_key"]: m["users_with_metric"] for m in opens} == dict(expected)  # every exposed user opened
    assert http.get("/v1/metrics/experiments", headers=auth(), params={"experiment": "nope"}).status_code == 404
    everything = http.get("/v1/metrics/experiments", headers=auth()).json()["experiments"]
    assert {"exp_3_landing_journey", "exp_4_achievements_density"} <= {e["key"] for e in everything}

    # --- funnels: overall and per variant, Wilson intervals
    r = http.get("/v1/metrics/funnels", headers=auth(), params={"experiment": "exp_4_achievements_density"})
    assert r.status_code == 200, r.text
    validate(http, "/v1/metrics/funnels", r.json())
    (funnel,) = r.json()["funnels"]
    reached = reach(sent, None)
    assert [s["users"] for s in funnel["overall"]] == reached
    step2 = funnel["overall"][1]
    low, high = proportion_confint(reached[1], reached[0], method="wilson")
    assert step2["from_previous"]["ci"] == {"low": pytest.approx(low, rel=1e-9), "high": pytest.approx(high, rel=1e-9)}
    (breakdown,) = funnel["experiments"]
    for variant in breakdown["variants"]:
        members = {u for u, v in variants.items() if v["exp_4_achievements_density"] == variant["variant_key"]}
        assert [s["users"] for s in variant["steps"]] == reach(sent, members), variant["variant_key"]
        assert (variant["steps"][0].get("vs_control") is None) == variant["is_control"]
    assert http.get("/v1/metrics/funnels", headers=auth(), params={"funnel": "nope"}).status_code == 404


def reach(sent: list[tuple[str, str, str, str, datetime]], members: set[str] | None) -> list[int]:
    """Users reaching each funnel step in order (the events of this test are in order and close together)."""
    out = [0, 0, 0]
    by_user: dict[str, set[str]] = {}
    for user, name, *_ in sent:
        if members is None or user in members:
            by_user.setdefault(user, set()).add(name)
    for names in by_user.values():
        for k in range(3):
            if all(step in names for step in FUNNEL[: k + 1]):
                out[k] += 1
    return out


def validate(http: httpx.Client, path: str, body: Any) -> None:
    doc = http.get("/openapi.json").json()
    op = doc["paths"][path]["get"]
    schema = {**op["responses"]["200"]["content"]["application/json"]["schema"], "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(body)


def test_a_clickhouse_outage_answers_503_with_retry_after(settings: Settings) -> None:
    """A gateway whose ClickHouse is away: every metrics endpoint says 503 and when to retry, never a 500."""
    from abstream.devstack.ports import free_port

    migrate(settings, log=False)
    away = dataclasses.replace(settings, clickhouse_url=f"http://default:@127.0.0.1:{free_port()}",
                               metrics_token=METRICS_TOKEN)  # fmt: skip
    with app_process("gateway", away, log_dir()) as gw:
        for path in ("/v1/metrics/summary", "/v1/metrics/daily", "/v1/metrics/experiments", "/v1/metrics/funnels",
                     "/apiv1/ab-tests/3/results"):  # fmt: skip
            r = httpx.get(f"{gw.address}{path}", headers=auth(), timeout=30)
            assert r.status_code == 503, (path, r.text)
            assert r.headers["Retry-After"] and r.json()["error"]["code"].endswith("_unavailable")
            assert "Connection refused" not in r.text, "no backend exception in the body"

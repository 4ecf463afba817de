"""SQL that analysts and old clients run, against data sent through the whole pipeline:

* the ArkForge server's SQLite tables as ClickHouse views (clickhouse/0009_seed_views.sql), queried with the
  seed server's own style of SQL (its column names, joins between ab_tests, ab_variants and ab_assignments);
* every SQL block of docs/sql.md, run with ClickHouse query parameters and checked against the known input.

The data set is ``tests.test_dashboards.load_known_data``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from statsmodels.stats.proportion import proportion_confint

from abstream.clickhouse import client as ch_client
from abstream.config import Settings
from abstream.migrate import migrate
from tests.stack import rows
from tests.test_dashboards import CALICRITTERS_USERS, FUNNEL, Known, load_known_data

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "sql.md"
MIGRATIONS = ROOT / "clickhouse"

# The ArkForge analytics server's CREATE TABLE statements (seeds/arkforge-analytics-server.md), column by column.
SEED_COLUMNS = {
    "events": ["id", "event_type", "user_id", "session_id", "properties", "created_at"],
    "ab_tests": ["id", "test_name", "description", "created_at"],
    "ab_variants": ["id", "test_id", "variant_name", "description", "weight", "created_at"],
    "ab_assignments": ["id", "user_id", "test_id", "variant_id", "assigned_at"],
    "ab_metrics": ["id", "test_id", "variant_id", "metric_name", "value", "created_at"],
}
TIME = "DateTime64(3, 'UTC')"
TYPES = {
    "id": "Int64", "test_id": "Int64", "variant_id": "Int64", "created_at": TIME, "assigned_at": TIME,
    "weight": "Float64", "value": "Float64", "user_id": "String", "test_name": "String", "variant_name": "String",
    "metric_name": "String", "properties": "String", "event_type": "LowCardinality(String)",
    "description": "Nullable(String)", "session_id": "Nullable(String)",
}  # fmt: skip


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ms(iso: str) -> datetime:
    """An API timestamp as ClickHouse keeps it: UTC, millisecond precision."""
    t = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def test_seed_views_have_the_seed_tables_names_columns_and_types(settings: Settings) -> None:
    # no other migration creates a table or view of these names (checked before 0009 was written, kept so)
    creators: dict[str, set[str]] = {}
    for path in sorted(MIGRATIONS.glob("*.sql")):
        for name in re.findall(r"CREATE\s+(?:TABLE|VIEW)\s+(?:IF NOT EXISTS\s+)?(\w+)", path.read_text(), re.I):
            creators.setdefault(name, set()).add(path.name)
    assert {name: creators.get(name) for name in SEED_COLUMNS} == dict.fromkeys(SEED_COLUMNS, {"0009_seed_views.sql"})
    migrate(settings, log=False)
    for view, columns in SEED_COLUMNS.items():
        engine = rows(
            settings,
            "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = {v:String}",
            v=view,
        )
        assert engine == [("View",)], view
        described = [(name, type_) for name, type_, *_ in rows(settings, f"DESCRIBE TABLE {view}")]
        assert described == [(c, TYPES[c]) for c in columns], view
        assert rows(settings, f"SELECT count() FROM {view}") == [(0,)]


def _variant_names(known: Known) -> dict[int, str]:
    return {v["id"]: v["variant_name"] for v in known.experiment["variants"]}


def test_seed_views_answer_the_seed_servers_sql(stack: tuple[Settings, str]) -> None:
    settings, base = stack
    known = load_known_data(settings, base)
    exp = known.experiment
    created = _ms(exp["created_at"])
    window = (datetime.fromtimestamp(known.started - 61, UTC), datetime.fromtimestamp(known.finished, UTC))

    def q(sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return rows(settings, sql, **params)

    # ab_tests: the registry, tests.json experiments included
    assert q("SELECT id, test_name FROM ab_tests ORDER BY id") == [
        (3, "Landing journey"), (4, "Achievements density"), (exp["id"], exp["test_name"])]  # fmt: skip
    ((test_id, name, description, created_at),) = q(
        "SELECT id, test_name, description, created_at FROM ab_tests WHERE test_name = {n:String}", n=exp["test_name"]
    )
    assert (test_id, name, description, _utc(created_at)) == (exp["id"], exp["test_name"], exp["description"], created)
    assert _utc(q("SELECT created_at FROM ab_tests WHERE id = 3")[0][0]) == datetime(2026, 1, 28, 9, tzinfo=UTC)

    # ab_variants: ids, names, raw weights, descriptions (NULL when none), the test's creation time
    got = q("SELECT id, test_id, variant_name, description, weight, created_at FROM ab_variants "
            "WHERE test_id = {t:Int64} ORDER BY id", t=exp["id"])  # fmt: skip
    (red, blue) = exp["variants"]
    assert [(*r[:5], _utc(r[5])) for r in got] == [
        (red["id"], exp["id"], "red", "Red button", 1.0, created),
        (blue["id"], exp["id"], "blue", None, 3.0, created),
    ]
    assert dict(q("SELECT test_id, count() FROM ab_variants GROUP BY test_id")) == {3: 3, 4: 2, exp["id"]: 2}
    assert q("SELECT weight FROM ab_variants WHERE id = 3001") == [(0.34,)]

    # ab_assignments: one row per user and test, the variant the gateway answered, assigned during the load
    got = q("SELECT id, user_id, test_id, variant_id, assigned_at FROM ab_assignments")
    assert {(u, t): v for _, u, t, v, _ in got} == known.assignments
    assert len(got) == len(known.assignments) == len({i for i, *_ in got}), "UNIQUE(user_id, test_id), unique ids"
    assert all(window[0] <= _utc(at) <= window[1] for *_, at in got)
    user = known.arkforge_users[0]
    assert q("SELECT variant_id FROM ab_assignments WHERE user_id = {u:String} AND test_id = {t:Int64}",
             u=user, t=exp["id"]) == [(known.assignments[(user, exp["id"])],)]  # fmt: skip
    # the seed server's join: variant sizes of a test by name
    sizes = q(
        "SELECT v.variant_name, COUNT(a.id) AS users FROM ab_tests t "
        "JOIN ab_variants v ON v.test_id = t.id JOIN ab_assignments a ON a.variant_id = v.id "
        "WHERE t.test_name = {n:String} GROUP BY v.variant_name ORDER BY v.variant_name",
        n=exp["test_name"],
    )
    assert sizes == [("blue", 8), ("red", 16)]
    for test in (3, 4):
        sizes = q("SELECT a.variant_id, COUNT(*) FROM ab_assignments a JOIN ab_variants v ON a.variant_id = v.id "
                  "WHERE a.test_id = {t:Int64} GROUP BY a.variant_id", t=test)  # fmt: skip
        assert dict(sizes) == known.exposed(test)

    # ab_metrics: the tracked values, with the variant each user was in
    got = q("SELECT id, test_id, variant_id, metric_name, value, created_at FROM ab_metrics")
    variant_of = {u: v for (u, t), v in known.assignments.items() if t == exp["id"]}
    assert sorted(r[1:5] for r in got) == sorted(
        (exp["id"], variant_of[u], "revenue", value) for u, value in known.revenue.items()
    )
    assert all(window[0] <= _utc(r[5]) <= window[1] for r in got)
    averages = q(
        "SELECT v.variant_name, COUNT(*), AVG(m.value), SUM(m.value) FROM ab_metrics m "
        "JOIN ab_variants v ON m.variant_id = v.id WHERE m.test_id = {t:Int64} AND m.metric_name = 'revenue' "
        "GROUP BY v.variant_name ORDER BY v.variant_name",
        t=exp["id"],
    )
    per_variant: dict[str, list[float]] = {}
    for u, value in known.revenue.items():
        per_variant.setdefault(_variant_names(known)[variant_of[u]], []).append(value)
    assert averages == [(n, len(v), pytest.approx(sum(v) / len(v)), sum(v)) for n, v in sorted(per_variant.items())]

    # events: every accepted event (not the tracked values), with its session, properties and time
    assert dict(q("SELECT event_type, COUNT(*) FROM events GROUP BY event_type")) == Counter(
        s.name for s in known.events if s.kind == "event"
    )
    for user in (known.arkforge_users[0], known.calicritters_users[1]):
        got = q("SELECT id, event_type, user_id, session_id, properties, created_at FROM events "
                "WHERE user_id = {u:String} ORDER BY created_at, id", u=user)  # fmt: skip
        sent = sorted(
            (s.name, s.session_id, s.properties or {}) for s in known.events if s.user == user and s.kind == "event"
        )
        assert sorted((r[1], r[3], json.loads(r[4])) for r in got) == sent
        assert all(r[2] == user and window[0] <= _utc(r[5]) <= window[1] for r in got)
        assert [r[5] for r in got] == sorted(r[5] for r in got)
    ids = q("SELECT count(), uniqExact(id), min(id) FROM (SELECT id FROM events UNION ALL SELECT id FROM ab_metrics)")
    assert ids == [(len(known.events), len(known.events), ids[0][2])] and ids[0][2] >= 0
    (some_id,) = q("SELECT id FROM events WHERE user_id = {u:String} LIMIT 1", u=known.arkforge_users[0])[0]
    assert q("SELECT user_id FROM events WHERE id = {i:Int64}", i=some_id) == [(known.arkforge_users[0],)]


# --- docs/sql.md --------------------------------------------------------------------------------------------------

_PARAM = re.compile(r"\{(\w+):[^}]+\}")


def doc_sql() -> list[tuple[str, str]]:
    """(heading, sql) of every ```sql block of docs/sql.md, in order."""
    out: list[tuple[str, str]] = []
    heading, fence, block = "", None, []
    for line in DOC.read_text().splitlines():
        if fence is not None:  # inside a fenced block
            if line.startswith("```"):
                if fence == "sql":
                    out.append((heading, "\n".join(block)))
                fence, block = None, []
            else:
                block.append(line)
        elif line.startswith("```"):
            fence = line[3:].strip()
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return out


def doc_inline_selects() -> list[str]:
    """The SELECT statements quoted inline (`SELECT ...`) in docs/sql.md."""
    return [m for m in re.findall(r"`(SELECT [^`]+)`", DOC.read_text()) if "..." not in m.split("FROM")[0]]


WORKED = ("1. Daily active users", "2. An experiment's conversion per variant", "3. A funnel",
          "4. The raw events of one user", "5. Rejected events by code")  # fmt: skip


def test_docs_sql_has_the_five_worked_queries() -> None:
    headings = [h for h, _ in doc_sql()]
    assert [h for h in headings if h in WORKED] == list(WORKED)
    assert all(_PARAM.search(sql) for h, sql in doc_sql() if h in WORKED[1:]), "values come as query parameters"


def run(settings: Settings, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    wanted = {name: params[name] for name in _PARAM.findall(sql)}  # a KeyError names a parameter the test lacks
    c = ch_client(settings)
    try:
        result = c.query(sql, parameters=wanted)
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]
    finally:
        c.close()


def test_docs_sql_queries_answer_the_known_data(stack: tuple[Settings, str]) -> None:
    settings, base = stack
    known = load_known_data(settings, base)
    exp = known.experiment
    today = datetime.now(UTC).date()
    purchaser = known.arkforge_users[0]  # red, bought, tracked 10.0
    params: dict[str, Any] = {
        "from": today - timedelta(days=1), "to": today, "experiment": exp["key"], "event": "purchase",
        "step1": FUNNEL[0], "step2": FUNNEL[1], "step3": FUNNEL[2], "window_s": 86400, "user": purchaser,
        "since": datetime.fromtimestamp(known.started - 60, UTC).replace(tzinfo=None), "test_name": exp["test_name"],
    }  # fmt: skip
    blocks = doc_sql()
    checked = 0
    arkforge = 0
    for heading, sql in blocks:
        got = run(settings, sql, params)
        if heading == WORKED[0]:
            users = {s.user for s in known.events}
            assert sum(r["events"] for r in got) == len(known.events)
            if len(got) == 1:
                assert got == [{"day": got[0]["day"], "active_users": len(users), "events": len(known.events)}]
            assert max(r["active_users"] for r in got) <= len(users) <= sum(r["active_users"] for r in got)
        elif heading == WORKED[1]:
            check_conversion(got, known, exp["id"], "purchase")
            other = run(settings, sql, {**params, "experiment": "exp_4_achievements_density", "event": "app_open"})
            check_conversion(other, known, 4, "app_open")
        elif heading == WORKED[2]:
            reached = [sum(1 for j in range(CALICRITTERS_USERS) if 1 + j % 3 >= step) for step in (1, 2, 3)]
            assert [(r["step"], r["users"]) for r in got] == [(1, reached[0]), (2, reached[1]), (3, reached[2])]
            assert [r["of_step_1"] for r in got] == pytest.approx([n / reached[0] for n in reached])
            rollup = rows(settings, "SELECT step, users FROM funnel_rollups WHERE funnel_key = 'workout_activation' "
                                    "AND experiment_id = 0 ORDER BY step")  # fmt: skip
            assert rollup == [(r["step"], r["users"]) for r in got], "the ad-hoc funnel agrees with the workers'"
        elif heading == WORKED[3]:
            sent = [s for s in known.events if s.user == purchaser]
            assert sorted((r["event_name"], r["kind"], r["surface"]) for r in got) == sorted(
                (s.name, s.kind, s.surface) for s in sent
            )
            assert sorted(json.dumps(json.loads(r["properties"]), sort_keys=True) for r in got) == sorted(
                json.dumps(s.properties or {}, sort_keys=True) for s in sent
            )
            assert all(r["experiment_map"] == {exp["key"]: "A"} for r in got), "enriched with the user's variant"
            assert [r["metric_value"] for r in got if r["kind"] == "metric"] == [known.revenue[purchaser]]
            assert [r["event_time"] for r in got] == sorted(r["event_time"] for r in got)
        elif heading == WORKED[4]:
            assert {(r["code"], r["scope"], r["surface"]): (r["rejections"], r["users"], r["example_field"])
                    for r in got} == {("invalid_event_name", "event", "v1"): (1, 1, "events.0.event_name"),
                                      ("invalid_platform", "request", "v1"): (1, 1, "platform")}  # fmt: skip
        elif heading == "The ArkForge tables" and "count(*) AS users" in sql:
            arkforge += 1
            assert [tuple(r.values()) for r in got] == [
                (exp["test_name"], "blue", 3.0, 8),
                (exp["test_name"], "red", 1.0, 16),
            ]
        elif heading == "The ArkForge tables" and "AVG(m.value)" in sql:
            arkforge += 1
            red = [10.0 + j for j in range(6)]
            blue = [10.0 + j for j in range(5)]
            assert [tuple(r.values()) for r in got] == [
                ("blue", "revenue", 5, pytest.approx(sum(blue) / 5), sum(blue)),
                ("red", "revenue", 6, pytest.approx(sum(red) / 6), sum(red)),
            ]
        else:
            pytest.fail(f"a SQL block of docs/sql.md that this test does not check: {heading}: {sql[:80]}")
        checked += 1
    assert checked == len(blocks) >= 7 and arkforge == 2
    for sql in doc_inline_selects():  # the short ones in the text run too
        run(settings, sql, params)


def check_conversion(got: list[dict[str, Any]], known: Known, experiment_id: int, event: str) -> None:
    exposed = known.exposed(experiment_id)
    values = known.values(experiment_id, "event", event)
    variants = [v for v in known.variants[experiment_id] if exposed[v["id"]]]
    assert [(r["variant_key"], r["variant_name"], r["exposed_users"]) for r in got] == [
        (v["key"], v["name"], exposed[v["id"]]) for v in variants
    ]
    for row, v in zip(got, variants, strict=True):
        n, converted = exposed[v["id"]], sum(1 for x in values.get(v["id"], []) if x)
        low, high = proportion_confint(converted, n, alpha=0.05, method="wilson")
        assert (row["converted"], row["conversion_rate"]) == (converted, pytest.approx(converted / n))
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    if experiment_id == known.experiment["id"]:
        assert [r["converted"] for r in got] == [6, 5]

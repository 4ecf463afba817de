"""Grafana dashboards (grafana/dashboards/*.json): well-formed for the provisioned ClickHouse datasource, every
panel's SQL runs on the real ClickHouse schema, and every panel shows the right figures for data that went
through the whole pipeline.

Grafana cannot run here, so the ClickHouse plugin's macros (and the dashboards' template variables) are expanded
the way the plugin (v4) and Grafana do it, and the query is sent through clickhouse-connect. ``load_known_data``
posts a known set of users, assignments, events and tracked values over HTTP to a running gateway and waits until
the workers have written them; ``test_sql`` reuses it, and ``test_stream_workers`` reuses :func:`panel_results`.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import yaml
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from abstream.clickhouse import client as ch_client
from abstream.config import Settings
from abstream.migrate import migrate
from gateway.assignment import Bucketer
from tests.stack import rows, scalar, wait_for

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
DATASOURCE = ROOT / "grafana" / "provisioning" / "datasources" / "clickhouse.yml"
PLUGIN = "grafana-clickhouse-datasource"
TIMESERIES, TABLE = 0, 1  # the plugin's `format` enum
OVERVIEW, EXPERIMENTS, INGESTION = (
    ROOT / "grafana" / "dashboards" / f"{n}.json" for n in ("overview", "experiments", "ingestion")
)

_TIME_FILTER = re.compile(r"\$__timeFilter\(([^)]+)\)")
_DATE_FILTER = re.compile(r"\$__dateFilter\(([^)]+)\)")
_TIME_INTERVAL = re.compile(r"\$__timeInterval\(([^)]+)\)")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(?!__)(\w+)")
INTERVAL_S = 60


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def variables_of(dashboard: dict[str, Any]) -> set[str]:
    return {v["name"] for v in dashboard.get("templating", {}).get("list", [])}


def expand(
    sql: str, start: int, end: int, interval_s: int = INTERVAL_S, variables: dict[str, str] | None = None
) -> str:
    """The plugin's macros for the time range [start, end] (epoch seconds) and Grafana's substitution of the
    dashboard variables (a single value is inserted as is, ``${name}`` or ``$name``); anything else is an error."""
    sql = _TIME_FILTER.sub(rf"\1 >= toDateTime({start}) AND \1 <= toDateTime({end})", sql)
    first, last = (datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d") for t in (start, end))
    sql = _DATE_FILTER.sub(rf"\1 >= toDate('{first}') AND \1 <= toDate('{last}')", sql)
    sql = _TIME_INTERVAL.sub(rf"toStartOfInterval(toDateTime(\1), INTERVAL {interval_s} second)", sql)
    sql = sql.replace("$__fromTime", f"toDateTime({start})").replace("$__toTime", f"toDateTime({end})")
    sql = sql.replace("$__interval_s", str(interval_s))
    values = variables or {}
    sql = _VARIABLE.sub(lambda m: values[m.group(1) or m.group(2)], sql)
    assert "$" not in sql, f"a macro or variable this test does not expand: {sql}"
    return sql


def panel_results(
    settings: Settings, path: Path, window_s: int = 3600, variables: dict[str, str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Title -> rows (as dicts) of every panel's query over the last ``window_s`` seconds."""
    now = int(time.time())
    out: dict[str, list[dict[str, Any]]] = {}
    client = ch_client(settings)
    try:
        for panel in load(path)["panels"]:
            (target,) = panel["targets"]
            result = client.query(expand(target["rawSql"], now - window_s, now + 60, variables=variables))
            out[panel["title"]] = [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]
    finally:
        client.close()
    return out


# --- well-formed -----------------------------------------------------------------------------------------------


def test_the_dashboards_exist() -> None:
    assert {OVERVIEW, EXPERIMENTS, INGESTION} <= set(DASHBOARDS)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed_for_the_provisioned_datasource(path: Path) -> None:
    (datasource,) = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    dash = load(path)
    assert dash["uid"] and dash["title"] and dash["panels"]
    assert dash["timezone"] == "utc", "days in the rollups are UTC days"
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids), "panel ids are unique"
    titles = [p["title"] for p in dash["panels"]]
    assert len(set(titles)) == len(titles), "panel titles are unique (the tests find panels by title)"
    defined = variables_of(dash)
    for panel in dash["panels"]:
        where = f"{path.name}: {panel['title']}"
        assert panel.get("description"), f"{where}: say what the panel shows and where it comes from"
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, where
        assert panel["datasource"] == {"type": PLUGIN, "uid": datasource["uid"]}, where
        (target,) = panel["targets"]
        assert target["datasource"] == panel["datasource"] and target["editorType"] == "sql", where
        if panel["type"] == "timeseries":
            assert (target["format"], target["queryType"]) == (TIMESERIES, "timeseries"), where
            assert re.search(r"\bAS time\b", target["rawSql"]), f"{where}: the time column is named time"
        else:
            assert (target["format"], target["queryType"]) == (TABLE, "table"), where
        used = {a or b for a, b in _VARIABLE.findall(target["rawSql"])}
        assert used <= defined, f"{where}: undefined dashboard variables {used - defined}"
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


def test_experiment_variable_lists_the_registry() -> None:
    (variable,) = load(EXPERIMENTS)["templating"]["list"]
    assert variable["name"] == "experiment" and variable["type"] == "query"
    assert variable["datasource"] == {"type": PLUGIN, "uid": "abstream-clickhouse"}
    # the plugin takes the first column as the value and the second as the text shown
    assert re.match(r"SELECT experiment_id, .+ FROM experiments FINAL", variable["query"])
    assert variable["definition"] == variable["query"] and not variable["multi"] and not variable["includeAll"]


def test_srm_critical_values_are_chi_square_quantiles() -> None:
    """The SRM panel's table of critical values at p = 0.001 for df 1..10."""
    sql = next(p for p in load(EXPERIMENTS)["panels"] if p["title"] == "Sample ratio (SRM)")["targets"][0]["rawSql"]
    table = json.loads(re.search(r"(\[10\.828[^\]]*\])", sql).group(1))  # type: ignore[union-attr]
    assert table == [round(float(sps.chi2.isf(0.001, df)), 3) for df in range(1, 11)]


EMPTY_VARIABLES = {"experiment": "3"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_query_runs_on_the_migrated_schema(settings: Settings, path: Path) -> None:
    migrate(settings, log=False)
    results = panel_results(settings, path, variables=EMPTY_VARIABLES)
    assert set(results) == {p["title"] for p in load(path)["panels"]}
    for panel in load(path)["panels"]:
        got = results[panel["title"]]
        if panel["type"] == "stat":
            # an empty database shows zeros, nothing or "no data", not errors
            (row,) = got
            assert all(v in (0, None, "no data") for v in row.values()), (panel["title"], row)
        else:
            assert got == [], panel["title"]


# --- known data through the whole pipeline --------------------------------------------------------------------

FUNNEL = ("app_open", "workout_started", "session_submitted")
CALICRITTERS_USERS = 9
RED_USERS, BLUE_USERS = 16, 8  # against weights 1:3 (expected 6 and 18): a sample-ratio mismatch on purpose
PURCHASERS = (6, 5)  # the first users of red, of blue, buy (and track revenue)
SKEW_S = 30  # every third Calicritters request comes from a device whose clock is 30 s behind
Z = float(sps.norm.ppf(0.975))


class Sent(NamedTuple):
    user: str
    name: str
    kind: str  # event | metric
    surface: str  # v1 | apiv1 | track
    platform: str
    app_version: str
    session_id: str | None = None
    properties: dict[str, Any] | None = None
    value: float | None = None  # tracked metrics (all of them for the ArkForge test)


@dataclass
class Known:
    """What ``load_known_data`` sent: the figures the dashboards and the SQL must show."""

    tag: str
    started: float
    finished: float
    experiment: dict[str, Any]  # the ArkForge test as POST /apiv1/ab-tests answered it
    events: list[Sent]
    assignments: dict[tuple[str, int], int]  # (user, experiment id) -> variant id, as the gateway answered
    revenue: dict[str, float]
    variants: dict[int, list[dict[str, Any]]]  # experiment id -> its variants (id, key, name, weight), in order
    calicritters_users: list[str]
    arkforge_users: list[str]
    rejections: Counter[tuple[str, str]] = field(default_factory=Counter)  # (code, scope) -> count

    def exposed(self, experiment_id: int) -> Counter[int]:
        return Counter(v for (_, e), v in self.assignments.items() if e == experiment_id)

    def values(self, experiment_id: int, source: str, name: str) -> dict[int, list[float]]:
        """Variant id -> every exposed user's x: their events of ``name`` (source event, all of them came after
        the assignment) or the sum of their tracked ``name`` values (source tracked)."""
        out: dict[int, list[float]] = {}
        kind = "metric" if source == "tracked" else "event"
        for (user, e), variant in sorted(self.assignments.items()):
            if e == experiment_id:
                mine = [s for s in self.events if s.user == user and s.kind == kind and s.name == name]
                x = sum(s.value or 0.0 for s in mine) if kind == "metric" else len(mine)
                out.setdefault(variant, []).append(float(x))
        return out

    def sources(self, experiment_id: int) -> set[tuple[str, str]]:
        users = {u for (u, e) in self.assignments if e == experiment_id}
        return {("tracked" if s.kind == "metric" else "event", s.name) for s in self.events if s.user in users}


def _post(url: str, body: Any, status: int = 200) -> Any:
    r = httpx.post(url, json=body, timeout=15)
    assert r.status_code == status, r.text
    return r.json()


EXP3_SPLIT = (5, 3, 1)  # Calicritters users per variant of experiment 3: one variant has a single user
EXP4_SPLIT = (9, 0)  # and all of them in the first variant of experiment 4: one variant has none


def calicritters_users(tag: str) -> list[str]:
    """User ids picked by their buckets in the tests.json experiments 3 and 4 (docs/assignment.md), so that the
    splits are EXP3_SPLIT and EXP4_SPLIT: the edge cases of one and no user in a variant are always there."""
    manifest = {e["id"]: e for e in json.loads((ROOT / "tests.json").read_text())["experiments"]}
    bucketers = [
        Bucketer(e.get("hash_seed") or e["key"], e["key"], e["coverage"], [v["weight"] for v in e["variants"]])
        for e in (manifest[3], manifest[4])
    ]
    left3, left4, users, i = list(EXP3_SPLIT), list(EXP4_SPLIT), [], 0
    while len(users) < CALICRITTERS_USERS:
        user, i = f"cc-{tag}-{i}", i + 1
        v3, v4 = (b.variant_index(user) for b in bucketers)
        if v3 is not None and v4 is not None and left3[v3] and left4[v4]:
            left3[v3], left4[v4] = left3[v3] - 1, left4[v4] - 1
            users.append(user)
    return users


def load_known_data(settings: Settings, base: str) -> Known:
    """Post a known data set over HTTP to the gateway at ``base`` and wait until ClickHouse holds all of it.

    * 9 Calicritters users (/v1): assigned to the tests.json experiments 3 and 4 (split 5/3/1 and 9/0, picked by
      their buckets), events along the funnel
      app_open -> workout_started -> session_submitted (user j reaches step 1 + j % 3, odd users open the app
      twice), platforms ios/android and app versions 1.3.0/1.2.0; every third request has a device clock 30 s
      behind (sent_at). They are assigned before the ArkForge test exists, so they are not in it.
    * An ArkForge test "Checkout button" with variants red (weight 1) and blue (weight 3); 24 users picked by their
      bucket so that 16 are red and 8 blue (a sample-ratio mismatch). Each views pages 1 + j % 3 times (with a
      session and properties), the first 6 red and 5 blue users purchase and track revenue 10 + j.
    * One rejected event (invalid_event_name) and one refused request (invalid_platform).
    """
    tag = uuid.uuid4().hex[:6]
    started = time.time()
    events: list[Sent] = []
    assignments: dict[tuple[str, int], int] = {}

    cc_users = calicritters_users(tag)
    for j, user in enumerate(cc_users):
        context = {"anonymous_user_id": user, "platform": "ios" if j < 6 else "android",
                   "app_version": "1.3.0" if j % 2 == 0 else "1.2.0"}  # fmt: skip
        for a in _post(f"{base}/v1/assignment", context)["assignments"]:
            assignments[(user, a["experiment_id"])] = a["variant_id"]
        names = [*FUNNEL[: 1 + j % 3], *["app_open"] * (j % 2)]
        now = datetime.now(UTC)
        body: dict[str, Any] = {**context, "events": [
            {"event_name": n, "occurred_at": (now - timedelta(seconds=60 - k)).isoformat()} for k, n in enumerate(names)
        ]}  # fmt: skip
        if j % 3 == 0:
            body["sent_at"] = (now - timedelta(seconds=SKEW_S)).isoformat()
        answer = _post(f"{base}/v1/events", body)
        assert [e["status"] for e in answer["results"]] == ["accepted"] * len(names), answer
        events += [Sent(user, n, "event", "v1", context["platform"], context["app_version"]) for n in names]

    experiment = _post(f"{base}/apiv1/ab-tests", {
        "test_name": f"Checkout button {tag}", "description": "Red or blue checkout button",
        "variants": [{"variant_name": "red", "description": "Red button", "weight": 1},
                     {"variant_name": "blue", "weight": 3}],
    }, status=201)  # fmt: skip
    bucketer = Bucketer(experiment["key"], experiment["key"], 1.0, [1.0, 3.0])  # docs/assignment.md
    wanted = dict(zip((v["id"] for v in experiment["variants"]), (RED_USERS, BLUE_USERS), strict=True))
    by_variant: dict[int, list[str]] = {v: [] for v in wanted}
    i = 0
    while any(len(by_variant[v]) < n for v, n in wanted.items()):
        user, i = f"ark-{tag}-{i}", i + 1
        variant = experiment["variants"][bucketer.variant_index(user)]["id"]  # type: ignore[index]
        if len(by_variant[variant]) < wanted[variant]:
            by_variant[variant].append(user)
    for variant, users in by_variant.items():
        for user in users:
            answer = _post(f"{base}/apiv1/ab-tests/{experiment['id']}/assign", {"user_id": user})
            assert (answer["assigned"], answer["variant_id"]) == (True, variant), answer
            assignments[(user, experiment["id"])] = variant

    batch: list[dict[str, Any]] = []
    revenue: dict[str, float] = {}
    for position, users in enumerate(by_variant.values()):
        for j, user in enumerate(users):
            for k in range(1 + j % 3):
                props = {"page": "home", "n": k}
                batch.append(
                    {"event_type": "page_view", "user_id": user, "session_id": f"s-{user}", "properties": props}
                )
                events.append(Sent(user, "page_view", "event", "apiv1", "", "", f"s-{user}", props))
            if j < PURCHASERS[position]:
                props = {"sku": f"sku-{j}", "price": 10 + j}
                batch.append({"event_type": "purchase", "user_id": user, "properties": props})
                events.append(Sent(user, "purchase", "event", "apiv1", "", "", None, props))
                revenue[user] = 10.0 + j
    answer = _post(f"{base}/apiv1/events/batch", batch)
    assert [e["status"] for e in answer["results"]] == ["accepted"] * len(batch), answer
    for user, value in revenue.items():
        _post(
            f"{base}/apiv1/ab-tests/{experiment['id']}/track",
            {"user_id": user, "metric_name": "revenue", "value": value},
        )
        events.append(Sent(user, "revenue", "metric", "track", "", "", value=value))

    bad = httpx.post(f"{base}/v1/events", json={"anonymous_user_id": cc_users[0], "events": [
        {"event_name": "bad name!", "occurred_at": datetime.now(UTC).isoformat()}]}, timeout=15)  # fmt: skip
    assert bad.status_code in (200, 400), bad.text
    _post(f"{base}/v1/events", {"anonymous_user_id": cc_users[0], "platform": "web", "events": []}, status=400)

    known = Known(tag, started, 0.0, experiment, events, assignments, revenue, {}, cc_users,
                  [u for users in by_variant.values() for u in users],
                  Counter({("invalid_event_name", "event"): 1, ("invalid_platform", "request"): 1}))  # fmt: skip
    _wait_until_written(settings, known)
    known.variants = {
        e: [{"id": v, "key": k, "name": n, "weight": w} for v, k, n, w in rows(settings,
            "SELECT variant_id, variant_key, variant_name, weight FROM experiment_variants FINAL "
            "WHERE experiment_id = {e:UInt32} ORDER BY position", e=e)]
        for e in (3, 4)
    }  # fmt: skip
    known.variants[experiment["id"]] = [{"id": v["id"], "key": v["key"], "name": v["variant_name"], "weight": w}
                                        for v, w in zip(experiment["variants"], (1.0, 3.0), strict=True)]  # fmt: skip
    known.finished = time.time()
    return known


SOURCE_ROLLUPS = (
    "SELECT experiment_id, variant_id, source, name, users_with_metric, sum_x FROM experiment_source_rollups"
)
EXPOSED = "SELECT experiment_id, variant_id, exposed_users FROM experiment_exposed"
DAILY_TOTALS = "SELECT event_name, sum(events) FROM daily_metric_rollups WHERE platform = '*' GROUP BY event_name"


def _wait_until_written(settings: Settings, known: Known) -> None:
    n = len(known.events)
    wait_for(lambda: scalar(settings, "SELECT count() FROM event_logs FINAL") == n, what=f"{n} event_logs rows")
    wait_for(lambda: scalar(settings, "SELECT count() FROM rejected_events") == 2, what="2 rejected_events rows")
    n = len(known.assignments)
    wait_for(lambda: scalar(settings, "SELECT count() FROM assignments FINAL") == n, what=f"{n} assignments")
    wait_for(lambda: scalar(settings, "SELECT count() FROM experiment_variants FINAL") == 7, what="the registry copy")
    experiments = (3, 4, known.experiment["id"])
    sources: dict[tuple[Any, ...], tuple[int, float]] = {}
    for e in experiments:
        for source, name in known.sources(e):
            for variant, xs in known.values(e, source, name).items():
                if any(xs):
                    sources[(e, variant, source, name)] = (sum(1 for x in xs if x), sum(xs))
    exposed = {(e, v): c for e in experiments for v, c in known.exposed(e).items()}
    daily = Counter(s.name for s in known.events)

    def rollups() -> bool:
        got = {tuple(r[:4]): (r[4], r[5]) for r in rows(settings, SOURCE_ROLLUPS)}
        got_exposed = {(e, v): c for e, v, c in rows(settings, EXPOSED)}
        return got == sources and got_exposed == exposed and dict(rows(settings, DAILY_TOTALS)) == daily

    wait_for(rollups, what="the rollups of the known data")


# --- what each dashboard must show -------------------------------------------------------------------------------


def by(rows_: list[dict[str, Any]], *keys: str) -> dict[Any, dict[str, Any]]:
    out = {}
    for row in rows_:
        key = tuple(row[k] for k in keys)
        assert key not in out, f"duplicate row {key}"
        out[key[0] if len(keys) == 1 else key] = row
    return out


def label(value: str) -> str:
    return value or "(not sent)"


def check_overview(settings: Settings, known: Known) -> set[str]:
    p = panel_results(settings, OVERVIEW)
    users = {s.user for s in known.events}
    assert len(users) == CALICRITTERS_USERS + RED_USERS + BLUE_USERS
    assert p["Active users"] == [{"active_users": len(users)}]
    assert p["Events"] == [{"events": len(known.events)}]
    assert p["Events per active user"][0]["events_per_user"] == pytest.approx(len(known.events) / len(users))
    assert p["Event names"] == [{"event_names": len({s.name for s in known.events})}]
    per_series = Counter()
    for row in p["Events/s"]:
        per_series[row["series"]] += row["per_second"] * INTERVAL_S
    assert per_series == pytest.approx({"events": sum(s.kind == "event" for s in known.events),
                                        "tracked metrics": sum(s.kind == "metric" for s in known.events)})  # fmt: skip
    days = [r["daily_active_users"] for r in p["Daily active users"]]
    one_day = len(days) == 1  # the data set can straddle midnight UTC
    assert days == [len(users)] if one_day else max(days) <= len(users) <= sum(days)

    names = Counter(s.name for s in known.events)
    top = by(p["Top events"], "event_name")
    assert {n: r["event_count"] for n, r in top.items()} == names
    assert [r["event_name"] for r in p["Top events"]] == sorted(names, key=lambda n: (-names[n], n))
    assert sum(r["share"] for r in top.values()) == pytest.approx(1)
    for name, row in top.items():
        assert row["share"] == pytest.approx(names[name] / len(known.events))
        name_users = len({s.user for s in known.events if s.name == name})
        assert row["peak_daily_users"] == name_users if one_day else row["peak_daily_users"] <= name_users
    per_day = Counter()
    for row in p["Events per day, by event name"]:
        per_day[row["event_name"]] += row["event_count"]
    assert per_day == names  # six names: all of them are in the top ten

    platforms = Counter(label(s.platform) for s in known.events)
    assert {r["platform_name"]: r["event_count"] for r in p["Platform mix (events)"]} == platforms
    assert platforms == {"(not sent)": 57 + len(known.revenue), "ios": 15, "android": 7}  # the data set, spelled out
    versions = Counter(label(s.app_version) for s in known.events)
    assert {r["version_name"]: r["event_count"] for r in p["App version mix (events)"]} == versions
    mix: dict[tuple[str, str], set[str]] = {}
    for s in known.events:
        mix.setdefault((label(s.platform), label(s.app_version)), set()).add(s.user)
    got = by(p["Users by platform and app version"], "platform_name", "version_name")
    assert {k: r["users"] for k, r in got.items()} == {k: len(v) for k, v in mix.items()}
    assert {k: r["event_count"] for k, r in got.items()} == Counter(
        (label(s.platform), label(s.app_version)) for s in known.events
    )
    return set(p)


def check_experiment(settings: Settings, known: Known, experiment_id: int) -> set[str]:
    p = panel_results(settings, EXPERIMENTS, variables={"experiment": str(experiment_id)})
    variants = known.variants[experiment_id]
    exposed = known.exposed(experiment_id)
    (info,) = p["Experiment"]
    assert (info["experiment_id"], info["status"], info["phase"], info["variants"]) == (
        experiment_id, "RUNNING", 1, len(variants))  # fmt: skip
    if experiment_id == known.experiment["id"]:
        assert (info["experiment_key"], info["name"]) == (known.experiment["key"], known.experiment["test_name"])

    # exposures: by day (the test may straddle midnight) and in total, against the weights
    per_variant = Counter()
    for row in p["Exposures per variant by day"]:
        per_variant[row["variant"]] += row["users"]
    assert per_variant == {f"{v['key']} {v['name']}": exposed[v["id"]] for v in variants if exposed[v["id"]]}
    total, weight_sum = sum(exposed.values()), sum(v["weight"] for v in variants)
    table = p["Exposed users per variant"]
    assert [r["variant_key"] for r in table] == [v["key"] for v in variants]
    for row, v in zip(table, variants, strict=True):
        assert row["variant_name"] == v["name"] and row["exposed_users"] == exposed[v["id"]]
        assert row["weight_share"] == pytest.approx(v["weight"] / weight_sum)
        assert row["observed_share"] == pytest.approx(exposed[v["id"]] / total)
        assert row["expected_users"] == pytest.approx(total * v["weight"] / weight_sum)

    # SRM: chi-square of the exposed users against the normalised weights, as scipy computes it
    observed = [exposed[v["id"]] for v in variants]
    expected = [total * v["weight"] / weight_sum for v in variants]
    chi2, p_value = sps.chisquare(observed, f_exp=expected)
    df = len(variants) - 1
    (srm,) = p["Sample ratio (SRM)"]
    assert srm["exposed_users"] == total and srm["df"] == df
    assert srm["chi2"] == pytest.approx(chi2, rel=1e-12)
    assert srm["critical_value"] == pytest.approx(sps.chi2.isf(0.001, df), abs=1e-3)
    assert srm["p_value"] == pytest.approx(p_value, rel=1e-9, abs=1e-300)
    assert srm["srm"] == ("MISMATCH" if p_value < 0.001 else "OK")
    assert (chi2 > srm["critical_value"]) == (p_value < 0.001), "the table agrees with the p-value"
    if experiment_id == known.experiment["id"]:
        assert srm["srm"] == "MISMATCH" and chi2 == pytest.approx(100 / 6 + 100 / 18)  # 16/8 against 6/18

    # conversion and means per (source, name) and variant
    conversion = by(p["Conversion per variant (95% Wilson interval)"], "metric", "source", "variant_key")
    means = by(p["Mean per exposed user (95% interval)"], "metric", "source", "variant_key")
    sources = known.sources(experiment_id)
    assert {(m, s) for m, s, _ in conversion} == {(n, s) for s, n in sources} == {(m, s) for m, s, _ in means}
    assert len(conversion) == len(means) == len(sources) * len(variants)
    for source, name in sources:
        values = known.values(experiment_id, source, name)
        for v in variants:
            xs = values.get(v["id"], [])
            n, converted = len(xs), sum(1 for x in xs if x)
            row = conversion[(name, source, v["key"])]
            assert (row["variant_name"], row["exposed_users"], row["converted"]) == (v["name"], n, converted)
            if n == 0:  # experiment 4's second variant
                assert (row["rate"], row["ci_low"], row["ci_high"]) == (None, None, None)
            else:
                low, high = proportion_confint(converted, n, alpha=0.05, method="wilson")
                assert row["rate"] == pytest.approx(converted / n)
                assert (row["ci_low"], row["ci_high"]) == (pytest.approx(max(0.0, low)), pytest.approx(min(1.0, high)))
            row = means[(name, source, v["key"])]
            assert (row["exposed_users"], row["total"]) == (n, pytest.approx(sum(xs)))
            assert row["mean"] == (pytest.approx(statistics.fmean(xs)) if n else None)
            if n < 2:  # no variance from fewer than two users (experiment 3's third variant)
                assert [row[k] for k in ("variance", "sd", "se", "ci_low", "ci_high")] == [None] * 5
                continue
            mean, var = statistics.fmean(xs), statistics.variance(xs)
            se = math.sqrt(var / n)
            assert row["variance"] == pytest.approx(var) and row["sd"] == pytest.approx(math.sqrt(var))
            assert row["se"] == pytest.approx(se)
            assert (row["ci_low"], row["ci_high"]) == (pytest.approx(mean - Z * se), pytest.approx(mean + Z * se))
    if experiment_id == known.experiment["id"]:  # the data set, spelled out
        assert conversion[("purchase", "event", "A")]["converted"] == 6
        assert means[("revenue", "tracked", "B")]["mean"] == pytest.approx(sum(10 + j for j in range(5)) / 8)

    (fresh,) = p["Data freshness"]
    latest = scalar(settings, "SELECT toUnixTimestamp64Milli(max(event_time)) FROM event_logs")
    assert fresh["latest_event_time"] == latest, "the watermark is the newest event time written"
    assert known.started - 61 <= latest / 1000 <= known.finished
    assert 0 <= fresh["updated_ago"] < time.time() - known.started + 5
    return set(p)


def check_ingestion(settings: Settings, known: Known) -> set[str]:
    # the workers may still flush (they re-read the registry every 5 s): read the panels and the raw flushes
    # between two identical counts of rollup_runs, so that both see the same flushes
    for _ in range(20):
        before = scalar(settings, "SELECT count() FROM rollup_runs")
        t0 = time.time()
        p = panel_results(settings, INGESTION)
        runs = rows(settings, "SELECT run_at, watermark, assignment_rows FROM rollup_runs ORDER BY run_at")
        if scalar(settings, "SELECT count() FROM rollup_runs") == before == len(runs):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the workers never stopped flushing")
    total = len(known.events)
    assert p["Accepted events"] == [{"accepted": total}]
    assert (p["Rejected events"], p["Refused requests"]) == ([{"rejected": 1}], [{"refused": 1}])
    assert p["Rejection rate"][0]["rate"] == pytest.approx(1 / (total + 1))
    surfaces = Counter()
    for row in p["Accepted events by surface"]:
        surfaces[row["surface"]] += row["events"]
    assert surfaces == Counter(s.surface for s in known.events)
    codes = Counter()
    for row in p["Rejections by code"]:
        codes[row["code"]] += row["rejections"]
    assert codes == {code: n for (code, _), n in known.rejections.items()}
    wrong = {(r["code"], r["scope"]): (r["rejections"], r["users"]) for r in p["What clients get wrong"]}
    assert wrong == {k: (n, 1) for k, n in known.rejections.items()}
    assert "bad name!" in next(r["raw"] for r in p["Latest rejected payloads"] if r["code"] == "invalid_event_name")
    latency = p["Pipeline latency: gateway receive -> ClickHouse row"]
    assert latency and all(0 <= r["p50"] <= r["p95"] <= r["p99"] < 60 for r in latency)
    skew = p["Client clock skew"]  # only the requests with sent_at, 30 s behind
    assert skew and all(SKEW_S - 1 <= r["p5"] <= r["p50"] <= r["p95"] <= SKEW_S + 5 for r in skew)
    delay = p["Event delay: occurred -> received"]  # /v1 events 60 s old (30 s once corrected), /apiv1 ones 0
    assert delay and all(0 <= r["p50"] <= r["p95"] <= 65 for r in delay)

    # the workers' side: rollup_runs
    flushes, last_run = len(runs), runs[-1][0]
    watermark = max(wm for _, wm, _ in runs if wm is not None)
    assert sum(n for *_, n in runs) == len(known.assignments), "each first assignment is written once"
    latest = scalar(settings, "SELECT max(event_time) FROM event_logs")
    assert watermark == latest
    assert 0 <= p["Rollups updated"][0]["rollups_age"] <= time.time() - last_run.replace(tzinfo=UTC).timestamp() + 1
    lag = p["Watermark lag"][0]["watermark_lag"]
    assert (
        t0 - latest.replace(tzinfo=UTC).timestamp() - 1
        <= lag
        <= time.time() - latest.replace(tzinfo=UTC).timestamp() + 1
    )
    assert p["Worker flushes"] == [{"flushes": flushes}] and flushes >= 1
    assert 0 < p["Flush duration p95"][0]["flush_p95"] < 10
    # per flush, run_at - watermark, averaged and maxed per interval: recomputed from the flushes themselves
    per_interval: dict[datetime, list[float]] = {}
    for run_at, wm, _ in runs:
        if wm is not None:
            bucket = run_at.replace(second=0, microsecond=0)  # INTERVAL_S = 60
            per_interval.setdefault(bucket, []).append((run_at - wm).total_seconds())
    lags = by(p["Worker lag per flush: flush time - watermark"], "time")
    assert set(lags) == set(per_interval)
    for bucket, values in per_interval.items():
        assert lags[bucket]["lag_avg"] == pytest.approx(statistics.fmean(values), abs=1e-9)
        assert lags[bucket]["lag_max"] == pytest.approx(max(values), abs=1e-9)
        # every event time written is in the past, and none is older than the load's 60 s old /v1 events
        assert 0 <= min(values) and max(values) <= time.time() - known.started + 61
    assert all(0 < r["p50"] <= r["p95"] <= r["max"] < 10 for r in p["Flush duration"])
    written = p["Rows written by the workers"]
    assert sum(r["assignments"] for r in written) == len(known.assignments)
    assert sum(r["events"] for r in written) >= total, "re-enriched events are written again"
    (worker,) = p["Workers"]
    assert worker["flushes"] == flushes and worker["assignment_rows"] == len(known.assignments)
    assert worker["event_rows"] == sum(r["events"] for r in written)
    assert worker["rollup_rows"] == sum(r["rollups"] for r in written) > 0
    assert worker["last_flush"] == last_run and 0 <= worker["seconds_ago"] < 60
    assert set(worker["partitions"]) <= set(range(settings.kafka_partitions))
    assert 0 < worker["flush_ms_p50"] <= worker["flush_ms_max"]
    return set(p)


def test_dashboards_show_data_sent_through_the_pipeline(stack: tuple[Settings, str]) -> None:
    settings, base = stack
    known = load_known_data(settings, base)
    checked = {
        OVERVIEW: check_overview(settings, known),
        EXPERIMENTS: check_experiment(settings, known, known.experiment["id"]),
        INGESTION: check_ingestion(settings, known),
    }
    assert [known.exposed(3)[v] for v in (3001, 3002, 3003)] == list(EXP3_SPLIT)
    assert [known.exposed(4)[v] for v in (4001, 4002)] == list(EXP4_SPLIT)
    for experiment_id in (3, 4):  # three variants (df 2), one with a single user; two (df 1), one empty
        check_experiment(settings, known, experiment_id)
    for path in DASHBOARDS:
        assert checked.get(path) == {p["title"] for p in load(path)["panels"]}, f"{path.name}: a panel is not checked"

    # the experiment variable: value = id, text = name and key
    (variable,) = load(EXPERIMENTS)["templating"]["list"]
    listed = rows(settings, variable["query"])
    assert [v for v, _ in listed] == [known.experiment["id"], 4, 3]
    assert listed[0][1] == f"{known.experiment['test_name']} ({known.experiment['key']}, #{known.experiment['id']})"


def test_expand_dates_are_utc_days() -> None:
    start = int(datetime(2026, 3, 1, 23, 30, tzinfo=UTC).timestamp())
    sql = expand(
        "SELECT 1 WHERE $__dateFilter(day) AND x = ${experiment}", start, start + 3600, variables={"experiment": "7"}
    )
    assert sql == "SELECT 1 WHERE day >= toDate('2026-03-01') AND day <= toDate('2026-03-02') AND x = 7"

"""Grafana dashboards (grafana/dashboards/*.json): well-formed for the provisioned ClickHouse datasource, and
every panel's SQL runs on the real ClickHouse schema.

Grafana cannot run here, so the ClickHouse plugin's macros are expanded the way the plugin (v4) does it and
the query is sent through clickhouse-connect. ``test_stream_workers`` reuses :func:`panel_results` to check
the ingestion dashboard's figures against events that went through the whole pipeline.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from abstream.clickhouse import client as ch_client
from abstream.config import Settings
from abstream.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
DATASOURCE = ROOT / "grafana" / "provisioning" / "datasources" / "clickhouse.yml"
PLUGIN = "grafana-clickhouse-datasource"
TIMESERIES, TABLE = 0, 1  # the plugin's `format` enum

_TIME_FILTER = re.compile(r"\$__timeFilter\(([^)]+)\)")
_TIME_INTERVAL = re.compile(r"\$__timeInterval\(([^)]+)\)")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def expand(sql: str, start: int, end: int, interval_s: int = 60) -> str:
    """The plugin's macros for the time range [start, end] (epoch seconds); anything else is an error."""
    sql = _TIME_FILTER.sub(rf"\1 >= toDateTime({start}) AND \1 <= toDateTime({end})", sql)
    sql = _TIME_INTERVAL.sub(rf"toStartOfInterval(toDateTime(\1), INTERVAL {interval_s} second)", sql)
    sql = sql.replace("$__fromTime", f"toDateTime({start})").replace("$__toTime", f"toDateTime({end})")
    sql = sql.replace("$__interval_s", str(interval_s))
    assert "$" not in sql, f"a macro or variable this test does not expand: {sql}"
    return sql


def panel_results(settings: Settings, path: Path, window_s: int = 3600) -> dict[str, list[dict[str, Any]]]:
    """Title -> rows (as dicts) of every panel's query over the last ``window_s`` seconds."""
    now = int(time.time())
    out: dict[str, list[dict[str, Any]]] = {}
    client = ch_client(settings)
    try:
        for panel in load(path)["panels"]:
            (target,) = panel["targets"]
            result = client.query(expand(target["rawSql"], now - window_s, now + 60))
            out[panel["title"]] = [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]
    finally:
        client.close()
    return out


def test_there_is_an_ingestion_dashboard() -> None:
    assert ROOT / "grafana" / "dashboards" / "ingestion.json" in DASHBOARDS


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed_for_the_provisioned_datasource(path: Path) -> None:
    (datasource,) = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    dash = load(path)
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids), "panel ids are unique"
    for panel in dash["panels"]:
        where = f"{path.name}: {panel['title']}"
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
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_query_runs_on_the_migrated_schema(settings: Settings, path: Path) -> None:
    migrate(settings, log=False)
    results = panel_results(settings, path)
    assert set(results) == {p["title"] for p in load(path)["panels"]}
    for panel in load(path)["panels"]:
        if panel["type"] == "stat":
            (row,) = results[panel["title"]]
            assert list(row.values()) == [0], panel["title"]  # an empty database shows zeros, not errors
        else:
            assert results[panel["title"]] == [], panel["title"]

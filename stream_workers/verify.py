"""`abstream verify`: recompute every rollup from scratch over event_logs and assignments in ClickHouse
and compare it with what the stream wrote. A clean run prints the totals compared and exits 0; every
difference is printed (key, expected from the raw log, found in the rollup) and the exit code is 1.

It uses the same per-user ``contribution`` as the stream (stream_workers.rollups), fed from the stored
rows instead of the live stream, so any difference means data lost or counted twice on the way.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Any

from abstream.clickhouse import client as ch_client
from abstream.config import Settings
from schemas.experiments import load_manifest
from stream_workers.pipeline import Pipeline, event_from_log
from stream_workers.rollups import Assignment, Funnels, Key, Stats, Totals, UserState, contribution
from stream_workers.rules import RULES_SQL, rules_from_registry

_EPOCH = date(1970, 1, 1)

ACTUAL_QUERIES = {
    "m": "SELECT experiment_id, variant_id, metric, day, sum(users_with_metric), sum(event_count), sum(n), "
    "sum(sum_x), sum(sum_x2) FROM experiment_metric_rollups_by_partition FINAL "
    "GROUP BY experiment_id, variant_id, metric, day",
    "e": "SELECT experiment_id, variant_id, day, sum(users) FROM experiment_exposures_by_partition FINAL "
    "GROUP BY experiment_id, variant_id, day",
    "f": "SELECT funnel_key, experiment_id, variant_id, step, sum(users) FROM funnel_rollups_by_partition FINAL "
    "GROUP BY funnel_key, experiment_id, variant_id, step",
    "d": "SELECT day, event_name, platform, app_version, sum(events), sum(unique_users) "
    "FROM daily_metric_rollups_by_partition FINAL GROUP BY day, event_name, platform, app_version",
    "x": "SELECT experiment_id, phase, variant_id, sum(users) FROM experiment_exposed_by_partition FINAL "
    "GROUP BY experiment_id, phase, variant_id",
    "xd": "SELECT experiment_id, phase, variant_id, day, sum(users) FROM experiment_exposed_daily_by_partition FINAL "
    "GROUP BY experiment_id, phase, variant_id, day",
    "c": "SELECT experiment_id, phase, variant_id, source, name, sum(users_with_metric), sum(event_count), "
    "sum(sum_x), sum(sum_x2), sum(users_with_pre), sum(sum_y), sum(sum_y2), sum(sum_xy), sum(users_with_both), "
    "sum(users_nonzero) "
    "FROM experiment_source_rollups_by_partition FINAL GROUP BY experiment_id, phase, variant_id, source, name",
    "r": "SELECT experiment_id, phase, variant_id, metric, sum(sum_x), sum(sum_x2), sum(sum_y), sum(sum_y2), "
    "sum(sum_xy) FROM experiment_ratio_rollups_by_partition FINAL GROUP BY experiment_id, phase, variant_id, metric",
    "l": "SELECT day, sum(users) FROM user_last_active_by_partition FINAL GROUP BY day",
}
KEY_WIDTH = {"m": 4, "e": 3, "f": 4, "d": 4, "x": 3, "xd": 4, "c": 5, "r": 4, "l": 1}
NAMES = {
    "m": "experiment_metric_rollups",
    "e": "experiment_exposures",
    "f": "funnel_rollups",
    "d": "daily_metric_rollups",
    "x": "experiment_exposed",
    "xd": "experiment_exposed_daily",
    "c": "experiment_source_rollups",
    "r": "experiment_ratio_rollups",
    "l": "user_last_active",
}


def _norm(value: Any) -> Any:
    return (value - _EPOCH).days if isinstance(value, date) else value


def expected_totals(settings: Settings) -> dict[Key, Stats]:
    """Every rollup total recomputed from event_logs FINAL and assignments."""
    manifest = load_manifest(settings.manifest_file)
    funnels = Funnels(manifest.funnels)
    client = ch_client(settings)
    users: dict[str, UserState] = {}
    try:
        rules = rules_from_registry(client.query(RULES_SQL).result_rows, manifest.experiments)
        for row in client.query(
            "SELECT user_id, experiment_id, experiment_key, variant_id, variant_key, phase, "
            "toUnixTimestamp64Milli(assigned_at), assignment_version FROM assignments FINAL"
        ).result_rows:
            user = users.setdefault(row[0], UserState())
            Pipeline._keep_first(user, Assignment(*row[1:]))
        for row in client.query(
            "SELECT user_id, event_id, event_name, kind, toUnixTimestamp64Milli(event_time), "
            "toUnixTimestamp64Milli(received_at), platform, app_version, experiment_id, metric_value, assignments "
            "FROM event_logs FINAL"
        ).result_rows:
            users.setdefault(row[0], UserState()).add_event(event_from_log(*row[1:]), funnels)
    finally:
        client.close()
    totals = Totals()
    for user in users.values():
        totals.add(contribution(user, funnels, rules))
    return {k: v for k, v in totals.items() if any(v)}


def actual_totals(settings: Settings) -> dict[Key, Stats]:
    client = ch_client(settings)
    out: dict[Key, Stats] = {}
    try:
        for kind, sql in ACTUAL_QUERIES.items():
            width = KEY_WIDTH[kind]
            for row in client.query(sql).result_rows:
                stats = [float(v) for v in row[width:]]
                if any(stats):
                    out[(kind, *(_norm(v) for v in row[:width]))] = stats
    finally:
        client.close()
    return out


def _same(a: Stats, b: Stats) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


def differences(expected: dict[Key, Stats], actual: dict[Key, Stats]) -> list[str]:
    out = []
    for key in sorted(set(expected) | set(actual), key=repr):
        exp, act = expected.get(key), actual.get(key)
        if exp is None or act is None or not _same(exp, act):
            out.append(f"{NAMES[key[0]]} {key[1:]}: expected {exp} from the raw log, rollup has {act}")
    return out


def run(settings: Settings) -> int:
    expected = expected_totals(settings)
    actual = actual_totals(settings)
    diffs = differences(expected, actual)
    for line in diffs:
        print(line)
    by_kind = {k: sum(1 for key in expected if key[0] == k) for k in NAMES}
    summary = ", ".join(f"{NAMES[k]}: {n} totals" for k, n in by_kind.items())
    if diffs:
        print(f"verify: {len(diffs)} difference(s) ({summary})")
        return 1
    print(f"verify: clean ({summary})")
    return 0

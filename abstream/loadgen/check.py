"""`--check`: the pipeline's counts against the run's exact truth, and each result's interval against the
scenario's true effect.

Read through the public interfaces only: ClickHouse SQL (``event_logs FINAL``, ``assignments``, the rollup
views) and the results API. The rollup views sum every user of the stack, so their figures are compared as
the change over the run (a snapshot is taken before it): exact when loadgen is the only traffic, as in CI
and ``abstream chaos``. ``event_logs``, ``assignments`` and the results of the run's own experiments are the
run's users only, exact whatever else is running.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from abstream.clickhouse import client as ch_client
from abstream.config import Settings
from abstream.loadgen.population import MS_PER_DAY
from abstream.loadgen.runner import CreatedExperiment, Run
from abstream.loadgen.truth import FUNNEL_EVENTS, METRICS, Truth, true_effect

Snapshot = dict[str, Counter[tuple[Any, ...]]]
QUIET_S = 2.0
RECHECK_S = 1.0


@dataclass
class Row:
    what: str
    pipeline: object
    truth: object
    ok: bool


@dataclass
class Coverage:
    experiment: str
    metric: str
    variant: str
    true_effect: float
    estimate: float | None
    low: float | None
    high: float | None
    covered: bool | None  # None: no interval (a guard rail answered a reason)
    significant: bool | None
    reason: str | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    coverage: list[Coverage] = field(default_factory=list)
    waited_s: float = 0.0
    reads: int = 0  # comparisons made until equal (or the deadline)
    caught_up: list[str] = field(default_factory=list)  # rows different at the first read, equal at the last

    @property
    def counts_equal(self) -> bool:
        return all(r.ok for r in self.rows)

    def add(self, what: str, pipeline: object, truth: object, ok: bool | None = None) -> None:
        self.rows.append(Row(what, pipeline, truth, pipeline == truth if ok is None else ok))


def _funnels(settings: Settings) -> list[tuple[str, tuple[str, ...], int, list[int]]]:
    """The manifest's funnels made only of simulated events: (key, steps, window ms, experiment ids)."""
    from schemas.experiments import load_manifest

    try:
        manifest = load_manifest(settings.manifest_file)
    except Exception:  # noqa: BLE001 - no manifest here (a remote stack): funnels are not compared
        return []
    ids = {e.key: e.id for e in manifest.experiments}
    out = []
    for f in manifest.funnels:
        if set(f.steps) <= set(FUNNEL_EVENTS):
            keys = f.experiment_keys if f.experiment_keys is not None else list(ids)
            out.append((f.key, tuple(f.steps), f.conversion_window_seconds * 1000, [ids[k] for k in keys if k in ids]))
    return out


def snapshot(settings: Settings) -> Snapshot:
    """The rollup views' figures before the run (what the run's changes are measured from)."""
    c = ch_client(settings)
    try:
        daily = c.query("SELECT toUInt32(day), event_name, events FROM daily_metric_rollups "
                        "WHERE platform = '*' AND app_version = '*'").result_rows  # fmt: skip
        funnels = c.query("SELECT funnel_key, experiment_id, variant_id, step, users FROM funnel_rollups").result_rows
    finally:
        c.close()
    return {
        "daily": Counter({(int(d), n): int(e) for d, n, e in daily}),
        "funnels": Counter({(k, int(e), int(v), int(s)): int(u) for k, e, v, s, u in funnels}),
    }


def wait_for_pipeline(settings: Settings, run: Run, timeout_s: float = 180.0) -> float:
    """Wait until every acknowledged event is in event_logs and the rollups have caught up; seconds waited."""
    t0 = time.monotonic()
    prefix = f"lg-{run.run_id}-"
    want = run.truth.events()
    c = ch_client(settings)
    try:
        while time.monotonic() - t0 < timeout_s:
            have = c.query("SELECT count() FROM event_logs FINAL WHERE startsWith(user_id, {p:String})",
                           parameters={"p": prefix}).result_rows[0][0]  # fmt: skip
            if have >= want:
                break
            time.sleep(0.5)
        # then until the workers are quiet: no flush for QUIET_S (an active worker flushes every 0.25 s), so
        # the rollups written with (or after) the last events have landed
        last, quiet_since = None, time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            now = c.query("SELECT max(run_at) FROM rollup_runs").result_rows[0][0]
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= QUIET_S:
                break
            time.sleep(0.25)
    finally:
        c.close()
    return time.monotonic() - t0


def _results(base_url: str, exp: CreatedExperiment) -> dict[str, Any]:
    r = httpx.get(f"{base_url}/apiv1/ab-tests/{exp.id}/results", params={"level": "0.95"}, timeout=30)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def _close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def check(settings: Settings, run: Run, before: Snapshot | None, drain_timeout_s: float = 180.0) -> Report:
    """Compare once the pipeline looks drained; while anything differs, read again (every RECHECK_S) until
    it is equal or ``drain_timeout_s`` has passed since the start. The pipeline is eventually consistent
    (events, assignments and each rollup travel separately), so equality is what it must reach, and a
    difference that stays is reported as it stands at the deadline."""
    t0 = time.monotonic()
    wait_for_pipeline(settings, run, drain_timeout_s)
    reads = 0
    first: list[str] | None = None
    while True:
        report = _compare(settings, run, before)
        reads += 1
        if first is None:
            first = [r.what for r in report.rows if not r.ok]
        if report.counts_equal or time.monotonic() - t0 >= drain_timeout_s:
            break
        time.sleep(RECHECK_S)
    report.waited_s = time.monotonic() - t0
    report.reads = reads
    report.caught_up = [what for what in first or [] if all(r.ok for r in report.rows if r.what == what)]
    return report


def _compare(settings: Settings, run: Run, before: Snapshot | None) -> Report:
    report = Report()
    truth: Truth = run.truth
    prefix = f"lg-{run.run_id}-"
    c = ch_client(settings)
    try:
        logs = c.query(
            "SELECT toUInt32(event_date), event_name, count(), uniqExact(user_id, event_id) FROM event_logs FINAL "
            "WHERE startsWith(user_id, {p:String}) GROUP BY event_date, event_name",
            parameters={"p": prefix},
        ).result_rows
        assigned = c.query(
            "SELECT experiment_id, variant_id, count() FROM assignments WHERE startsWith(user_id, {p:String}) "
            "AND experiment_id IN {ids:Array(UInt32)} GROUP BY experiment_id, variant_id",
            parameters={"p": prefix, "ids": [e.id for e in run.experiments]},
        ).result_rows
        tracked = c.query(
            "SELECT experiment_id, sum(metric_value) FROM event_logs FINAL WHERE startsWith(user_id, {p:String}) "
            "AND kind = 'metric' GROUP BY experiment_id",
            parameters={"p": prefix},
        ).result_rows
    finally:
        c.close()
    by_day_name = Counter({(int(d), n): int(k) for d, n, k, _ in logs})
    stored = sum(by_day_name.values())
    led = run.ledger
    refused = led.refused_events + sum(led.rejected.values())
    report.add("events refused or rejected = the broken clocks' events", refused, run.refused_expected)
    report.add("events acknowledged = in event_logs FINAL", stored, truth.events())
    report.add("events stored twice (same user, event_id)", sum(int(k) - int(u) for _, _, k, u in logs), 0)
    daily = truth.daily()
    report.add("event_logs per UTC day and name", f"{len(by_day_name)} (day, name) cells",
               f"{len(daily)} cells", ok=by_day_name == daily)  # fmt: skip
    for exp in run.experiments:
        got = {int(v): int(n) for e, v, n in assigned if int(e) == exp.id}
        report.add(f"{exp.spec.name}: assignments per variant", got, dict(truth.exposed(exp.id)))
        want_sum = sum(ev.value for u in truth.users.values() for ev in u.events.values() if ev.tracked_for == exp.id)
        have_sum = next((float(s) for e, s in tracked if e == exp.id), 0.0)
        report.add(f"{exp.spec.name}: tracked revenue Σ", round(have_sum, 6), round(want_sum, 6),
                   ok=math.isclose(have_sum, want_sum, rel_tol=1e-9, abs_tol=1e-6))  # fmt: skip
    if before is not None:
        after = snapshot(settings)
        delta = after["daily"]
        delta.subtract(before["daily"])
        delta_daily = Counter({k: v for k, v in delta.items() if v})
        report.add("daily_metric_rollups, change over the run", f"{sum(delta_daily.values())} events",
                   f"{sum(daily.values())} events", ok=delta_daily == daily)  # fmt: skip
        for key, steps, window, exp_ids in _funnels(settings):
            fd = after["funnels"]
            fd.subtract(before["funnels"])
            for exp_id in [0, *exp_ids]:
                got_f = {(v, s): n for (k, e, v, s), n in fd.items() if k == key and e == exp_id and n}
                want_f = dict(truth.funnel(steps, window, exp_id))
                label = "everyone" if exp_id == 0 else f"experiment {exp_id}, per variant"
                report.add(f"funnel {key} ({label}), change", _steps(got_f), _steps(want_f), ok=got_f == want_f)
    _check_results(report, run)
    return report


def _steps(counts: dict[tuple[int, int], int]) -> str:
    by_step: Counter[int] = Counter()
    for (_variant, step), n in counts.items():
        by_step[step] += n
    return " → ".join(str(by_step[s]) for s in sorted(by_step)) or "0"


def _check_results(report: Report, run: Run) -> None:
    truth = run.truth
    for exp in run.experiments:
        body = _results(run.base_url, exp)
        metrics = {m["key"]: m for m in body["metrics"]}
        exposed = truth.exposed(exp.id)
        ok_n = ok_mean = True
        detail = []
        for spec in METRICS:
            m = metrics.get(spec.key)
            if m is None:
                report.add(f"{exp.spec.name}: results metric {spec.key}", "missing", "present")
                continue
            values = truth.values(exp.id, spec)
            for v in m["variants"]:
                rows = values.get(v["variant_id"], [])
                n = exposed.get(v["variant_id"], 0)
                num, den = sum(x for x, _ in rows), sum(d for _, d in rows)
                want_mean = (num / den if den else None) if spec.type == "ratio" else (num / n if n else None)
                if v["exposed_users"] != n:
                    ok_n = False
                    detail.append(f"{spec.key}/{v['variant_key']}: n {v['exposed_users']} ≠ {n}")
                if want_mean is None or not _close(v["mean"], want_mean):
                    ok_mean = False
                    detail.append(f"{spec.key}/{v['variant_key']}: mean {v['mean']} ≠ {want_mean}")
                if not v["is_control"]:
                    report.coverage.append(_coverage(run, exp, spec.key, v))
        report.add(f"{exp.spec.name}: results exposed users per variant and metric", "equal" if ok_n else "differ",
                   "equal", ok=ok_n)  # fmt: skip
        report.add(f"{exp.spec.name}: results means (Σx / n, ratios Σnum / Σden)",
                   "equal" if ok_mean else "; ".join(detail[:3]), "equal", ok=ok_mean)  # fmt: skip


def _coverage(run: Run, exp: CreatedExperiment, metric_key: str, v: dict[str, Any]) -> Coverage:
    spec_metric = next(m for m in METRICS if m.key == metric_key)
    name = exp.variant_name(v["variant_id"]) or v["variant_key"]
    variant = next(s for s in exp.spec.variants if s.name == name)
    effect = true_effect(run.scenario, exp.spec, variant, spec_metric)
    cmp = v.get("vs_control") or {}
    ci = cmp.get("absolute_ci")
    reason = (cmp.get("reason") or {}).get("code")
    if ci is None:
        return Coverage(exp.spec.name, metric_key, name, effect, None, None, None, None, None, reason)
    covered = ci["low"] <= effect <= ci["high"]
    return Coverage(exp.spec.name, metric_key, name, effect, cmp.get("absolute_lift"), ci["low"], ci["high"],
                    covered, cmp.get("significant"), reason)  # fmt: skip


def days_label(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * MS_PER_DAY / 1000))

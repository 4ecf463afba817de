"""`abstream results EXPERIMENT`: the results API's body, read from ClickHouse, as JSON or as a terminal table.

The experiment's definition comes from the registry table (``experiments FINAL``, by id or key), the
figures from ``gateway.results.experiment_results``: the same function the HTTP route calls, so
``--json`` prints exactly what ``GET /apiv1/ab-tests/{id}/results`` answers. The table draws each
comparison's interval as a bar on a scale shared by the metric's variants, with 0 marked.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from abstream.config import Settings
from schemas.errors import ApiError
from schemas.experiments import Experiment
from schemas.registry import RegistryRecord

BAR_WIDTH = 28

EXPERIMENT_SQL = (
    "SELECT definition FROM experiments FINAL "
    "WHERE experiment_key = {ref:String} OR toString(experiment_id) = {ref:String} "
    "ORDER BY experiment_key = {ref:String} DESC LIMIT 1"
)


class ResultsError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


async def load_results(settings: Settings, ref: str, level: float, metric: str | None) -> dict[str, Any]:
    from gateway.results import RollupReader, experiment_results

    reader = RollupReader(settings)
    try:
        try:
            rows = await reader.query(EXPERIMENT_SQL, {"ref": ref})
        except Exception as exc:  # noqa: BLE001 - unreachable or no schema: one line, exit 2
            from abstream.clickhouse import describe_failure

            raise ResultsError(describe_failure(settings, exc), 2) from None
        if not rows:
            raise ResultsError(f"no experiment with id or key {ref!r} in the registry")
        experiment: Experiment = RegistryRecord.from_bytes(rows[0][0]).experiment
        try:
            return await experiment_results(reader, experiment, level, metric)
        except ApiError as exc:
            raise ResultsError(exc.message, 2 if exc.status >= 500 else 1) from None
    finally:
        await reader.close()


def run(settings: Settings, ref: str, level: float, metric: str | None, as_json: bool) -> int:
    try:
        body = asyncio.run(load_results(settings, ref, level, metric))
    except ResultsError as exc:
        print(f"abstream results: {exc}", file=sys.stderr)
        return exc.code
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    render(body, Console())
    return 0


# ---------------------------------------------------------------------------------------------- drawing


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:+.{digits}f}%"


def _num(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def interval_bar(
    low: float | None, high: float | None, point: float | None, lo: float, hi: float, width: int = BAR_WIDTH
) -> Text:
    """[low, high] drawn on the scale lo..hi (which includes 0), the estimate as ●, zero as │."""
    if low is None or high is None or point is None or hi <= lo:
        return Text("·" * width, style="dim")

    def at(x: float) -> int:
        return max(0, min(width - 1, round((x - lo) / (hi - lo) * (width - 1))))

    cells = [" "] * width
    for i in range(at(low), at(high) + 1):
        cells[i] = "━"
    cells[at(0.0)] = "│"
    cells[at(point)] = "●"
    style = "green" if low > 0 else "red" if high < 0 else "yellow"
    return Text("".join(cells), style=style)


def _lift(comparison: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """Relative lift and CI when the control's mean is not 0, else the absolute ones."""
    rel, ci = comparison.get("relative_lift"), comparison.get("relative_ci") or {}
    if rel is not None and ci.get("low") is not None:
        return rel, ci.get("low"), ci.get("high")
    ci = comparison.get("absolute_ci") or {}
    return comparison.get("absolute_lift"), ci.get("low"), ci.get("high")


def render(body: dict[str, Any], console: Console) -> None:
    srm = body["srm"]
    fresh = body["data_freshness"]
    title = f"{body['test_name']}  (id {body['test_id']}, key {body['test_key']}, phase {body['phase']})"
    if srm.get("flagged"):
        console.print(Panel(
            f"Sample ratio mismatch: exposed users {srm.get('observed')} vs expected {srm.get('expected')} "
            f"(chi-square p = {_p(srm.get('p_value'))} < {srm.get('threshold')}). Do not trust these results "
            "until the assignment or logging problem is found.",
            title="SRM", style="bold red",
        ))  # fmt: skip
    console.print(Text(title, style="bold"))
    exposure = body["exposure"]["description"]
    console.print(
        f"{body['total_exposed_users']:,} exposed users; {exposure}; level {body['level']:.0%}; "
        f"SRM p = {_p(srm.get('p_value'))}; "
        f"data up to {fresh.get('latest_event_time') or '–'} (rollups {fresh.get('age_seconds') or '–'} s old)"
    )
    for metric in body["metrics"]:
        _render_metric(metric, body, console)


def _render_metric(metric: dict[str, Any], body: dict[str, Any], console: Console) -> None:
    rows = metric["variants"]
    comparisons = [r.get("vs_control") for r in rows]
    lows, highs = [0.0], [0.0]
    for c in comparisons:
        if c:
            point, low, high = _lift(c)
            if low is not None and high is not None:
                lows.append(low)
                highs.append(high)
    lo, hi = min(lows), max(highs)
    pad = (hi - lo) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    kind = "rate" if metric["type"] == "proportion" else "ratio" if metric["type"] == "ratio" else "mean"
    # a narrow terminal (80 columns) keeps the interval readable and drops the Holm and CUPED columns
    wide = console.width >= 120
    bar = BAR_WIDTH if wide else max(12, min(BAR_WIDTH, console.width - 62))
    table = Table(title=f"{metric['name']}  [{metric['type']}]", title_justify="left", expand=False)
    columns = [("variant", "left"), ("users", "right"), (kind, "right"), ("lift", "right"),
               (f"{body['level']:.0%} interval" + ("  (│ = 0)" if wide else ""), "left"), ("p", "right"),
               ("p Holm", "right"), ("P(win)", "right"), ("CUPED lift", "right")]  # fmt: skip
    keep = [i for i, (header, _) in enumerate(columns) if wide or header not in ("p Holm", "CUPED lift")]
    for i in keep:
        header, justify = columns[i]
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]

    def add_row(*cells: object) -> None:
        table.add_row(*(cells[i] for i in keep))  # type: ignore[arg-type]

    for row, c in zip(rows, comparisons, strict=True):
        value = row.get("conversion_rate") if metric["type"] == "proportion" else row.get("mean")
        shown = _pct(value, 2).lstrip("+") if metric["type"] == "proportion" else _num(value)
        name = f"{row['variant_key']}{(' (control)' if wide else '*') if row.get('is_control') else ''}"
        if not c:
            add_row(name, f"{row['exposed_users']:,}", shown, "", "", "", "", "", "")
            continue
        if c.get("reason"):
            reason = c["reason"].get("code") if not wide else c["reason"].get("message") or c["reason"].get("code")
            add_row(name, f"{row['exposed_users']:,}", shown, "", Text(reason, style="dim"), "", "", "", "")
            continue
        point, low, high = _lift(c)
        relative = c.get("relative_lift") is not None and (c.get("relative_ci") or {}).get("low") is not None
        cuped = c.get("cuped") or {}
        bayes = c.get("bayesian") or {}
        win = bayes.get("chance_to_beat_control")
        add_row(
            name, f"{row['exposed_users']:,}", shown,
            _pct(point) if relative else _num(point),
            interval_bar(low, high, point, lo, hi, bar),
            _p(c.get("p_value")), _p(c.get("p_value_holm")),
            "–" if win is None else f"{win:.0%}",
            _pct(cuped.get("relative_lift")) if cuped.get("relative_lift") is not None else "–",
        )  # fmt: skip
    console.print(table)

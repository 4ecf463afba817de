"""The tables a loadgen run ends with: what was sent and answered, the pipeline against the truth, and each
interval against the true effect (drawn: the interval ━, the estimate ●, the true effect ◆)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from abstream.loadgen.check import Coverage, Report
from abstream.loadgen.runner import Run

BAR = 20


def sent_table(run: Run) -> Table:
    led = run.ledger
    t = Table(title=f"loadgen {run.scenario.name}: sent and answered (run {run.run_id})", title_justify="left")
    t.add_column("what")
    t.add_column("figure", justify="right")
    rate = led.events_sent / run.seconds if run.seconds > 0 else 0.0
    rows = [
        ("users simulated", f"{run.users_done:,} of {run.scenario.users:,}"),
        ("experiments created", ", ".join(f"{e.spec.name} (id {e.id})" for e in run.experiments)),
        ("requests (gzip)", f"{led.requests:,} ({led.gzip_requests:,})"),
        ("requests sent again after an answer (lost answers)", f"{led.resent_after_success:,}"),
        ("requests retried after a failure", _counts(led.retried)),
        ("events sent (each once)", f"{led.events_sent:,}"),
        ("events acknowledged", f"{len(led.acked):,}"),
        ("answered duplicate: true", f"{led.duplicates_flagged:,}"),
        ("events rejected, by code", _counts(led.rejected)),
        ("requests refused whole", _counts(led.refused)),
        ("events of broken clocks (must all be refused)", f"{run.refused_expected:,}"),
        ("events given up (never answered)", f"{led.gave_up_events:,}"),
        ("duration, events/s", f"{run.seconds:.1f} s, {rate:,.0f}/s"),
    ]
    for what, figure in rows:
        t.add_row(what, figure)
    return t


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(counter.items())) or "0"


def check_table(report: Report) -> Table:
    again = f", {report.reads} reads" if report.reads > 1 else ""
    t = Table(title=f"the pipeline against the truth (drained in {report.waited_s:.1f} s{again})",
              title_justify="left")  # fmt: skip
    for col in ("what", "pipeline", "truth", ""):
        t.add_column(col, justify="right" if col in ("pipeline", "truth") else "left")
    for row in report.rows:
        mark = Text("equal", style="green") if row.ok else Text("DIFFERENT", style="bold red")
        t.add_row(row.what, _fmt(row.pipeline), _fmt(row.truth), mark)
    return t


def _fmt(value: object) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v:,}" for k, v in sorted(value.items())) or "{}"
    return str(value)


def coverage_table(report: Report) -> Table:
    t = Table(title="each interval (95%) against the true effect", title_justify="left")
    for col in ("experiment", "metric", "variant", "true", "estimate", "95% interval", "", "covered", "sig."):
        t.add_column(col, justify="right" if col in ("true", "estimate") else "left", no_wrap=col != "experiment")
    for c in report.coverage:
        if c.covered is None:
            t.add_row(c.experiment, c.metric, c.variant, f"{c.true_effect:+.3g}", "–", f"(null: {c.reason})", "",
                      Text("n/a", style="dim"), "")  # fmt: skip
            continue
        assert c.low is not None and c.high is not None  # noqa: S101 - covered is set only with an interval
        mark = Text("yes", style="green") if c.covered else Text("NO", style="bold red")
        t.add_row(c.experiment, c.metric, c.variant, f"{c.true_effect:+.3g}", f"{c.estimate:+.3g}",
                  f"[{c.low:+.3g}, {c.high:+.3g}]", _bar(c), mark, "yes" if c.significant else "no")  # fmt: skip
    return t


def _bar(c: Coverage) -> Text:
    assert c.low is not None and c.high is not None  # noqa: S101
    lo = min(c.low, c.true_effect, 0.0)
    hi = max(c.high, c.true_effect, 0.0)
    pad = (hi - lo) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad

    def at(x: float) -> int:
        return max(0, min(BAR - 1, round((x - lo) / (hi - lo) * (BAR - 1))))

    cells = [" "] * BAR
    for i in range(at(c.low), at(c.high) + 1):
        cells[i] = "━"
    cells[at(0.0)] = "│"
    if c.estimate is not None:
        cells[at(c.estimate)] = "●"
    cells[at(c.true_effect)] = "◆"
    return Text("".join(cells), style="green" if c.covered else "red")


def summary_line(report: Report) -> str:
    intervals = [c for c in report.coverage if c.covered is not None]
    covered = sum(1 for c in intervals if c.covered)
    counts = "every count equal" if report.counts_equal else "COUNTS DIFFER"
    if report.caught_up:
        counts += f" (after {report.reads} reads; caught up meanwhile: {'; '.join(report.caught_up)})"
    return f"{counts}; {covered} of {len(intervals)} intervals cover the true effect"


def print_all(console: Console, run: Run, report: Report | None) -> None:
    console.print(sent_table(run))
    if report is not None:
        console.print(check_table(report))
        console.print(coverage_table(report))
        console.print(summary_line(report))

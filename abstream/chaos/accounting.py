"""Per fault: events acknowledged in its window, found in ``event_logs FINAL``, missing, counted twice; and, for
the broker outage, what the gateway answered while the broker was away."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from abstream.chaos.faults import Fault
from abstream.clickhouse import client as ch_client
from abstream.config import Settings
from abstream.loadgen.client import Ledger

ACK_GRACE_S = 0.5
"""Answers already on the wire when a broker outage begins (acknowledged by Kafka just before it) are not
charged to the outage."""


PUBLISH_DEADLINE_S = 6.0
"""ABSTREAM_PRODUCE_TIMEOUT_S (5 s) and a margin."""


@dataclass
class Window:
    label: str
    started: float
    acknowledged: int = 0
    stored: int = 0
    missing: int = 0
    twice: int = 0
    recovered_in_s: float | None = None  # the component healthy again, from the fault's start
    acked_again_in_s: float | None = None  # the load acknowledged again, from the fault's start
    acked_while_away: int | None = None  # broker outage: acknowledgements while the broker was unreachable
    failed_while_away: int | None = None  # ... and requests answered 503 or refused meanwhile
    note: str = ""


def stored_counts(settings: Settings, prefix: str) -> dict[tuple[str, str], int]:
    """(user, event_id) -> rows in event_logs FINAL for the run's users."""
    c = ch_client(settings)
    try:
        rows = c.query("SELECT user_id, event_id, count() FROM event_logs FINAL WHERE startsWith(user_id, {p:String}) "
                       "GROUP BY user_id, event_id", parameters={"p": prefix}).result_rows  # fmt: skip
    finally:
        c.close()
    return {(u, e): int(n) for u, e, n in rows}


def windows(faults: list[Fault], ledger: Ledger, stored: dict[tuple[str, str], int], run_start: float) -> list[Window]:
    done = [f for f in faults if f.started]
    out = [Window("no fault (warm-up)", run_start)] + [Window(f.label, f.started) for f in done]
    starts = [w.started for w in out]
    for key, acked_at in ledger.acked.items():
        w = out[max(0, bisect_right(starts, acked_at) - 1)]
        w.acknowledged += 1
        n = stored.get(key, 0)
        w.stored += n > 0
        w.missing += n == 0
        w.twice += n > 1
    for w, f in zip(out[1:], done, strict=True):
        w.recovered_in_s = f.recovered - f.started
        w.acked_again_in_s = f.acked_again - f.started if f.acked_again else None
        if f.kind == "broker_cut":
            away_from, away_to = f.started + ACK_GRACE_S, f.restored
            w.acked_while_away = sum(1 for t in ledger.acked.values() if away_from <= t <= away_to)
            # a request sent while away is answered 503 once the gateway's publish deadline passes: maybe after
            w.failed_while_away = sum(1 for t, _ in ledger.failures if f.started <= t <= away_to + PUBLISH_DEADLINE_S)
            first_after = min((t for t in ledger.acked.values() if t > f.restored), default=None)
            if first_after is not None:
                w.note = f"first ack {first_after - f.restored:.1f} s after the broker came back"
    return out

"""`abstream chaos --short` end to end: loadgen under SIGKILLed workers and gateway, a stopped ClickHouse and a
cut broker; every acknowledged event must be in event_logs FINAL exactly once, and verify clean."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import orjson

from tests.stack import UNDER_LOAD


@UNDER_LOAD
def test_short_chaos_run_loses_and_doubles_nothing() -> None:
    """Fault moments and traffic are seeded and the seed printed: ABSTREAM_TEST_SEED=<seed> replays them."""
    seed = os.environ.get("ABSTREAM_TEST_SEED") or str(random.SystemRandom().randrange(2**31))
    print(f"chaos: ABSTREAM_TEST_SEED={seed}")
    argv = [sys.executable, "-m", "abstream.cli", "chaos", "--short", "--scenario", "ci", "--rate", "300",
            "--seed", seed, "--json"]  # fmt: skip
    try:  # within pytest's own timeout (300 s), so that a run that hangs shows where: its progress on stderr
        proc = subprocess.run(argv, capture_output=True, timeout=270, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"no end after 270 s; its stderr:\n{(exc.stderr or b'').decode()[-6000:]}") from None
    out = proc.stdout.decode()
    assert proc.stdout.startswith(b"{"), proc.stderr.decode()[-4000:]
    figures = orjson.loads(out)
    headline = {k: v for k, v in figures.items() if k != "windows"}
    assert proc.returncode == 0, f"{headline}\n{figures['windows']}"
    assert figures["acknowledged"] > 1000 and figures["stored"] == figures["acknowledged"]
    assert figures["missing"] == 0 and figures["twice"] == 0 and figures["verify_differences"] == 0
    assert figures["counts_equal"] and not figures["died_on_their_own"]
    labels = [w["label"] for w in figures["windows"]]
    assert sum("SIGKILL a stream worker" in label for label in labels) == 2
    assert any("SIGKILL the gateway" in label for label in labels)
    assert any("ClickHouse" in label for label in labels)
    (broker,) = [w for w in figures["windows"] if w["label"] == "broker unreachable"]
    assert broker["acked_while_away"] == 0, "the gateway acknowledges nothing while the broker is away"
    assert broker["failed_while_away"] > 0, "clients were answered 503 (or refused) meanwhile"
    assert "first ack" in broker["note"], "and it recovered by itself"
    # the faults happened under load: events were acknowledged in every window
    assert all(w["acknowledged"] > 0 for w in figures["windows"]), figures["windows"]
    assert all(w["acked_again_in_s"] > 0 for w in figures["windows"][1:]), figures["windows"]

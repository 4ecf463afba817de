"""The fault schedule of a chaos run (seeded) and its executor.

Faults run one after another, each after a random pause, so every acknowledged event can be charged to the
fault whose window it was acknowledged in. A fault's window runs from its start to the next fault's start, and
the pause before the next fault begins only once the gateway acknowledged an event again after the component
came back: every window holds load after its fault, however long the clients' retry backoff made them wait.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from abstream.chaos.stack import ChaosStack

ACK_WAIT_S = 120.0
"""How long the next fault waits, at most, for the load to be acknowledged again (clients back off up to 5 s)."""

Kind = Literal["worker_kill", "clickhouse_stop", "broker_cut", "gateway_kill"]

LABELS: dict[Kind, str] = {
    "worker_kill": "SIGKILL a stream worker",
    "clickhouse_stop": "stop the ClickHouse endpoint",
    "broker_cut": "broker unreachable",
    "gateway_kill": "SIGKILL the gateway",
}


@dataclass
class Fault:
    kind: Kind
    pause_s: float  # wait before it, from the load's first acknowledgement after the previous fault
    hold_s: float  # how long the component stays away (kills: before the restart begins)
    target: str = ""
    started: float = 0.0  # epoch seconds
    restored: float = 0.0  # the component was given back (restart begun, proxy listening again)
    recovered: float = 0.0  # ... and healthy again
    acked_again: float = 0.0  # the first acknowledgement after it was given back (0: none within the wait)

    @property
    def label(self) -> str:
        return f"{LABELS[self.kind]}{f' ({self.target})' if self.target else ''}"


@dataclass(frozen=True)
class Plan:
    worker_kills: int = 10
    clickhouse_outage_s: float = 60.0
    broker_outage_s: float = 30.0
    gateway_kills: int = 1
    pause_s: float = 10.0  # mean pause between faults
    warmup_s: float = 10.0


def schedule(plan: Plan, rng: random.Random, workers: list[str]) -> list[Fault]:
    faults = [Fault("worker_kill", 0, rng.uniform(0.2, 3.0), rng.choice(workers)) for _ in range(plan.worker_kills)]
    if plan.clickhouse_outage_s > 0:
        faults.append(Fault("clickhouse_stop", 0, plan.clickhouse_outage_s))
    if plan.broker_outage_s > 0:
        faults.append(Fault("broker_cut", 0, plan.broker_outage_s))
    faults += [Fault("gateway_kill", 0, rng.uniform(0.2, 2.0)) for _ in range(plan.gateway_kills)]
    rng.shuffle(faults)
    for i, f in enumerate(faults):
        f.pause_s = plan.warmup_s if i == 0 else rng.uniform(plan.pause_s * 0.5, plan.pause_s * 1.5)
    return faults


class Executor(threading.Thread):
    """Runs the schedule against the stack in a thread of its own (the load runs on the main thread's loop).

    The thread outlives the schedule (``done`` is set, then it waits for ``release``): the processes it
    restarted die with the thread that started them (PR_SET_PDEATHSIG follows the thread, not the process),
    so it may end only once the stack is stopped.
    """

    def __init__(self, stack: ChaosStack, faults: list[Fault], on_fault: Callable[[Fault, str], None]) -> None:
        super().__init__(name="chaos-faults", daemon=True)
        self.stack = stack
        self.faults = faults
        self.on_fault = on_fault
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.last_ack = 0.0  # epoch seconds of the load's latest acknowledgement (set from the load's thread)

    def note_ack(self, _user_id: str, _event_id: str, at: float) -> None:
        """The load's ``on_ack`` hook."""
        self.last_ack = max(self.last_ack, at)

    def _sleep(self, seconds: float) -> None:
        self.cancelled.wait(seconds)

    def run(self) -> None:
        try:
            self._run_schedule()
        finally:
            self.done.set()
            self.release.wait()

    def _run_schedule(self) -> None:
        try:
            for fault in self.faults:
                self._sleep(fault.pause_s)
                if self.cancelled.is_set():
                    return
                self.on_fault(fault, "start")
                fault.started = time.time()
                self._inflict(fault)
                fault.recovered = time.time()
                fault.acked_again = self._first_ack_after(fault.restored or fault.started)
                self.on_fault(fault, "end")
        except BaseException as exc:  # noqa: BLE001 - reported by the command, which stops the run
            self.error = exc

    def _first_ack_after(self, moment: float, wait_s: float = ACK_WAIT_S) -> float:
        """Wait until the load is acknowledged again after ``moment``; its time, or 0 if not within ``wait_s``."""
        give_up = time.monotonic() + wait_s
        while self.last_ack <= moment and time.monotonic() < give_up and not self.cancelled.is_set():
            self._sleep(0.05)
        return self.last_ack if self.last_ack > moment else 0.0

    def _inflict(self, fault: Fault) -> None:
        s = self.stack
        if fault.kind == "worker_kill":
            s.sigkill(fault.target)
            self._sleep(fault.hold_s)
            fault.restored = time.time()
            s.start_worker(fault.target)
        elif fault.kind == "gateway_kill":
            s.sigkill("gateway")
            self._sleep(fault.hold_s)
            fault.restored = time.time()
            s.start_gateway()
        elif fault.kind == "clickhouse_stop":
            s.stop("clickhouse")
            self._sleep(fault.hold_s)
            fault.restored = time.time()
            s.start_clickhouse()
        else:
            s.signal_proxy(cut=True)
            self._sleep(fault.hold_s)
            fault.restored = time.time()
            s.signal_proxy(cut=False)

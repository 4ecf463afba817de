"""Each experiment's analysis rules (exposure event, CUPED lookback, ratio metrics) as the workers apply them.

The registry is the authority: the `experiments` table (copied from the compacted topic) holds every
applied version, tests.json's included. Until that table answers, the manifest's experiments stand in.
The pipeline re-reads it every few seconds and re-contributes the users of any experiment whose rules
changed; ``abstream verify`` reads it once. Both therefore sum the same contribution.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from schemas.analysis import ExperimentRules
from schemas.experiments import Experiment
from schemas.registry import RegistryRecord

log = logging.getLogger(__name__)

RULES_SQL = "SELECT experiment_id, definition FROM experiments FINAL"
RULES_REFRESH_S = 5.0


def rules_from_registry(
    rows: Iterable[tuple[int, str]], manifest: Iterable[Experiment] = ()
) -> dict[int, ExperimentRules]:
    """Rules per experiment id: the registry's current versions over the manifest's."""
    rules = {e.id: e.rules for e in manifest}
    for experiment_id, definition in rows:
        try:
            rules[int(experiment_id)] = RegistryRecord.from_bytes(definition).experiment.rules
        except ValueError as exc:  # a version this code cannot read: keep what we had, say so
            log.error("experiment %s: unreadable registry definition, its rules are unchanged: %s", experiment_id, exc)
    return rules

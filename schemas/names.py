"""Patterns of the names experiments, variants, funnels and metrics use (shared by every schema module)."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
"""Experiment, variant, funnel and metric keys: no ':' so the hash input ``seed:key:user`` stays unambiguous."""

SEED_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
EVENT_NAME_PATTERN = r"^[A-Za-z$][A-Za-z0-9_.:$-]{0,127}$"
"""Funnel steps and metric events: the same rule as ``schemas.events.NAME_PATTERN`` (a test keeps them equal)."""

Key = Annotated[str, StringConstraints(pattern=KEY_PATTERN)]
EventName = Annotated[str, StringConstraints(pattern=EVENT_NAME_PATTERN)]

__all__ = ["EVENT_NAME_PATTERN", "KEY_PATTERN", "SEED_PATTERN", "EventName", "Key"]

"""Wires the worker's agents onto one Faust app (filled by the stream-workers issue)."""

from __future__ import annotations

import faust

from abstream.config import Settings
from stream_workers.app import create_app


def build(settings: Settings) -> faust.App:
    return create_app(settings)

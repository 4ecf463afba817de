"""What a fuzz run talks to: the gateway's URL, the tokens of its protected endpoints, and, when known, the
settings that reach its ClickHouse (for the end-to-end proof that a hostile request left nothing behind)."""

from __future__ import annotations

from dataclasses import dataclass

from abstream.config import Settings


@dataclass(frozen=True)
class Target:
    url: str
    """Base URL of the gateway, no trailing slash."""
    admin_token: str = ""
    metrics_token: str = ""
    settings: Settings | None = None
    """The stack's settings when ClickHouse can be read (a private stack); None with --url."""

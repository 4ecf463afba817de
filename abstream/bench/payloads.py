"""Request bodies of the benchmarks, and the pool files that carry them to the load processes.

Bodies are generated before any clock starts (realistic Calicritters ``POST /v1/events`` sessions and
``POST /v1/assignment`` launches) and written to a *pool file* (``<length>\\n`` then the body, repeated) that
the load process only replays: no JSON work while it measures.
"""

from __future__ import annotations

import gzip
import random
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

_PLATFORMS = ("ios", "android")
_APP_VERSIONS = ("1.4.2", "1.4.1", "1.5.0", "1.3.9")
_LOCALES = ("en-US", "en-GB", "de-DE", "fr-FR", "pt-BR", "ja-JP")
_ZONES = ("Europe/Berlin", "America/New_York", "America/Sao_Paulo", "Asia/Tokyo", "Europe/London")
_SCREENS = ("home", "workout_list", "workout_player", "creature_detail", "shop", "achievements", "settings")
_CREATURES = ("sprout", "ember", "pebble", "drizzle", "zephyr")
_EVENT_WEIGHTS = (
    ("screen_viewed", 30),
    ("button_tapped", 20),
    ("workout_started", 10),
    ("workout_completed", 8),
    ("creature_fed", 8),
    ("app_opened", 6),
    ("achievement_unlocked", 4),
    ("session_submitted", 6),
    ("notification_opened", 4),
    ("purchase_completed", 2),
    ("$pageview", 2),
)
_EVENT_NAMES = tuple(n for n, _ in _EVENT_WEIGHTS)
_EVENT_W = tuple(w for _, w in _EVENT_WEIGHTS)


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _properties(rng: random.Random, name: str, seq: int) -> dict[str, Any]:
    screen = rng.choice(_SCREENS)
    if name in ("workout_started", "workout_completed"):
        props: dict[str, Any] = {
            "screen": "workout_player",
            "workout_id": f"w_{rng.randint(1, 4000):05d}",
            "difficulty": rng.choice(("easy", "medium", "hard")),
            "duration_ms": rng.randint(60_000, 2_400_000),
            "calories": rng.randint(20, 600),
        }
        if name == "workout_completed":
            props["score"] = round(rng.random() * 100, 2)
    elif name == "creature_fed":
        props = {
            "screen": "creature_detail",
            "creature": rng.choice(_CREATURES),
            "food": "berry",
            "level": rng.randint(1, 40),
        }
    elif name == "purchase_completed":
        props = {"screen": "shop", "sku": f"gems_{rng.choice((100, 500, 1200))}", "price": 4.99, "currency": "USD"}
    elif name == "button_tapped":
        props = {
            "screen": screen,
            "button": rng.choice(("start", "next", "close", "share", "feed")),
            "position": seq % 7,
        }
    else:
        props = {"screen": screen, "referrer": rng.choice(_SCREENS), "load_ms": rng.randint(40, 1800)}
    props["seq"] = seq
    return props


def make_v1_payload(rng: random.Random, now_ms: int, user: str, n_events: int) -> dict[str, Any]:
    """One Calicritters ``POST /v1/events`` body: one user's session, ``n_events`` of ~300 bytes each."""
    platform = rng.choice(_PLATFORMS)
    start = now_ms - rng.randint(5_000, 240_000)
    events = []
    for seq in range(n_events):
        name = rng.choices(_EVENT_NAMES, weights=_EVENT_W)[0]
        events.append(
            {
                "event_name": name,
                "occurred_at": iso_ms(start + seq * rng.randint(200, 4000)),
                "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "properties": _properties(rng, name, seq),
                "context": {
                    "locale": rng.choice(_LOCALES),
                    "timezone": rng.choice(_ZONES),
                    "network": rng.choice(("wifi", "cellular")),
                    "os_version": "17.4" if platform == "ios" else "14",
                },
            }
        )
    return {
        "anonymous_user_id": user,
        "session_id": f"s_{rng.getrandbits(48):012x}",
        "platform": platform,
        "app_version": rng.choice(_APP_VERSIONS),
        "install_id": f"i_{rng.getrandbits(48):012x}",
        "sent_at": iso_ms(now_ms - rng.randint(0, 2000)),
        "events": events,
    }


def make_v1_payloads(n_requests: int, n_events: int, seed: int = 42) -> list[dict[str, Any]]:
    """``n_requests`` bodies from a population of ``n_requests // 3`` users (users come back, as they do)."""
    rng = random.Random(seed)
    now_ms = time.time_ns() // 1_000_000
    users = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(max(1, n_requests // 3))]
    return [make_v1_payload(rng, now_ms, rng.choice(users), n_events) for _ in range(n_requests)]


def v1_body(payload: dict[str, Any], tag: str) -> bytes:
    """The body with the user id suffixed by ``tag``: another ``tag`` gives other dedup keys (user, event_id),
    so each run posts events the gateway's dedup cache has not seen (it would skip publishing them)."""
    return orjson.dumps({**payload, "anonymous_user_id": f"{payload['anonymous_user_id']}.{tag}"})


def make_assignment_bodies(n: int, seed: int = 7) -> list[bytes]:
    """Distinct users asking ``POST /v1/assignment`` the way the Calicritters app does at launch."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        platform = rng.choice(_PLATFORMS)
        out.append(
            orjson.dumps(
                {
                    "anonymous_user_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "platform": platform,
                    "app_version": rng.choice(_APP_VERSIONS),
                    "session_id": f"s_{rng.getrandbits(48):012x}",
                    "install_id": f"i_{rng.getrandbits(48):012x}",
                }
            )
        )
    return out


def write_pool(path: Path, bodies: Sequence[bytes]) -> Path:
    with open(path, "wb") as f:
        for body in bodies:
            f.write(b"%d\n" % len(body))
            f.write(body)
    return path


def read_pool(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        n = int(data[pos:nl])
        out.append(data[nl + 1 : nl + 1 + n])
        pos = nl + 1 + n
    return out


def gzip_all(bodies: Sequence[bytes], level: int = 6) -> list[bytes]:
    return [gzip.compress(b, level, mtime=0) for b in bodies]

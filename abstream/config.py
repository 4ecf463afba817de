"""Every setting of abstream, its environment variable and its default, in one place.

The same code runs against the embedded stack (tansu + chDB endpoint) and against a
production Kafka and ClickHouse server: only these variables change. ``abstream config``
prints the effective values; the README's configuration table is generated from ``SETTINGS``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent


KAFKA_COMPRESSIONS = ("zstd", "snappy", "lz4", "gzip", "none")


def shipped(name: str) -> Path | None:
    """A file installed with abstream (the wheel puts tests.json and clickhouse/ under <prefix>/share/abstream), or
    the one of this source checkout; None when neither exists."""
    for base in (Path(sys.prefix) / "share" / "abstream", REPO_ROOT):
        if (base / name).exists():
            return base / name
    return None


def _located(configured: str, default: str) -> Path:
    """``configured`` (relative to the working directory); the shipped copy only for an absent default."""
    path = Path(configured)
    if not path.exists() and configured == default:
        return shipped(default) or path
    return path


def _setting(env: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


class SettingsError(ValueError):
    """A setting's value cannot be used; the message names its environment variable (and shows no secret)."""


def redacted_url(raw: str, default_port: int | None = None) -> str:
    """``raw`` without the password of its user info, its query and its fragment, for messages: the user name
    stays as written (still percent-encoded), so does the host (``[::1]``). ``default_port`` is added when the
    URL names none, to show the port actually used."""
    url = urlsplit(raw)
    userinfo, at, hostport = url.netloc.rpartition("@")
    if default_port is not None and (hostport.endswith("]") or ":" not in hostport):
        hostport = f"{hostport}:{default_port}"
    netloc = f"{userinfo.split(':', 1)[0]}@{hostport}" if at else hostport
    return urlunsplit((url.scheme, netloc, url.path, "", ""))


def _is_http_url(raw: str) -> bool:
    """http(s)://[user[:password]@]host[:port] with a port (if any) in 0..65535."""
    url = urlsplit(raw)
    try:
        url.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)


@dataclass(frozen=True)
class Settings:
    """Effective configuration. Build with ``Settings.from_env()``; never read os.environ elsewhere."""

    kafka_bootstrap_servers: str = _setting(
        "KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092", "Kafka bootstrap servers (host:port[,host:port])."
    )
    kafka_enable_idempotence: bool = _setting(
        "KAFKA_ENABLE_IDEMPOTENCE",
        False,
        "Idempotent producer. On for Apache Kafka (docker-compose); must stay off on tansu.",
    )
    kafka_topic_prefix: str = _setting(
        "ABSTREAM_TOPIC_PREFIX", "", "Prefix for every topic name (isolates tests and tenants)."
    )
    kafka_partitions: int = _setting("ABSTREAM_KAFKA_PARTITIONS", 4, "Partitions of topics abstream creates.")
    kafka_replication_factor: int = _setting(
        "ABSTREAM_KAFKA_REPLICATION", 1, "Replication factor of topics abstream creates."
    )
    kafka_compression: str = _setting(
        "ABSTREAM_KAFKA_COMPRESSION",
        "zstd",
        "Compression of produced batches: zstd (level 1), snappy, lz4, gzip or none.",
    )
    kafka_linger_ms: int = _setting(
        "ABSTREAM_KAFKA_LINGER_MS", 0, "How long the producer waits to fill a batch (0: send when the broker is free)."
    )
    kafka_produce_timeout_s: float = _setting(
        "ABSTREAM_PRODUCE_TIMEOUT_S",
        5.0,
        "How long the gateway waits for Kafka to acknowledge before answering 503.",
    )
    clickhouse_url: str = _setting(
        "CLICKHOUSE_URL",
        "http://default:@127.0.0.1:8123",
        "ClickHouse HTTP endpoint (user:password@host:port). Production: a ClickHouse server.",
    )
    clickhouse_database: str = _setting("CLICKHOUSE_DATABASE", "abstream", "Database holding abstream tables.")
    gateway_host: str = _setting("ABSTREAM_GATEWAY_HOST", "127.0.0.1", "Interface the gateway binds.")
    gateway_workers: int = _setting(
        "ABSTREAM_GATEWAY_WORKERS", 1, "Gateway server processes, one SO_REUSEPORT socket each (one per core in prod)."
    )
    gateway_port: int = _setting("ABSTREAM_GATEWAY_PORT", 20000, "Gateway HTTP port (the ArkForge seed's).")
    broker_port: int = _setting("ABSTREAM_BROKER_PORT", 9092, "Port of the embedded tansu broker.")
    clickhouse_port: int = _setting("ABSTREAM_CLICKHOUSE_PORT", 8123, "Port of the embedded ClickHouse endpoint.")
    worker_web_port: int = _setting(
        "ABSTREAM_WORKER_WEB_PORT", 6066, "Faust worker web port (health); each extra worker takes the next."
    )
    data_dir: str = _setting(
        "ABSTREAM_DATA_DIR",
        ".abstream-data",
        "Data directory of the embedded stack (relative: to the working directory).",
    )
    manifest_path: str = _setting(
        "ABSTREAM_MANIFEST",
        "tests.json",
        "Experiment manifest loaded into the registry (relative: to the working directory; when the default is "
        "absent there, the example installed with abstream).",
    )
    migrations_dir: str = _setting(
        "ABSTREAM_MIGRATIONS_DIR",
        "clickhouse",
        "Ordered SQL migrations (relative: to the working directory; when the default is absent there, the "
        "migrations installed with abstream).",
    )
    admin_token: str = _setting(
        "ABSTREAM_ADMIN_TOKEN",
        "",
        "Bearer token for creating and changing experiments. Empty: no check.",
    )
    metrics_token: str = _setting(
        "ABSTREAM_METRICS_TOKEN",
        "",
        "Bearer token of /v1/metrics/daily, /experiments and /funnels (not the admin token). Empty: those answer "
        "403 metrics_token_not_configured.",
    )
    # --- ingestion limits (validation is declared in schemas/, the numbers live here) ---
    max_body_bytes: int = _setting(
        "ABSTREAM_MAX_BODY_BYTES", 1_048_576, "Largest request body as sent (compressed or not): else 413."
    )
    max_decompressed_bytes: int = _setting(
        "ABSTREAM_MAX_DECOMPRESSED_BYTES", 8_388_608, "Largest request body after gzip decompression: else 413."
    )
    max_compression_ratio: int = _setting(
        "ABSTREAM_MAX_COMPRESSION_RATIO", 100, "Decompressed/compressed size cap against gzip bombs: else 413."
    )
    max_events_per_batch: int = _setting("ABSTREAM_MAX_EVENTS_PER_BATCH", 1000, "Most events in one request: else 413.")
    max_future_skew_s: int = _setting(
        "ABSTREAM_MAX_FUTURE_SKEW_S",
        300,
        "How far occurred_at (and sent_at) may lie in the future (seed rule: 5 minutes).",
    )
    max_event_age_s: int = _setting(
        "ABSTREAM_MAX_EVENT_AGE_S", 30 * 86400, "How far occurred_at (and sent_at) may lie in the past (horizon)."
    )
    max_properties_bytes: int = _setting(
        "ABSTREAM_MAX_PROPERTIES_BYTES", 16_384, "Largest serialised properties/context object of one event."
    )
    max_json_depth: int = _setting("ABSTREAM_MAX_JSON_DEPTH", 8, "Deepest nesting of properties/context.")
    max_id_length: int = _setting("ABSTREAM_MAX_ID_LENGTH", 128, "Longest user/session/install/event id accepted.")
    dedup_cache_size: int = _setting(
        "ABSTREAM_DEDUP_CACHE_SIZE", 200_000, "event_ids each gateway process remembers to flag retries."
    )
    # --- stream workers ---
    worker_flush_rows: int = _setting(
        "ABSTREAM_WORKER_FLUSH_ROWS", 20_000, "Buffered event rows that make a worker write to ClickHouse at once."
    )
    worker_flush_interval_s: float = _setting(
        "ABSTREAM_WORKER_FLUSH_INTERVAL_S", 0.25, "Longest a worker holds rows before writing (freshness)."
    )
    dedup_window_s: int = _setting(
        "ABSTREAM_DEDUP_WINDOW_S", 86_400, "How long workers remember written event_ids to drop client retries."
    )
    enrich_lookback_s: int = _setting(
        "ABSTREAM_ENRICH_LOOKBACK_S", 300, "How long a late assignment can still re-enrich events already written."
    )
    log_level: str = _setting("ABSTREAM_LOG_LEVEL", "INFO", "Log level of every abstream process.")

    def __post_init__(self) -> None:
        if self.kafka_compression not in KAFKA_COMPRESSIONS:
            raise SettingsError(
                f"ABSTREAM_KAFKA_COMPRESSION: {self.kafka_compression!r} is not one of {', '.join(KAFKA_COMPRESSIONS)}"
            )
        if not _is_http_url(self.clickhouse_url):
            raise SettingsError(
                "CLICKHOUSE_URL: expected http(s)://[user[:password]@]host[:port], got "
                f"{redacted_url(self.clickhouse_url)!r}"
            )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from the environment; ``overrides`` (e.g. CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None:
                continue
            try:
                if f.type in ("bool", bool):
                    values[f.name] = _parse_bool(raw)
                elif f.type in ("int", int):
                    values[f.name] = int(raw)
                elif f.type in ("float", float):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise SettingsError(f"{f.metadata['env']}: {exc}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def manifest_file(self) -> Path:
        """The manifest to load: ABSTREAM_MANIFEST, or the shipped example when the default is absent here."""
        return _located(self.manifest_path, "tests.json")

    @property
    def migrations_path(self) -> Path:
        """The migrations to apply: ABSTREAM_MIGRATIONS_DIR, or the shipped ones when the default is absent here."""
        return _located(self.migrations_dir, "clickhouse")

    def topic(self, name: str) -> str:
        """Full topic name for one of abstream's logical topics."""
        return f"{self.kafka_topic_prefix}{name}"

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, for child processes."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.metadata["env"]] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return out


# Logical topic names; use Settings.topic() to get the physical name.
TOPIC_EVENTS = "events"
TOPIC_ASSIGNMENTS = "assignments"
TOPIC_EXPERIMENTS = "experiments"
TOPIC_REJECTED = "events.rejected"


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) rows for docs and ``abstream config``."""
    return [(f.metadata["env"], str(f.default), f.metadata["doc"]) for f in fields(Settings)]


README_TABLE_BEGIN = "<!-- configuration table: generated by `python -m abstream.config --readme`; do not edit -->"
README_TABLE_END = "<!-- end of the generated configuration table -->"


def _shown_default(default: str) -> str:
    """A default as the README shows it: paths relative to the repository, empty as "empty"."""
    if default.startswith(str(REPO_ROOT)):
        default = "./" + default[len(str(REPO_ROOT)) + 1 :]
    return f"`{default}`" if default else "empty"


def readme_table() -> str:
    """The README's configuration table, from ``Settings`` (so the two cannot drift apart)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for env, default, doc in settings_table():
        lines.append(f"| `{env}` | {_shown_default(default)} | {doc.replace('|', '/')} |")
    return "\n".join([README_TABLE_BEGIN, *lines, README_TABLE_END])


def write_readme_table(path: Path = REPO_ROOT / "README.md") -> bool:
    """Replace the generated table in the README; True when it changed."""
    text = path.read_text(encoding="utf-8")
    start, end = text.index(README_TABLE_BEGIN), text.index(README_TABLE_END) + len(README_TABLE_END)
    new = text[:start] + readme_table() + text[end:]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--readme"]:
        sys.exit("usage: python -m abstream.config --readme   (rewrites the README's configuration table)")
    print("README.md: configuration table " + ("rewritten" if write_readme_table() else "already current"))

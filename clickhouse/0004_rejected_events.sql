-- Events the gateway rejected, with the reason and the (truncated) raw payload, from `events.rejected`.
-- Feeds the ingestion dashboard: what clients get wrong, by code and surface.
CREATE TABLE IF NOT EXISTS rejected_events
(
    received_at     DateTime64(3, 'UTC'),
    surface         LowCardinality(String),
    code            LowCardinality(String),
    field           String,
    message         String,
    event_index     UInt32,
    user_id         String,
    raw             String,
    kafka_partition UInt16,
    kafka_offset    UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (code, received_at);

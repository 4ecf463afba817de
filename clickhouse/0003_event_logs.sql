-- The raw event log: one row per accepted event, enriched with the user's assignment context.
--
-- Design for the queries analysts and dashboards run:
-- * PARTITION BY month of event_time: time-range queries prune whole months, retention drops partitions.
-- * ORDER BY (event_name, event_date, user_id, event_time, event_id): nearly every query filters on an event name
--   and a date range, then groups or counts distinct users; this order serves those from the primary
--   index and keeps a user's events adjacent for funnels.
-- * event_time is the skew-corrected time when the client sent `sent_at`, else occurred_at; the raw
--   values stay beside it. Days are UTC.
-- * Exactly once: the workers resume each partition after their checkpoint (stream_checkpoints) and
--   drop event_ids they have already written, so each event is written once. A row is written again only to
--   re-enrich it (its user's assignment reached the worker after the event did) or when a worker died
--   mid-flush; both carry the same sorting key, which ends in event_id, and ReplacingMergeTree keeps
--   the highest enriched_version. Exact counts therefore read the table with FINAL:
--       SELECT count() FROM event_logs FINAL WHERE event_name = 'session_submitted'
--   (without FINAL a count can be briefly high until background merges collapse the copies).
CREATE TABLE IF NOT EXISTS event_logs
(
    event_id           String,
    event_name         LowCardinality(String),
    kind               LowCardinality(String),
    user_id            String,
    session_id         String,
    install_id         String,
    platform           LowCardinality(String),
    app_version        LowCardinality(String),
    surface            LowCardinality(String),
    event_time         DateTime64(3, 'UTC'),
    event_date         Date MATERIALIZED toDate(event_time),
    occurred_at        DateTime64(3, 'UTC'),
    occurred_at_raw    String,
    received_at        DateTime64(3, 'UTC'),
    sent_at            Nullable(DateTime64(3, 'UTC')),
    corrected_at       Nullable(DateTime64(3, 'UTC')),
    skew_ms            Nullable(Int64),
    properties         String,
    context            String,
    experiment_id      Nullable(UInt32),
    metric_name        String,
    metric_value       Nullable(Float64),
    assignment_version String,
    assignments        String,
    experiment_map     Map(String, String),
    kafka_partition    UInt16,
    kafka_offset       UInt64,
    enriched_version   UInt32,
    inserted_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(enriched_version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (event_name, event_date, user_id, event_time, event_id);

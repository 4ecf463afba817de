-- Each user's first assignment per experiment and phase (exposure), written by the stream workers.
-- The workers keep the first assignment per (user, experiment, phase) and write only that one (they
-- rebuild who has one from this table before resuming a partition, see stream_checkpoints). ReplacingMergeTree(first_rank) collapses a replayed duplicate to the earliest assignment as a
-- second line of defence; `SELECT count() FROM assignments` is exact (FINAL is not needed, but harmless).
CREATE TABLE IF NOT EXISTS assignments
(
    user_id            String,
    experiment_id      UInt32,
    experiment_key     LowCardinality(String),
    variant_id         UInt32,
    variant_key        LowCardinality(String),
    phase              UInt32,
    assignment_version LowCardinality(String),
    assigned_at        DateTime64(3, 'UTC'),
    platform           LowCardinality(String),
    app_version        LowCardinality(String),
    surface            LowCardinality(String),
    kafka_partition    UInt16,
    kafka_offset       UInt64,
    inserted_at        DateTime64(3, 'UTC') DEFAULT now64(3),
    -- ReplacingMergeTree keeps the row with the highest version: rank earlier assignments higher.
    first_rank         UInt64 MATERIALIZED 18446744073709551615 - toUInt64(toUnixTimestamp64Milli(assigned_at))
)
ENGINE = ReplacingMergeTree(first_rank)
PARTITION BY experiment_id
ORDER BY (experiment_id, phase, user_id);

-- The experiment registry, copied by the stream workers from the compacted `experiments` topic.
-- One row per experiment version; ReplacingMergeTree(version) keeps the newest, so read it with FINAL
-- (or argMax(..., version)). `definition` holds the full JSON, which is what the gateway restores the
-- registry from when the (embedded, in-memory) broker comes back empty.
CREATE TABLE IF NOT EXISTS experiments
(
    experiment_id    UInt32,
    experiment_key   String,
    name             String,
    description      String,
    status           LowCardinality(String),
    start_at         Nullable(DateTime64(3, 'UTC')),
    end_at           Nullable(DateTime64(3, 'UTC')),
    coverage         Float64,
    hash_seed        String,
    phase            UInt32,
    phase_started_at Nullable(DateTime64(3, 'UTC')),
    targeting        String,
    baseline_config  String,
    source           LowCardinality(String),
    created_at       DateTime64(3, 'UTC'),
    updated_at       DateTime64(3, 'UTC'),
    definition       String,
    version          UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY experiment_id;

CREATE TABLE IF NOT EXISTS experiment_variants
(
    experiment_id    UInt32,
    variant_id       UInt32,
    variant_key      String,
    variant_name     String,
    description      String,
    weight           Float64,
    position         UInt16,
    bucket_start     UInt16,
    bucket_end       UInt16,
    config_overrides String,
    version          UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (experiment_id, variant_id);

-- Every phase an experiment has been through (a new phase = a new hash seed that re-randomises users).
CREATE TABLE IF NOT EXISTS experiment_phases
(
    experiment_id    UInt32,
    phase            UInt32,
    hash_seed        String,
    started_at       DateTime64(3, 'UTC'),
    version          UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (experiment_id, phase);

-- Cumulative experiment rollups: what experiment results are computed from (gateway/results.py).
--
-- Per experiment, phase and variant over EXPOSED users (first assignment, or the experiment's
-- exposure_event), counting each user's events from the exposure on. The per-day rollups of 0005 cannot
-- give the variance of a user's total since exposure (the square of a sum over days is not the sum of
-- daily squares); these keep the sufficient statistics of each user's total x, and of the CUPED covariate
-- y (the same source over the experiment's cuped_lookback_days whole UTC days before the exposure day).
-- Written by the stream workers like every rollup: per Kafka partition, ReplacingMergeTree(version), so a
-- replay rewrites the same numbers. Query the views; they sum the partitions.

-- Exposed users per experiment, phase and variant.
CREATE TABLE IF NOT EXISTS experiment_exposed_by_partition
(
    experiment_id   UInt32,
    phase           UInt32,
    variant_id      UInt32,
    kafka_partition UInt16,
    users           UInt64,
    version         UInt64,
    updated_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (experiment_id, phase, variant_id, kafka_partition);

-- Per source: source = 'event' (x = the user's events of that name) or 'tracked' (x = the sum of the values
-- the user tracked for this experiment under that metric name). Sums are over exposed users; users without
-- the source add 0, so mean = sum_x / exposed users.
CREATE TABLE IF NOT EXISTS experiment_source_rollups_by_partition
(
    experiment_id     UInt32,
    phase             UInt32,
    variant_id        UInt32,
    source            LowCardinality(String),
    name              String,
    kafka_partition   UInt16,
    users_with_metric UInt64,
    event_count       UInt64,
    sum_x             Float64,
    sum_x2            Float64,
    users_with_pre    UInt64,
    sum_y             Float64,
    sum_y2            Float64,
    sum_xy            Float64,
    users_with_both   UInt64,
    version           UInt64,
    updated_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (experiment_id, phase, variant_id, source, name, kafka_partition);

-- Ratio metrics (tests.json / API `metrics` of type ratio): x = the user's numerator value, y = their
-- denominator value, since exposure; the delta method needs sum_xy.
CREATE TABLE IF NOT EXISTS experiment_ratio_rollups_by_partition
(
    experiment_id   UInt32,
    phase           UInt32,
    variant_id      UInt32,
    metric          String,
    kafka_partition UInt16,
    sum_x           Float64,
    sum_x2          Float64,
    sum_y           Float64,
    sum_y2          Float64,
    sum_xy          Float64,
    version         UInt64,
    updated_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (experiment_id, phase, variant_id, metric, kafka_partition);

CREATE VIEW IF NOT EXISTS experiment_exposed AS
SELECT experiment_id, phase, variant_id, sum(users) AS exposed_users
FROM experiment_exposed_by_partition FINAL
GROUP BY experiment_id, phase, variant_id
HAVING exposed_users > 0;

CREATE VIEW IF NOT EXISTS experiment_source_rollups AS
SELECT experiment_id, phase, variant_id, source, name,
       sum(users_with_metric) AS users_with_metric, sum(event_count) AS event_count,
       sum(sum_x) AS sum_x, sum(sum_x2) AS sum_x2, sum(users_with_pre) AS users_with_pre,
       sum(sum_y) AS sum_y, sum(sum_y2) AS sum_y2, sum(sum_xy) AS sum_xy, sum(users_with_both) AS users_with_both
FROM experiment_source_rollups_by_partition FINAL
GROUP BY experiment_id, phase, variant_id, source, name
HAVING users_with_metric > 0 OR users_with_pre > 0;

CREATE VIEW IF NOT EXISTS experiment_ratio_rollups AS
SELECT experiment_id, phase, variant_id, metric,
       sum(sum_x) AS sum_x, sum(sum_x2) AS sum_x2, sum(sum_y) AS sum_y, sum(sum_y2) AS sum_y2, sum(sum_xy) AS sum_xy
FROM experiment_ratio_rollups_by_partition FINAL
GROUP BY experiment_id, phase, variant_id, metric;

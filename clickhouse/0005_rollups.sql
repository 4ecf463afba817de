-- Streaming rollups, written by the stream workers as upserts of the current value.
--
-- Each worker owns some Kafka partitions (a user's events and assignments share one), keeps its users'
-- state in memory and writes, per partition, the current totals of every key that changed. The
-- *_by_partition tables hold those rows: ReplacingMergeTree(version) keeps the newest (`version` is
-- the write time in microseconds), so a replay after a crash rewrites the same numbers instead of
-- adding them twice. The views named as the seed's tables sum the partitions (users never span
-- partitions, so user counts add up): query the views.

CREATE TABLE IF NOT EXISTS experiment_metric_rollups_by_partition
(
    experiment_id     UInt32,
    variant_id        UInt32,
    metric            LowCardinality(String),
    day               Date,
    kafka_partition   UInt16,
    users_with_metric UInt64,
    event_count       UInt64,
    n                 UInt64,
    sum_x             Float64,
    sum_x2            Float64,
    version           UInt64,
    updated_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (experiment_id, variant_id, metric, day, kafka_partition);

CREATE TABLE IF NOT EXISTS experiment_exposures_by_partition
(
    experiment_id   UInt32,
    variant_id      UInt32,
    day             Date,
    kafka_partition UInt16,
    users           UInt64,
    version         UInt64,
    updated_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (experiment_id, variant_id, day, kafka_partition);

CREATE TABLE IF NOT EXISTS funnel_rollups_by_partition
(
    funnel_key      LowCardinality(String),
    experiment_id   UInt32,
    variant_id      UInt32,
    step            UInt8,
    step_name       LowCardinality(String),
    kafka_partition UInt16,
    users           UInt64,
    version         UInt64,
    updated_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (funnel_key, experiment_id, variant_id, step, kafka_partition);

CREATE TABLE IF NOT EXISTS daily_metric_rollups_by_partition
(
    day             Date,
    event_name      LowCardinality(String),
    platform        LowCardinality(String),
    app_version     LowCardinality(String),
    kafka_partition UInt16,
    events          UInt64,
    unique_users    UInt64,
    version         UInt64,
    updated_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (day, event_name, platform, app_version, kafka_partition);

-- Every flush of rollups: when, how many rows, the latest event time included, how long, which worker.
CREATE TABLE IF NOT EXISTS rollup_runs
(
    run_at          DateTime64(3, 'UTC'),
    worker          String,
    partitions      Array(UInt16),
    event_rows      UInt64,
    assignment_rows UInt64,
    rollup_rows     UInt64,
    watermark       Nullable(DateTime64(3, 'UTC')),
    duration_ms     Float64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(run_at)
ORDER BY run_at;

-- Per experiment, variant, metric and UTC day. metric is an event name, or a tracked metric name of
-- /apiv1/ab-tests/{id}/track. A user's value x is their event count that day (events) or the sum of the
-- tracked values that day (metrics); n, sum_x, sum_x2 are over users with the metric. exposed_users is
-- the variant's exposed users to date, so mean over exposed = sum_x / exposed_users and
-- var = (sum_x2 - sum_x^2 / exposed_users) / (exposed_users - 1) (users without the metric count as 0).
CREATE VIEW IF NOT EXISTS experiment_metric_rollups AS
SELECT
    m.experiment_id AS experiment_id,
    m.variant_id AS variant_id,
    m.metric AS metric,
    m.day AS day,
    e.exposed_users AS exposed_users,
    m.users_with_metric AS users_with_metric,
    m.event_count AS event_count,
    m.n AS n,
    m.sum_x AS sum_x,
    m.sum_x2 AS sum_x2
FROM
(
    SELECT experiment_id, variant_id, metric, day,
           sum(users_with_metric) AS users_with_metric, sum(event_count) AS event_count,
           sum(n) AS n, sum(sum_x) AS sum_x, sum(sum_x2) AS sum_x2
    FROM experiment_metric_rollups_by_partition FINAL
    GROUP BY experiment_id, variant_id, metric, day
) AS m
LEFT JOIN
(
    SELECT experiment_id, variant_id, sum(users) AS exposed_users
    FROM experiment_exposures_by_partition FINAL
    GROUP BY experiment_id, variant_id
) AS e USING (experiment_id, variant_id)
WHERE m.users_with_metric > 0;

-- Users first exposed (assigned) per experiment, variant and UTC day.
CREATE VIEW IF NOT EXISTS experiment_exposures AS
SELECT experiment_id, variant_id, day, sum(users) AS users
FROM experiment_exposures_by_partition FINAL
GROUP BY experiment_id, variant_id, day
HAVING users > 0;

-- Per funnel (tests.json), experiment and variant (experiment_id 0 = all users), step: users who reached
-- the step in order (non-decreasing event times) within the funnel's conversion window of the first step.
CREATE VIEW IF NOT EXISTS funnel_rollups AS
SELECT funnel_key, experiment_id, variant_id, step, any(step_name) AS step_name, sum(users) AS users
FROM funnel_rollups_by_partition FINAL
GROUP BY funnel_key, experiment_id, variant_id, step
HAVING users > 0;

-- Per UTC day and event name: events and unique users, per platform and app version ('' = not sent);
-- the rows with platform = '*' and app_version = '*' are the totals over all platforms and versions.
CREATE VIEW IF NOT EXISTS daily_metric_rollups AS
SELECT day, event_name, platform, app_version, sum(events) AS events, sum(unique_users) AS unique_users
FROM daily_metric_rollups_by_partition FINAL
GROUP BY day, event_name, platform, app_version
HAVING events > 0;

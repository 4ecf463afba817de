-- Two details the results and the metrics API need of the cumulative rollups (0008):
-- * users_nonzero: exposed users whose value x is not 0. For events it equals users_with_metric (each event
--   adds 1); for tracked values it does not (a user who tracked 0.0 has the source but x = 0), and the
--   minimum-conversions guard rail of a sum metric counts users with a non-zero value.
-- * exposed users per UTC day of their exposure, per phase, with the same exposure rule as
--   experiment_exposed, so the days add up to the total.
ALTER TABLE experiment_source_rollups_by_partition ADD COLUMN IF NOT EXISTS users_nonzero UInt64 DEFAULT 0;

CREATE OR REPLACE VIEW experiment_source_rollups AS
SELECT experiment_id, phase, variant_id, source, name,
       sum(users_with_metric) AS users_with_metric, sum(users_nonzero) AS users_nonzero,
       sum(event_count) AS event_count, sum(sum_x) AS sum_x, sum(sum_x2) AS sum_x2,
       sum(users_with_pre) AS users_with_pre, sum(sum_y) AS sum_y, sum(sum_y2) AS sum_y2, sum(sum_xy) AS sum_xy,
       sum(users_with_both) AS users_with_both
FROM experiment_source_rollups_by_partition FINAL
GROUP BY experiment_id, phase, variant_id, source, name
HAVING users_with_metric > 0 OR users_with_pre > 0;

CREATE TABLE IF NOT EXISTS experiment_exposed_daily_by_partition
(
    experiment_id   UInt32,
    phase           UInt32,
    variant_id      UInt32,
    day             Date,
    kafka_partition UInt16,
    users           UInt64,
    version         UInt64,
    updated_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (experiment_id, phase, variant_id, day, kafka_partition);

CREATE VIEW IF NOT EXISTS experiment_exposed_daily AS
SELECT experiment_id, phase, variant_id, day, sum(users) AS exposed_users
FROM experiment_exposed_daily_by_partition FINAL
GROUP BY experiment_id, phase, variant_id, day
HAVING exposed_users > 0;

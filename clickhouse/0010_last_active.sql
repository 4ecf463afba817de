-- Active users over any trailing window, exactly and from rollups: each user counts once, on the UTC day of
-- their latest event (written by the stream workers per Kafka partition, like every rollup). Users active on
-- or after day D = sum(users) over days >= D; a user's row moves to a later day when they come back.
CREATE TABLE IF NOT EXISTS user_last_active_by_partition
(
    day             Date,
    kafka_partition UInt16,
    users           UInt64,
    version         UInt64,
    updated_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (day, kafka_partition);

CREATE VIEW IF NOT EXISTS user_last_active AS
SELECT day, sum(users) AS users
FROM user_last_active_by_partition FINAL
GROUP BY day
HAVING users > 0;

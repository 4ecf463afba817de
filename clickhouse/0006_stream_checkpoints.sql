-- Where each worker partition stands: the last Kafka record whose rows are in ClickHouse, per topic and
-- partition, with a hash of that record's bytes. On every partition assignment a worker resumes right
-- after it, but only after checking that the record at that offset is still the same record: a
-- recreated topic (the embedded broker keeps nothing across its own restart) starts again at offset 0,
-- and its offsets must not be mistaken for the old topic's. Written after the rows of each flush.
CREATE TABLE IF NOT EXISTS stream_checkpoints
(
    topic           String,
    kafka_partition UInt16,
    kafka_offset    UInt64,
    record_sha1     String,
    written_at      DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(written_at)
ORDER BY (topic, kafka_partition);

-- The ArkForge analytics server's SQLite tables, as views: SQL written against that server (its `events`,
-- `ab_tests`, `ab_variants`, `ab_assignments` and `ab_metrics` tables, with the same column names) keeps working
-- on ClickHouse. They are read-only views over abstream's own tables; write through the API as before.
--
-- Types: ids are Int64 (SQLite's INTEGER), times DateTime64(3, 'UTC'), weights and values Float64, absent text NULL.
-- What differs from the SQLite server, by design:
-- * `events.id`, `ab_metrics.id` and `ab_assignments.id` were AUTOINCREMENT; abstream has no global counter, so
--   they are a stable 63-bit hash of the row's identity (events and metrics: user_id and event_id; assignments:
--   user, experiment and phase). They identify a row and never change, but they are not in time order: order
--   by created_at / assigned_at. `ab_tests.id` and `ab_variants.id` are the registry's own ids (the API's).
-- * `events` holds every accepted event of both surfaces (/v1 and /apiv1); tracked values of
--   /apiv1/ab-tests/{id}/track are in `ab_metrics`, as on the SQLite server. `created_at` is the event's time
--   (skew-corrected client time when sent, else the gateway's receive time, which is what the SQLite server stored).
-- * `ab_variants` lists the variants of each test's current registry version; `ab_assignments` the assignments of
--   each test's current phase (one row per user and test, the seed's UNIQUE(user_id, test_id)).
-- * `ab_metrics.variant_id` is the variant the user was in when the value was received. A value tracked by a user
--   with no assignment in that test (or before it) has no variant: the SQLite server could not store it
--   (variant_id NOT NULL) and results do not count it, so it is left out here; event_logs (kind = 'metric') keeps it.
-- * `weight` is the weight as configured (relative, as the SQLite server stored it); GET /apiv1/ab-tests shows it
--   normalised to shares.

CREATE VIEW IF NOT EXISTS events AS
SELECT
    toInt64(bitAnd(sipHash64(user_id, event_id), 0x7FFFFFFFFFFFFFFF)) AS id,
    toString(event_name) AS event_type,
    user_id,
    nullIf(session_id, '') AS session_id,
    properties,
    event_time AS created_at
FROM event_logs FINAL
WHERE kind = 'event';

CREATE VIEW IF NOT EXISTS ab_tests AS
SELECT
    toInt64(experiment_id) AS id,
    name AS test_name,
    nullIf(description, '') AS description,
    created_at
FROM experiments FINAL;

CREATE VIEW IF NOT EXISTS ab_variants AS
SELECT
    toInt64(v.variant_id) AS id,
    toInt64(v.experiment_id) AS test_id,
    v.variant_name AS variant_name,
    nullIf(v.description, '') AS description,
    v.weight AS weight,
    e.created_at AS created_at
FROM
(
    -- the variants of each experiment's latest registry version (a new phase may have dropped some)
    SELECT experiment_id, variant_id, variant_name, description, weight, position
    FROM experiment_variants FINAL
    WHERE (experiment_id, version) IN (SELECT experiment_id, max(version) FROM experiment_variants GROUP BY experiment_id)
) AS v
INNER JOIN (SELECT experiment_id, created_at FROM experiments FINAL) AS e ON e.experiment_id = v.experiment_id;

CREATE VIEW IF NOT EXISTS ab_assignments AS
SELECT
    toInt64(bitAnd(sipHash64(a.user_id, a.experiment_id, a.phase), 0x7FFFFFFFFFFFFFFF)) AS id,
    a.user_id AS user_id,
    toInt64(a.experiment_id) AS test_id,
    toInt64(a.variant_id) AS variant_id,
    a.assigned_at AS assigned_at
FROM (SELECT user_id, experiment_id, phase, variant_id, assigned_at FROM assignments FINAL) AS a
INNER JOIN (SELECT experiment_id, phase FROM experiments FINAL) AS e
    ON e.experiment_id = a.experiment_id AND e.phase = a.phase;

CREATE VIEW IF NOT EXISTS ab_metrics AS
SELECT
    toInt64(bitAnd(sipHash64(user_id, event_id), 0x7FFFFFFFFFFFFFFF)) AS id,
    toInt64(test) AS test_id,
    toInt64(JSONExtractUInt(attribution, 'variant_id')) AS variant_id,
    metric_name,
    ifNull(metric_value, 0) AS value,
    event_time AS created_at
FROM
(
    SELECT
        user_id, event_id, assumeNotNull(experiment_id) AS test, metric_name, metric_value, event_time,
        -- the user's assignment in this test that the event was enriched with (see docs/stream-workers.md)
        arrayFirst(a -> JSONExtractUInt(a, 'experiment_id') = test, JSONExtractArrayRaw(assignments)) AS attribution
    FROM event_logs FINAL
    WHERE kind = 'metric' AND experiment_id IS NOT NULL
)
WHERE attribution != '';

-- A request refused as a whole (malformed JSON, a bad envelope field, too many events, 413, 415) leaves one
-- dead letter too, beside the one per rejected event of an answered request: `scope` tells them apart, so the
-- ingestion dashboard can count rejected events (scope = 'event') and refused requests (scope = 'request').
ALTER TABLE rejected_events ADD COLUMN IF NOT EXISTS scope LowCardinality(String) DEFAULT 'event' AFTER surface;

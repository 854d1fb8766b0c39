-- One row per feedback (mlmesh.v1.FeedbackEvent), keyed by feedback_id like predictions.
CREATE TABLE IF NOT EXISTS feedback
(
    feedback_id String,
    prediction_id String,
    tenant LowCardinality(String),
    unit_id String,
    created_at DateTime64(3, 'UTC'),
    label String,
    rating Nullable(Float64),
    outcome LowCardinality(String),
    text String,
    trace_id String,
    schema_version UInt16,
    kafka_partition Int32,
    kafka_offset Int64,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_prediction prediction_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_unit unit_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(created_at)
ORDER BY feedback_id
TTL created_at + INTERVAL ${feedback_days} DAY
SETTINGS non_replicated_deduplication_window = 1000;

-- Protobuf landing table and view, as for predictions (see 001).
CREATE TABLE IF NOT EXISTS feedback_ingest
(
    schema_version UInt32,
    feedback_id String,
    prediction_id String,
    tenant String,
    unit_id String,
    created_at Tuple(seconds Int64, nanos Int32),
    label String,
    rating Nullable(Float64),
    outcome String,
    text String,
    trace_id String,
    kafka_partition Int32,
    kafka_offset Int64,
    kafka_timestamp Int64
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS feedback_ingest_mv TO feedback AS
SELECT
    feedback_id, prediction_id, tenant, unit_id,
    fromUnixTimestamp64Milli(if(tupleElement(created_at, 'seconds') = 0 AND tupleElement(created_at, 'nanos') = 0,
        kafka_timestamp, tupleElement(created_at, 'seconds') * 1000 + intDiv(tupleElement(created_at, 'nanos'), 1000000)),
        'UTC') AS created_at,
    label, rating, outcome, text, trace_id, schema_version, kafka_partition, kafka_offset
FROM feedback_ingest;

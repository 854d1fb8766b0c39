-- One row per alert (mlmesh.v1.AlertEvent), keyed by alert_id. No user data.
CREATE TABLE IF NOT EXISTS alerts
(
    alert_id String,
    created_at DateTime64(3, 'UTC'),
    severity LowCardinality(String),
    kind LowCardinality(String),
    model LowCardinality(String),
    model_version LowCardinality(String),
    metric LowCardinality(String),
    value Float64,
    threshold Float64,
    message String,
    labels Map(String, String),
    schema_version UInt16,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(created_at)
ORDER BY alert_id
TTL created_at + INTERVAL ${alerts_days} DAY
SETTINGS non_replicated_deduplication_window = 1000;

-- Protobuf landing table and view, as for predictions (see 001).
CREATE TABLE IF NOT EXISTS alerts_ingest
(
    schema_version UInt32,
    alert_id String,
    created_at Tuple(seconds Int64, nanos Int32),
    severity String,
    kind String,
    model String,
    model_version String,
    metric String,
    value Float64,
    threshold Float64,
    message String,
    labels Map(String, String),
    kafka_partition Int32,
    kafka_offset Int64,
    kafka_timestamp Int64
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS alerts_ingest_mv TO alerts AS
SELECT
    alert_id,
    fromUnixTimestamp64Milli(if(tupleElement(created_at, 'seconds') = 0 AND tupleElement(created_at, 'nanos') = 0,
        kafka_timestamp, tupleElement(created_at, 'seconds') * 1000 + intDiv(tupleElement(created_at, 'nanos'), 1000000)),
        'UTC') AS created_at,
    severity, kind, model, model_version, metric, value, threshold, message, labels, schema_version
FROM alerts_ingest;

-- One row per prediction (mlmesh.v1.PredictionEvent, flattened). prediction_id is the
-- ReplacingMergeTree key: a redelivered event collapses into one row on merge, and the
-- canonical queries (services/logger/queries.py) read with FINAL so counts are exact before.
-- Tensors: input_values holds every value (tensors concatenated, row-major); input_names has
-- one name per value ("input[3]" = element 3 of tensor input; a one-value tensor keeps its
-- name), so drift SQL is: ARRAY JOIN input_names AS name, input_values AS value GROUP BY name.
CREATE TABLE IF NOT EXISTS predictions
(
    prediction_id String,
    request_id String,
    tenant LowCardinality(String),
    unit_id String,
    rpc LowCardinality(String),
    model LowCardinality(String),
    model_version LowCardinality(String),
    experiment LowCardinality(String),
    variant LowCardinality(String),
    shadow Bool,
    started_at DateTime64(3, 'UTC'),
    latency_ms Float64,
    status_code LowCardinality(String),
    error_message String,
    input_tensors Array(LowCardinality(String)),
    input_sizes Array(UInt32),
    input_values Array(Float64),
    inputs_truncated Bool,
    output_tensors Array(LowCardinality(String)),
    output_sizes Array(UInt32),
    output_values Array(Float64),
    outputs_truncated Bool,
    prompt String,
    completion String,
    input_tokens Int32,
    output_tokens Int32,
    time_to_first_token_ms Float64,
    finish_reason LowCardinality(String),
    max_tokens Int32,
    temperature Float32,
    top_p Float32,
    cost_usd Float64,
    trace_id String,
    span_id String,
    schema_version UInt16,
    kafka_partition Int32,
    kafka_offset Int64,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3),
    -- One name per value, computed by ClickHouse at insert (cheaper than sending 30 strings a row).
    input_names Array(LowCardinality(String)) MATERIALIZED arrayFlatten(arrayMap((n, c) -> if(c = 1, [n],
        arrayMap(i -> concat(n, '[', toString(i), ']'), range(c))), input_tensors, input_sizes)),
    output_names Array(LowCardinality(String)) MATERIALIZED arrayFlatten(arrayMap((n, c) -> if(c = 1, [n],
        arrayMap(i -> concat(n, '[', toString(i), ']'), range(c))), output_tensors, output_sizes)),
    INDEX idx_model model TYPE set(256) GRANULARITY 4,
    INDEX idx_started started_at TYPE minmax GRANULARITY 1,
    INDEX idx_unit unit_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(started_at)
ORDER BY prediction_id
TTL started_at + INTERVAL ${predictions_days} DAY
SETTINGS non_replicated_deduplication_window = 1000;

-- The logger inserts the events' protobuf bytes here (format Protobuf, the schema inline, see
-- services/logger/ingest_schema.py): ClickHouse decodes them, the view below flattens them into
-- `predictions`, and the Null engine keeps nothing. Columns follow the proto field names.
CREATE TABLE IF NOT EXISTS predictions_ingest
(
    schema_version UInt32,
    prediction_id String,
    request_id String,
    tenant String,
    unit_id String,
    rpc String,
    model String,
    model_version String,
    experiment String,
    variant String,
    shadow Bool,
    started_at Tuple(seconds Int64, nanos Int32),
    latency_ms Float64,
    status_code String,
    error_message String,
    inputs Nested(name String, values Array(Float64), truncated Bool),
    outputs Nested(name String, values Array(Float64), truncated Bool),
    prompt String,
    completion String,
    input_tokens Int32,
    output_tokens Int32,
    time_to_first_token_ms Float64,
    finish_reason String,
    max_tokens Int32,
    temperature Float32,
    top_p Float32,
    cost_usd Float64,
    trace_id String,
    span_id String,
    kafka_partition Int32,
    kafka_offset Int64,
    kafka_timestamp Int64
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS predictions_ingest_mv TO predictions AS
SELECT
    prediction_id, request_id, tenant, unit_id, rpc, model, model_version, experiment, variant, shadow,
    -- An unset Timestamp means the producer forgot it: the broker's record time is the next best.
    fromUnixTimestamp64Milli(if(tupleElement(started_at, 'seconds') = 0 AND tupleElement(started_at, 'nanos') = 0,
        kafka_timestamp, tupleElement(started_at, 'seconds') * 1000 + intDiv(tupleElement(started_at, 'nanos'), 1000000)),
        'UTC') AS started_at,
    latency_ms, status_code, error_message,
    `inputs.name` AS input_tensors,
    arrayMap(v -> toUInt32(length(v)), `inputs.values`) AS input_sizes,
    arrayFlatten(`inputs.values`) AS input_values,
    arrayExists(t -> t, `inputs.truncated`) AS inputs_truncated,
    `outputs.name` AS output_tensors,
    arrayMap(v -> toUInt32(length(v)), `outputs.values`) AS output_sizes,
    arrayFlatten(`outputs.values`) AS output_values,
    arrayExists(t -> t, `outputs.truncated`) AS outputs_truncated,
    prompt, completion, input_tokens, output_tokens, time_to_first_token_ms, finish_reason, max_tokens,
    temperature, top_p, cost_usd, trace_id, span_id, schema_version, kafka_partition, kafka_offset
FROM predictions_ingest;

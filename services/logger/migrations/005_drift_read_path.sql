-- The drift pass (services/drift/queries.py, numeric_window) reads every logged tensor value of
-- its window. Two changes make that read cheaper; what is stored does not change.
--
-- 1. LZ4 for the tensor values. With the engine's default codec (ZSTD(3) in embedded chdb),
--    decompressing input_values was most of the drift pass: reading 10 values from each of 10M
--    rows took ~1.4 s on 2 cores, ~0.7 s with LZ4 (bench/drift_bench.py). It costs disk: 620 MB
--    instead of 472 MB for those 100M values (LZ4HC: 505 MB, as fast to read, but ~4x the
--    CPU in every merge). Still Float64, the event contract (events.proto: values as float64);
--    Float32 would halve the read again but round FP64 and INT64 inputs. Only the codec changes,
--    no mutation: existing parts keep theirs until merged (OPTIMIZE ... FINAL rewrites them).
-- 2. A hash of each row's tensor layout (names and sizes, per side). The drift pass reads values
--    at constant positions and counts the rows whose layout differs from the expected one; that
--    check compared two arrays per row (~0.3 s per 10M rows), it now compares one UInt64
--    (~0.03 s). Parts written before this migration compute the hash when read (about as costly
--    as the old check, until merged). Another layout with the same 64-bit hash (odds ~2^-64)
--    would be read at the expected positions.
ALTER TABLE predictions MODIFY COLUMN input_values Array(Float64) CODEC(LZ4);
ALTER TABLE predictions MODIFY COLUMN output_values Array(Float64) CODEC(LZ4);
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS input_layout UInt64
    MATERIALIZED cityHash64(input_tensors, input_sizes);
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS output_layout UInt64
    MATERIALIZED cityHash64(output_tensors, output_sizes);

-- One row per right-to-delete request. subject_key is the keyed hash of the unit id (the audit
-- must not hold the identifier it erased); the consumer also uses it as a tombstone so a Kafka
-- replay cannot bring back rows older than the deletion. No TTL: the audit is the proof.
CREATE TABLE IF NOT EXISTS privacy_audit
(
    audit_id String,
    subject_key String,
    requested_by String,
    reason String,
    requested_at DateTime64(3, 'UTC'),
    completed_at DateTime64(3, 'UTC'),
    rows_removed Map(String, UInt64),
    rows_remaining Map(String, UInt64),
    verified Bool
)
ENGINE = MergeTree
ORDER BY (requested_at, audit_id);

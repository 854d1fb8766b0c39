"""Logger service: Kafka events -> PII policy -> ClickHouse; queries, right-to-delete, retention."""

"""Kafka consumer: records in, component assignments, dead letters and weight drift out."""

"""Connectors that turn event streams into streamem models and back (Kafka)."""

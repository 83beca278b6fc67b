"""Learners run without a broker: a checkpoint store in memory, and an input with no positions."""

from __future__ import annotations


class MemoryStore:
    """A checkpoint store in a dict (the learner reads it at start and when partitions move)."""

    def __init__(self):
        self.saved: dict[str, bytes] = {}

    def where(self, key: str) -> str:
        return f"memory {key}"

    def save_all(self, entries) -> None:
        self.saved.update(entries)

    def load(self, key: str) -> bytes | None:
        return self.saved.get(key)

    def load_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.saved.items() if k.startswith(prefix)}


def no_input_positions() -> None:
    """The learners ask the broker where the input ends when they start; there is none here (an empty input)."""
    from streamem_connectors.kafka import learners
    from streamem_connectors.kafka.clients import InputPositions

    learners.input_positions = lambda settings: InputPositions(settings.input_topic, {}, {})

"""The output side of the consumer: answer and learn each batch, send the answers, write checkpoints.

An `Answerer` owns the learner and the producer of every output topic; it builds the
checkpoints' documents (and reads stored ones through its own store). The consume loop
(`streamem_connectors.kafka.pipeline`) owns the input side: it polls, hands batches over,
stores each checkpoint and then commits its offsets. An answerer runs in a child process
by default (`streamem_connectors.kafka.model_process`), so producing and learning run
beside the polling, each under its own interpreter lock.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from streamem_connectors.kafka.checkpoint import make_store
from streamem_connectors.kafka.clients import make_sink
from streamem_connectors.kafka.modes import make_learner
from streamem_connectors.kafka.records import InputBatch, OutputRecord
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = ["Answerer", "Report"]


class Report(NamedTuple):
    """What a batch did, for progress output and metrics."""

    counters: dict[str, int]
    weights: list[float]
    drifts: list[OutputRecord]


class Answerer:
    """The learner (instance, keyed or replicated, as the settings say), its sink, and the checkpoint store
    it reads stored models from."""

    def __init__(self, settings: ConsumerSettings):
        self.sink = make_sink(settings)
        try:
            self.store = make_store(settings, self.sink)
            self.learner = make_learner(settings, self.store)
        except BaseException:
            self.sink.close()
            raise
        self.drift_topic = settings.topics["drift"]

    def process(self, batch: InputBatch) -> Report:
        """Answer, learn and send; the answers are acknowledged by the next `checkpoint_entries`."""
        outputs = self.learner.process(batch.records_view(), batch.decoded)
        self.sink.send(outputs)
        drifts = [o for o in outputs[batch.size :] if o.topic == self.drift_topic]
        return Report(dataclasses.asdict(self.learner.counters), self.learner.weights(), drifts)

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        """Every answer acknowledged (or `DeliveryFailed`), then the checkpoint's documents, for the
        loop to store (`AnswererHandle.store`) while this answers the next batches."""
        self.sink.flush()
        return self.learner.checkpoint_entries()

    # -- the learner's books, in the order the loop kept them -------------------------------------
    def revoked(self, partitions) -> None:
        self.learner.revoked(partitions)

    def start_offsets(self, assigned) -> dict:
        return self.learner.start_offsets(assigned)

    def advance(self, offsets) -> None:
        self.learner.advance(offsets)

    def idle(self) -> None:
        self.learner.idle()

    def finish(self) -> None:
        self.learner.finish()

    def close(self) -> None:
        try:
            self.sink.close()
        finally:
            self.learner.close()

"""The consumer loop: poll -> decode -> predict, learn -> produce -> checkpoint -> commit.

Guarantee: at-least-once. Every input offset ends in exactly one assignment or
one dead-letter record. Every `checkpoint_every` records or `checkpoint_interval_s`
seconds (and when it stops) the loop checkpoints, in this order: 1. flush the
outputs and check every acknowledgement, 2. store the checkpoint (model +
detector + next offsets), 3. commit the offsets. After a crash the consumer
resumes from the checkpoint's offsets, so no record is lost or learned twice;
the records answered after the last checkpoint are answered again (each answer
carries its source offset, so downstream can drop duplicates).

Prediction is prequential per poll batch: a batch is scored with the parameters
in force before it, then learned.

By default the learner runs in a child process (`connectors.kafka.model_process`):
the loop hands it batch N+1, sends the answers to batch N while the model works,
then collects. Offsets count as learned when a batch is collected; its answers go
out before the next checkpoint, so the order above is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from connectors.kafka import records as schemas
from connectors.kafka.checkpoint import make_store
from connectors.kafka.clients import Partition, make_sink, make_source
from connectors.kafka.learners import Counters, make_learner
from connectors.kafka.settings import ConsumerSettings

__all__ = ["Counters", "Progress", "run_consumer"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the loop reports after each batch (for progress output and metrics)."""

    counters: Counters
    elapsed_s: float
    weights: list[float]
    drifts: list[schemas.OutputRecord]
    batch_latency_s: float
    lag: int | None


class _Answered(NamedTuple):
    batch: list
    outputs: list
    next_offsets: dict
    polled_at: float


class _Stop:
    """Set by SIGTERM/SIGINT: the loop finishes its batch, flushes, checkpoints, commits, exits 0."""

    def __init__(self) -> None:
        self.event = threading.Event()

    @contextlib.contextmanager
    def on_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handle(signum, _frame):
            if self.event.is_set():  # a second Ctrl-C aborts
                raise KeyboardInterrupt
            logger.info("signal %s: finishing the current batch, then stopping", signal.Signals(signum).name)
            self.event.set()

        for sig in previous:
            signal.signal(sig, handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_consumer(
    settings: ConsumerSettings,
    on_batch: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    observability=None,
) -> Counters:
    """Run the consumer until `max_records`, a signal, or `stop` is set; returns the counters.

    `observability` (a `connectors.kafka.observability.Observability`) is told each time the
    loop turns, when the consumer is ready, and what each batch did.
    """
    stopper = _Stop()
    if stop is not None:
        stopper.event = stop
    sink = make_sink(settings)
    store = make_store(settings, sink)
    try:
        if settings.model_process:
            from connectors.kafka.model_process import LearnerProcess

            learner = LearnerProcess(settings)
        else:
            learner = make_learner(settings, store)
    except BaseException:
        sink.close()
        raise
    counters = learner.counters
    uncommitted: dict[Partition, int] = {}
    unsaved = 0  # records whose answers were sent since the last checkpoint
    polled = counters.records_in  # input records so far, with those of the checkpoint resumed from
    last_checkpoint = time.monotonic()
    source = None
    drift_topic = settings.topics["drift"]
    started = time.monotonic()
    lag, lag_at = None, -float("inf")  # records behind the end of the input, and when last asked

    def checkpoint() -> None:
        nonlocal unsaved, last_checkpoint
        if unsaved:
            sink.flush()  # 1. every output acknowledged
            store.save_all(learner.checkpoint_entries())  # 2. checkpoint stored
            owned = source.assigned()  # a partition lost in a rebalance is its new owner's to commit
            for tp in [tp for tp in uncommitted if tp not in owned]:
                del uncommitted[tp]
            if not uncommitted or source.commit(dict(uncommitted)):  # 3. committed (or retried next time)
                uncommitted.clear()
            unsaved = 0
        last_checkpoint = time.monotonic()

    def publish(answered: _Answered) -> None:
        nonlocal unsaved, lag, lag_at
        sink.send(answered.outputs)
        uncommitted.update(answered.next_offsets)
        unsaved += len(answered.batch)
        if on_batch is not None or observability is not None:
            drifts = [o for o in answered.outputs[len(answered.batch) :] if o.topic == drift_topic]
            now = time.monotonic()
            if now - lag_at >= 1.0:  # the lag costs a client call per partition: once a second is enough
                lag, lag_at = source.lag(), now
            progress = Progress(counters, now - started, learner.weights(), drifts, now - answered.polled_at, lag)
            for report in (on_batch, observability.on_batch if observability else None):
                if report is not None:
                    report(progress)

    # Rebalance callbacks run on the client's IO thread, where nothing may block: they only keep books.
    def on_assigned(partitions: list[Partition]) -> dict[Partition, int]:
        if observability is not None:
            observability.ready(bool(partitions))
        return learner.start_offsets(partitions)

    def on_revoked(partitions: list[Partition]) -> None:
        learner.revoked(partitions)

    held: _Answered | None = None  # a batch answered and learned whose outputs are not sent yet
    try:
        source = make_source(settings, on_assigned, on_revoked)
        with stopper.on_signals():
            while not stopper.event.is_set():
                if observability is not None:
                    observability.turned()
                limit = settings.max_poll_records
                if settings.max_records is not None:
                    limit = min(limit, settings.max_records - polled)
                    if limit <= 0:
                        break
                # With answers in hand, take only records already fetched: on a quiet topic the
                # answers then go out at once instead of after a poll timeout.
                batch = source.poll(limit, 0 if held else settings.poll_timeout_ms)
                polled_at = time.monotonic()
                if batch:
                    learner.submit(batch)  # a model process works on it while the answers before it go out
                    polled += len(batch)
                elif held is None:
                    learner.idle()
                if held is not None:
                    publish(held)
                    held = None
                if batch:
                    outputs = learner.collect()
                    next_offsets = {(r.topic, r.partition): r.offset + 1 for r in batch}
                    learner.advance(next_offsets)  # before the next poll, whose rebalance may ask for it
                    held = _Answered(batch, outputs, next_offsets, polled_at)
                waiting = unsaved + (len(held.batch) if held else 0)
                if waiting >= settings.checkpoint_every or (
                    waiting and time.monotonic() - last_checkpoint >= settings.checkpoint_interval_s
                ):
                    if held is not None:
                        publish(held)
                        held = None
                    checkpoint()
            if held is not None:
                publish(held)
                held = None
            learner.finish()
            unsaved = max(unsaved, 1)  # the last checkpoint also records what finish() applied
            checkpoint()  # a clean stop leaves nothing uncommitted
    finally:
        if source is not None:
            source.close()
        sink.close()
        learner.close()
    logger.info(
        "stopped after %d records: %d assigned, %d dead-lettered, %d drift events",
        counters.records_in,
        counters.assigned,
        counters.dead_lettered,
        counters.drift_events,
    )
    return counters

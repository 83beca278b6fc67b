"""The consume loop: poll -> decode -> hand the batch to the answerer -> checkpoint -> commit.

The loop owns the input side (polling, decoding, offsets, commits) and stores checkpoints; an
`Answerer` (`streamem_connectors.kafka.answerer`) owns the output side: it predicts, learns,
sends the answers (or dead letters, for records the decoder refused), and builds each
checkpoint's documents. By default the answerer runs in a child process
(`streamem_connectors.kafka.model_process`): the loop polls and decodes batch N+2 while batch N
is answered and batch N+1 waits for it, and stores a checkpoint while the child answers the
two batches polled (in one poll) after it: no poll comes between a checkpoint's documents and
its commit.

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
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from streamem_connectors.kafka import records as schemas
from streamem_connectors.kafka.clients import Partition, make_source
from streamem_connectors.kafka.learner import Counters
from streamem_connectors.kafka.model_process import AnswererHandle
from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.signals import StopSignals

__all__ = ["Counters", "Progress", "run_consumer"]

logger = logging.getLogger(__name__)
_IN_FLIGHT = 2  # batches handed to the answerer before the loop waits for the oldest one's answers


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the loop reports after each batch (for progress output and metrics)."""

    counters: Counters  # totals, with those of the checkpoint resumed from
    records_this_run: int  # input records answered by this run
    elapsed_s: float
    weights: list[float]
    drifts: list[schemas.OutputRecord]
    batch_latency_s: float
    lag: int | None


class _Submitted(NamedTuple):
    batch: schemas.InputBatch
    next_offsets: dict
    polled_at: float


def run_consumer(
    settings: ConsumerSettings,
    on_batch: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    observability=None,
) -> Counters:
    """Run the consumer until it has polled `max_records` records (in this run), a signal, or `stop`
    is set; returns the counters (totals, with those of the checkpoint resumed from).

    `observability` (a `streamem_connectors.kafka.observability.Observability`) is told each time the
    loop turns, when the consumer is ready, and what each batch did.
    """
    stopper = StopSignals(stop)
    signals = contextlib.ExitStack()  # the handlers stay through the close below: a signal then is a repeat too
    signals.enter_context(stopper.on_signals())  # first: a signal while the model process starts is a stop too
    try:
        answerer = AnswererHandle(settings, in_child=settings.model_process)
    except BaseException:
        signals.close()
        raise
    if stopper.event.is_set():  # a signal during start-up: nothing polled, nothing to checkpoint
        try:
            answerer.close()
        finally:
            signals.close()
        logger.info("stopped during start-up; in total %d records", answerer.counters.records_in)
        return answerer.counters
    counters = answerer.counters
    uncommitted: dict[Partition, int] = {}
    unsaved = 0  # records answered since the last checkpoint
    polled = 0  # input records this run (max_records counts these, not those of the checkpoint)
    restored = counters.records_in  # records of the earlier runs, restored from the checkpoint
    last_checkpoint = time.monotonic()
    source = None
    started = time.monotonic()
    lag, lag_at = None, -float("inf")  # records behind the end of the input, and when last asked

    def hand_over(batch: schemas.InputBatch, polled_at: float) -> None:
        next_offsets = batch.next_offsets()
        answerer.submit(batch)  # answered while the next poll runs
        answerer.advance(next_offsets)  # before that poll, whose rebalance may ask for it
        submitted.append(_Submitted(batch, next_offsets, polled_at))

    def checkpoint(then: list[schemas.InputBatch] = (), polled_at: float = 0.0) -> None:
        """Checkpoint the batches handed over so far; `then`, polled after them (in one poll), is answered
        in the model process while this one stores the checkpoint. No poll comes between the
        checkpoint's documents and its commit (a rebalance there could hand a partition to a consumer
        that reads its models before they are stored), nor between a batch's poll and its hand-over
        (the books a rebalance reads must hold every batch polled)."""
        nonlocal unsaved, last_checkpoint
        # blocks through a broker outage (up to delivery_timeout_s): /readyz says so meanwhile
        with observability.delivering() if observability is not None else contextlib.nullcontext():
            answerer.request_checkpoint()  # 1. every output acknowledged, then the documents built
            while submitted:
                collect(submitted.popleft())
            documents = answerer.checkpoint_documents()
            for batch in then:
                hand_over(batch, polled_at)
            answerer.store(documents)  # 2. checkpoint stored
            owned = source.assigned()  # a partition lost in a rebalance is its new owner's to commit
            for tp in [tp for tp in uncommitted if tp not in owned]:
                del uncommitted[tp]
            if not uncommitted or source.commit(dict(uncommitted)):  # 3. committed (or retried next time)
                uncommitted.clear()
        unsaved = 0
        last_checkpoint = time.monotonic()

    def poll(timeout_ms: int, batches: int = 1) -> tuple[list[schemas.InputBatch], float] | None:
        """Up to `batches` batches of `max_poll_records` records, from one poll, decoded, and when they
        were polled (no batch when nothing came); None once `max_records` are polled."""
        nonlocal polled
        limit = settings.max_poll_records * batches
        if settings.max_records is not None:
            limit = min(limit, settings.max_records - polled)
            if limit <= 0:
                return None
        batch = source.poll(limit, timeout_ms)
        polled_at = time.monotonic()
        polled += batch.size
        # each decoded while the answerer is busy with the batches before
        return [answerer.decoded(part) for part in batch.split(settings.max_poll_records)], polled_at

    def collect(submitted: _Submitted) -> None:
        nonlocal unsaved, lag, lag_at
        report = answerer.collect()
        uncommitted.update(submitted.next_offsets)
        unsaved += submitted.batch.size
        if on_batch is not None or observability is not None:
            now = time.monotonic()
            if now - lag_at >= 1.0:  # the lag costs a client call per partition: once a second is enough
                lag, lag_at = source.lag(), now
            progress = Progress(
                counters,
                counters.records_in - restored,
                now - started,
                report.weights,
                report.drifts,
                now - submitted.polled_at,
                lag,
            )
            for callback in (on_batch, observability.on_batch if observability else None):
                if callback is not None:
                    callback(progress)

    # Rebalance callbacks run on the client's IO thread, where nothing may block: they only keep books.
    def on_assigned(partitions: list[Partition]) -> dict[Partition, int]:
        if observability is not None:
            observability.ready(bool(partitions))
        return answerer.start_offsets(partitions)

    def on_revoked(partitions: list[Partition]) -> None:
        answerer.revoked(partitions)

    # The batches handed to the answerer and not collected yet, oldest first: up to two, so that it
    # always has the next one at hand (with one, it waited for the loop a fifth of the time).
    submitted: collections.deque[_Submitted] = collections.deque()
    try:
        source = make_source(settings, on_assigned, on_revoked)
        with stopper.on_signals():
            while not stopper.event.is_set():
                if observability is not None:
                    observability.turned()
                waiting = unsaved + sum(s.batch.size for s in submitted)
                due = waiting >= settings.checkpoint_every or (
                    waiting and time.monotonic() - last_checkpoint >= settings.checkpoint_interval_s
                )
                # While a batch is being answered, take only records already fetched: on a quiet
                # topic its answers are then collected at once instead of after a poll timeout. Before a
                # checkpoint, two batches' worth: the answerer answers them while it is stored.
                polled_batches = poll(0 if submitted else settings.poll_timeout_ms, batches=2 if due else 1)
                if polled_batches is None:
                    break
                batches, polled_at = polled_batches
                if due:
                    checkpoint(batches, polled_at)
                    continue
                if len(submitted) == _IN_FLIGHT or (submitted and not batches):
                    collect(submitted.popleft())
                elif not submitted and not batches:
                    answerer.idle()
                for batch in batches:
                    hand_over(batch, polled_at)
            while submitted:
                collect(submitted.popleft())
            answerer.finish()
            checkpoint()  # a clean stop leaves nothing uncommitted, and records what finish() applied
    finally:
        try:
            if source is not None:
                source.close()
        finally:
            try:
                answerer.close()
            finally:
                signals.close()
    logger.info(
        "stopped after %d records this run; in total %d records: %d assigned, %d dead-lettered, %d drift events",
        polled,
        counters.records_in,
        counters.assigned,
        counters.dead_lettered,
        counters.drift_events,
    )
    return counters

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

import streamem as se
from connectors.kafka import records as schemas
from connectors.kafka.checkpoint import CHECKPOINT_VERSION, Checkpoint, PartitionOffset, make_store
from connectors.kafka.clients import Partition, make_sink, make_source
from connectors.kafka.settings import ConsumerSettings
from streamem.drift import WeightDriftDetector
from streamem.schedules import StepSize

__all__ = ["Counters", "Progress", "run_consumer"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Counters:
    records_in: int = 0
    assigned: int = 0
    dead_lettered: int = 0
    drift_events: int = 0


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the loop reports after each batch (for progress output and metrics)."""

    counters: Counters
    elapsed_s: float
    weights: list[float]
    drifts: list[schemas.OutputRecord]
    batch_latency_s: float
    lag: int | None


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


def _new_model(settings: ConsumerSettings):
    step = StepSize(alpha=settings.step_alpha, eta_min=settings.step_floor)
    common = dict(batch_size=settings.batch_size, step=step, warmup=settings.warmup, seed=settings.seed)
    if settings.target is not None:
        return se.OnlineRegressionMixture(settings.n_components, **common)
    return se.OnlineGMM(
        settings.n_components, covariance_type=settings.covariance_type, features=tuple(settings.features), **common
    )


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
    topics = settings.topics
    decoder = schemas.RecordDecoder(settings.features, settings.target)
    sink = make_sink(settings)
    store = make_store(settings, sink)
    checkpoint = store.load()
    if checkpoint is None:
        model = _new_model(settings)
        detector = WeightDriftDetector(max(2, settings.n_components))
        offsets: dict[Partition, int] = {}
        counters = Counters()
    else:
        model = type(_new_model(settings)).from_dict(checkpoint.model)
        detector = WeightDriftDetector.from_dict(checkpoint.detector)
        offsets = {(o.topic, o.partition): o.offset for o in checkpoint.offsets}
        counters = Counters(**checkpoint.counters)
        logger.info(
            "resumed from checkpoint %s: %d records learned, offsets %s", settings.checkpoint_key, model.n_seen, offsets
        )

    def start_offsets(assigned: list[Partition]) -> dict[Partition, int]:
        if observability is not None:
            observability.ready(bool(assigned))
        # the checkpoint is authoritative for what the model has learned
        return {tp: offsets[tp] for tp in assigned if tp in offsets}

    source = make_source(settings, start_offsets)
    started = time.monotonic()
    since_drift_record = counters.records_in % settings.drift_every
    uncommitted: dict[Partition, int] = {}
    unsaved = 0
    last_checkpoint = time.monotonic()

    def checkpoint() -> None:
        nonlocal unsaved, last_checkpoint
        if unsaved:
            sink.flush()  # 1. every output acknowledged
            store.save(_checkpoint(settings, model, detector, offsets, counters))  # 2. checkpoint stored
            source.commit(dict(uncommitted))  # 3. offsets committed
            uncommitted.clear()
            unsaved = 0
        last_checkpoint = time.monotonic()

    try:
        with stopper.on_signals():
            while not stopper.event.is_set():
                if observability is not None:
                    observability.turned()
                limit = settings.max_poll_records
                if settings.max_records is not None:
                    limit = min(limit, settings.max_records - counters.records_in)
                    if limit <= 0:
                        break
                batch = source.poll(limit, settings.poll_timeout_ms)
                if batch:
                    began = time.monotonic()
                    outputs, drifts = _process(batch, decoder, model, detector, settings, topics, counters)
                    since_drift_record += len(batch)
                    if since_drift_record >= settings.drift_every and model.is_warm:  # periodic drift record
                        since_drift_record %= settings.drift_every
                        drifts.append(_drift_out(batch[-1], topics, model, detector, drift=False))
                    outputs.extend(drifts)
                    sink.send(outputs)
                    for record in batch:
                        uncommitted[(record.topic, record.partition)] = record.offset + 1
                    offsets.update(uncommitted)
                    unsaved += len(batch)
                    if on_batch is not None or observability is not None:
                        weights = model.weights_.tolist() if model.is_warm else []
                        latency = time.monotonic() - began
                        progress = Progress(
                            counters, time.monotonic() - started, weights, drifts, latency, source.lag()
                        )
                        for report in (on_batch, observability.on_batch if observability else None):
                            if report is not None:
                                report(progress)
                if unsaved >= settings.checkpoint_every or (
                    unsaved and time.monotonic() - last_checkpoint >= settings.checkpoint_interval_s
                ):
                    checkpoint()
            checkpoint()  # a clean stop leaves nothing uncommitted
    finally:
        source.close()
        sink.close()
    logger.info(
        "stopped after %d records: %d assigned, %d dead-lettered, %d drift events",
        counters.records_in,
        counters.assigned,
        counters.dead_lettered,
        counters.drift_events,
    )
    return counters


def _process(batch, decoder, model, detector, settings, topics, counters):
    """Answer every record of a poll batch (an assignment or a dead letter) and learn the good ones."""
    outputs: list[schemas.OutputRecord | None] = [None] * len(batch)
    rows, good = [], []
    for i, record in enumerate(batch):
        try:
            rows.append(decoder.decode(record.value))
            good.append(i)
        except ValueError as error:
            logger.warning(
                "dead-lettered %s: %s",
                record.where(),
                error,
                extra={"source": schemas.source_of(record), "error": str(error)},
            )
            outputs[i] = schemas.dead_letter(record, topics["dead_letter"], str(error))
    counters.records_in += len(batch)
    counters.dead_lettered += len(batch) - len(good)
    drifts: list[schemas.OutputRecord] = []
    if good:
        values = np.array(rows)
        d = len(settings.features)
        frame = pd.DataFrame(values[:, :d], columns=settings.features)
        seen_before = model.n_seen
        was_warm = model.is_warm  # answers of the provisional warm-up model say nothing about drift
        if settings.target is None:
            resp, log_likelihood = model.assign_many(frame)
            predictions = None
            model.learn_many(frame)
        else:
            target = pd.Series(values[:, d])
            resp, log_likelihood, predictions = model.assign_many(frame, target)
            model.learn_many(frame, target)
        answered = schemas.assignments(
            [batch[i] for i in good],
            topics["assignments"],
            resp.argmax(axis=1).tolist(),
            resp.tolist(),
            log_likelihood.tolist(),
            seen_before,
            None if predictions is None else predictions.tolist(),
        )
        for i, output in zip(good, answered):
            outputs[i] = output
        counters.assigned += len(good)
        events = detector.update_many(_padded(resp, detector.n_components)) if was_warm else []
        for event in events:
            counters.drift_events += 1
            record = batch[good[event.index]]
            logger.info("drift at %s: weights %s, reference %s", record.where(), event.weights, event.reference_weights)
            drifts.append(
                schemas.drift_record(
                    record,
                    topics["drift"],
                    seen_before + event.index + 1,
                    event.weights,
                    event.reference_weights,
                    event.distance,
                    True,
                )
            )
    return outputs, drifts


def _padded(resp: np.ndarray, width: int) -> np.ndarray:
    """A one-component model still feeds a two-component detector (the second column stays 0)."""
    if resp.shape[1] == width:
        return resp
    return np.hstack([resp, np.zeros((resp.shape[0], width - resp.shape[1]))])


def _drift_out(record, topics, model, detector, *, drift: bool) -> schemas.OutputRecord:
    return schemas.drift_record(
        record,
        topics["drift"],
        model.n_seen,
        detector.weights_.tolist(),
        detector.reference_weights_.tolist(),
        detector.distance,
        drift,
    )


def _checkpoint(settings, model, detector, offsets, counters) -> Checkpoint:
    return Checkpoint(
        version=CHECKPOINT_VERSION,
        key=settings.checkpoint_key,
        model=model.to_dict(),
        detector=detector.to_dict(),
        offsets=[PartitionOffset(topic=t, partition=p, offset=o) for (t, p), o in sorted(offsets.items())],
        counters=dataclasses.asdict(counters),
    )

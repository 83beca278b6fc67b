"""A thin source/sink layer over the Kafka client, so the loop does not care which client runs.

kafka-python is the default; confluent-kafka (librdkafka, `pip install streamem[confluent]`)
is selected with `--client confluent` for more throughput.

The sink's guarantee: `send` queues records; `flush` returns only when the broker
has acknowledged every record sent since the last flush, or raises
`DeliveryFailed`; the loop commits nothing past an unacknowledged record. A
producer whose sends failed is replaced by a new one before the records are
sent again (an idempotent producer that lost its producer id, as after a broker
restart, never recovers on its own: its sends fail until it is replaced).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import operator
import time
from collections.abc import Callable
from typing import Protocol

from streamem_connectors.kafka.records import InputBatch, OutputRecord
from streamem_connectors.kafka.security import confluent_security, kafka_python_security
from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.text import shorten
from streamem_connectors.kafka.topics import BrokerUnreachable, connect_timeout_options, silent_client

__all__ = [
    "DeliveryFailed",
    "InputPositions",
    "Sink",
    "Source",
    "consumer_config",
    "input_positions",
    "longest_checkpoint_s",
    "make_sink",
    "make_source",
    "max_poll_interval_ms",
    "rejected_for_good",
]

logger = logging.getLogger(__name__)

Partition = tuple[str, int]
_offset, _key, _value = (operator.attrgetter(name) for name in ("offset", "key", "value"))  # of kafka-python's records


class DeliveryFailed(RuntimeError):
    """The broker did not acknowledge every output record, even after a fresh producer."""


class Source(Protocol):
    def poll(self, max_records: int, timeout_ms: int) -> InputBatch: ...
    def assigned(self) -> set[Partition]: ...
    def commit(self, offsets: dict[Partition, int]) -> bool: ...
    def lag(self) -> int | None: ...
    def close(self) -> None: ...


class Sink(Protocol):
    def send(self, records: list[OutputRecord]) -> None: ...
    def flush(self) -> None: ...
    def send_all(self, records: list[OutputRecord]) -> None: ...
    def close(self) -> None: ...


ATTEMPT_S = 10.0  # one delivery attempt at most: short, so that backoff and /readyz stay responsive
BACKOFF_CAP_S = 5.0
FLUSH_GRACE_S = 5.0  # a flush waits this much past an attempt, by when its records have expired


def longest_checkpoint_s(delivery_timeout_s: float) -> float:
    """The longest a checkpoint blocks while riding out an outage: two deliveries (the outputs, then the
    checkpoint record itself on the state topic), each up to `delivery_timeout_s` plus its last attempt."""
    return 2 * (delivery_timeout_s + min(ATTEMPT_S, delivery_timeout_s) + FLUSH_GRACE_S)


def max_poll_interval_ms(settings: ConsumerSettings) -> int:
    """The consumers' max poll interval: a checkpoint does not poll, so the group must keep a member for the
    longest checkpoint plus a margin for one batch (Kafka's default, 300 s, equals the default
    delivery_timeout_s: a long outage would get the consumer evicted from its group mid ride-out)."""
    return int(1000 * max(300.0, longest_checkpoint_s(settings.delivery_timeout_s) + 60.0))


class _ResendingSink:
    """Keeps every record sent since the last successful flush, to send again on a fresh producer.

    A flush whose records are not all acknowledged within one attempt (`ATTEMPT_S`, the
    producer's own delivery timeout) is retried on a new producer after a capped exponential
    backoff, until `delivery_timeout_s` has passed since the flush began: a broker outage
    shorter than that is ridden out, one warning per attempt. A new producer, not the old one,
    because an idempotent producer that lost its producer id (a restarted broker) never
    recovers on its own.
    """

    _client_errors: tuple[type[BaseException], ...] = ()  # what the client raises when it cannot deliver

    def __init__(self, settings: ConsumerSettings, attempt_s: float = ATTEMPT_S):
        self._settings = settings
        self._limit_s = settings.delivery_timeout_s
        self._attempt_s = min(attempt_s, self._limit_s)
        self._pending: list[OutputRecord] = []
        self._failure: BaseException | None = None  # why the current producer cannot deliver, if it cannot
        self._producer = None
        with silent_client():
            try:  # the first producer: no broker answering within connect_timeout_s is said in one line
                self._producer = self._new_producer(self._attempt_s, bootstrap_s=settings.connect_timeout_s)
            except self._client_errors as error:
                raise BrokerUnreachable.of(settings, error) from None

    def send(self, records: list[OutputRecord]) -> None:
        self._pending.extend(records)
        if self._failure is None:  # else the next flush sends every pending record on a new producer
            try:
                self._produce(records)
            except self._client_errors as error:
                self._failed(error)

    def send_all(self, records: list[OutputRecord]) -> None:
        self.send(records)
        self.flush()

    def flush(self) -> None:
        """Return once every pending record is acknowledged; raise `DeliveryFailed` (one line) when
        that has not happened within `delivery_timeout_s`."""
        deadline = time.monotonic() + self._limit_s
        attempt = 1
        while True:
            failure = (len(self._pending), self._failure) if self._failure is not None else self._wait()
            if failure is None:
                self._pending.clear()
                return
            if rejected_for_good(failure[1]):  # reported back by the broker: no retry can send it either
                raise DeliveryFailed(f"an output record cannot be sent: {_one_line(failure[1])}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeliveryFailed(
                    f"{len(self._pending)} output records not acknowledged within delivery_timeout_s="
                    f"{self._limit_s:g} s ({attempt} attempt{'s' if attempt > 1 else ''}); last error: "
                    f"{_one_line(failure[1])}"
                )
            pause = min(BACKOFF_CAP_S, 0.5 * 2**attempt, left)
            logger.warning(
                "%d of %d output records not acknowledged (attempt %d, %.0f s left of %g): %s; "
                "resending on a new producer in %.1f s",
                failure[0],
                len(self._pending),
                attempt,
                left,
                self._limit_s,
                _one_line(failure[1]),
                pause,
            )
            self._discard_producer()
            time.sleep(pause)  # back off while the broker comes back
            attempt += 1
            self._failure = None
            try:
                self._producer = self._new_producer(min(self._attempt_s, max(1.0, deadline - time.monotonic())))
                self._produce(self._pending)
            except self._client_errors as error:  # e.g. the broker is still unreachable
                self._failed(error)

    def close(self) -> None:
        """Close the producer with a short wait; after a failed delivery, say so and raise nothing."""
        if self._producer is None:
            return
        try:
            unsent = self._close_producer(5.0)
        except self._client_errors as error:
            unsent, reason = len(self._pending), _one_line(error)
        else:
            reason = "not acknowledged when the producer closed"
        if unsent:
            logger.warning("%d output records dropped at close: %s", unsent, reason)
        self._producer = None

    def _failed(self, error: BaseException) -> None:
        if rejected_for_good(error):  # no retry can send this record
            raise DeliveryFailed(f"an output record cannot be sent: {_one_line(error)}") from None
        self._failure = error

    def _discard_producer(self) -> None:
        if self._producer is None:
            return
        try:
            self._close_producer(0.5)
        except self._client_errors as error:
            logger.debug("closing a failed producer: %s", error)
        self._producer = None


def _one_line(error: object, limit: int = 300) -> str:
    """An error for a log line: on one line, cut to `limit` characters."""
    return shorten(" ".join(str(error).split()) or type(error).__name__, limit)


# Kafka protocol error codes (the same numbers in kafka-python's `errno` and confluent's `code()`) for what the
# broker refuses for good: the record or batch is too large for the topic's max.message.bytes (10, 18),
# the topic name is invalid (17), the record fails validation (87), or the producer may not write (29, 31).
# Retrying them only delays the same answer until delivery_timeout_s.
REJECTED_FOR_GOOD = frozenset({10, 17, 18, 29, 31, 87})


def rejected_for_good(error: object) -> bool:
    """Whether a client's error (raised at send, or reported in a future or a delivery callback) says no
    retry can deliver the record; outage errors (timeouts, transport, leaders moving) are not."""
    if error is not None and type(error).__name__ == "KafkaException" and getattr(error, "args", None):
        error = error.args[0]  # confluent's exception wraps its KafkaError
    code = getattr(error, "code", None)
    if callable(code):  # confluent_kafka.KafkaError
        return code() in REJECTED_FOR_GOOD
    errno = getattr(type(error), "errno", None)  # kafka-python's error classes
    return isinstance(error, Exception) and errno in REJECTED_FOR_GOOD


def _worst(failures: list) -> object:
    """The failure to act on: one no retry can cure if there is one, else the first."""
    return next((error for error in failures if rejected_for_good(error)), failures[0])


StartOffsets = Callable[[list[Partition]], dict[Partition, int]]
Revoked = Callable[[list[Partition]], None]


def make_source(settings: ConsumerSettings, start_offsets: StartOffsets, revoked: Revoked | None = None) -> Source:
    """A group consumer of the input topic. On assignment, `start_offsets` says where to resume each
    partition (others resume from the group's committed offset); `revoked` is told of partitions
    taken away. Both run inside `poll`, and only keep books."""
    if settings.client == "confluent":
        return ConfluentSource(settings, start_offsets, revoked)
    return KafkaPythonSource(settings, start_offsets, revoked)


def consumer_config(settings: ConsumerSettings, client: str | None = None) -> dict:
    """The group consumer's options, in the names of `client` (default: the one `settings.client` selects)."""
    if (client or settings.client) == "confluent":
        return {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": settings.session_timeout_ms,
            "heartbeat.interval.ms": settings.heartbeat_interval_ms,
            "max.poll.interval.ms": max_poll_interval_ms(settings),
            "fetch.wait.max.ms": settings.fetch_max_wait_ms,
            "client.id": f"streamem-{settings.instance_id}",
            **confluent_security(settings),
        }
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "group_id": settings.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": max_poll_interval_ms(settings),
        "max_poll_records": settings.max_poll_records,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "reconnect_backoff_max_ms": 1000,
        "client_id": f"streamem-{settings.instance_id}",
        **kafka_python_security(settings),
    }


def make_sink(settings: ConsumerSettings) -> Sink:
    if settings.client == "confluent":
        return ConfluentSink(settings)
    return KafkaPythonSink(settings)


@dataclasses.dataclass(frozen=True)
class InputPositions:
    """The input topic as the broker and the group see it at start-up (partition -> offsets)."""

    topic: str
    ranges: dict[int, tuple[int, int]]  # [first offset, end offset) of each partition
    committed: dict[int, int]  # the group's committed offset, for the partitions that have one


def input_positions(settings: ConsumerSettings) -> InputPositions:
    """Look up the input topic's partitions, their offset ranges and the group's committed offsets.

    Blocking: call it at start-up, never from a rebalance callback. Reading committed offsets
    with a manual assignment does not join the group. (Always through kafka-python: one short
    look-up, whichever client consumes.) Raises `BrokerUnreachable` (one line) when the broker
    does not answer within `connect_timeout_s`.
    """
    from kafka.errors import KafkaError

    with silent_client():
        try:
            return _input_positions(settings, settings.connect_timeout_s)
        except (KafkaError, TimeoutError) as error:
            raise BrokerUnreachable.of(settings, error) from None


def _input_positions(settings: ConsumerSettings, timeout_s: float) -> InputPositions:
    from kafka import KafkaConsumer, TopicPartition

    topic = settings.input_topic
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.group_id,
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
        **connect_timeout_options(KafkaConsumer, settings),
        **kafka_python_security(settings),
    )
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        committed = {}
        for tp in partitions:
            offset = consumer.committed(tp)
            if offset is not None:
                committed[tp.partition] = offset
        if not partitions:
            return InputPositions(topic, {}, committed)
        consumer.assign(partitions)
        firsts = consumer.beginning_offsets(partitions)
        # Tansu answers ListOffsets "latest" with the last batch's base offset + 1, not the end: fetch
        # from there and take the end from the fetch's high watermark (on Kafka both are the end).
        for tp, offset in consumer.end_offsets(partitions).items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while any(consumer.highwater(tp) is None for tp in partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read the end offsets of {topic!r} within {timeout_s}s")
            consumer.poll(timeout_ms=100)
        ranges = {tp.partition: (firsts[tp], consumer.highwater(tp)) for tp in partitions}
        return InputPositions(topic, ranges, committed)
    finally:
        consumer.close(autocommit=False)


# -- kafka-python -----------------------------------------------------------------------------
class KafkaPythonSource:
    def __init__(self, settings: ConsumerSettings, start_offsets: StartOffsets, revoked: Revoked | None = None):
        from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition

        self._TopicPartition = TopicPartition
        self._topic = settings.input_topic
        self._consumer = KafkaConsumer(**consumer_config(settings, "kafka-python"))
        consumer = self._consumer

        class Resume(ConsumerRebalanceListener):
            def on_partitions_revoked(self, lost):
                partitions = sorted((tp.topic, tp.partition) for tp in lost)
                logger.info("partitions revoked: %s", partitions)
                if revoked is not None and partitions:
                    revoked(partitions)

            def on_partitions_assigned(self, assigned):
                partitions = [(tp.topic, tp.partition) for tp in assigned]
                for (topic, partition), offset in start_offsets(partitions).items():
                    consumer.seek(TopicPartition(topic, partition), offset)
                logger.info("partitions assigned: %s", sorted(partitions))

        self._consumer.subscribe([settings.input_topic], listener=Resume())

    def assigned(self) -> set[Partition]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def poll(self, max_records: int, timeout_ms: int) -> InputBatch:
        """Up to `max_records` records, as soon as there are any (waiting up to `timeout_ms` for the first)."""
        batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        partitions: list[int] = []
        offsets: list[int] = []
        keys: list = []
        values: list = []
        for tp, messages in batches.items():
            partitions += itertools.repeat(tp.partition, len(messages))
            offsets += map(_offset, messages)
            keys += map(_key, messages)
            values += map(_value, messages)
        return InputBatch(self._topic, partitions, offsets, keys, values)

    def commit(self, offsets: dict[Partition, int]) -> bool:
        """Commit; False when the group is rebalancing (the offsets are then committed later, or by
        the partition's next owner, which re-answers from the previous commit)."""
        from kafka import OffsetAndMetadata
        from kafka.errors import CommitFailedError, RebalanceInProgressError

        try:
            self._consumer.commit(
                {self._TopicPartition(*tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
            )
        except (CommitFailedError, RebalanceInProgressError) as error:
            logger.info("commit deferred: %s", error)
            return False
        return True

    def lag(self) -> int | None:
        """Records behind the high watermark over assigned partitions (Tansu's end_offsets is wrong, so
        the fetch high watermark is used)."""
        total = 0
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                return None
            total += max(0, high - self._consumer.position(tp))
        return total

    def close(self) -> None:
        self._consumer.close(autocommit=False)


class KafkaPythonSink(_ResendingSink):
    @property
    def _client_errors(self):
        from kafka.errors import KafkaError

        return (KafkaError,)

    def _new_producer(self, timeout_s: float, bootstrap_s: float | None = None):
        from kafka import KafkaProducer

        self._futures: list = []
        milliseconds = int(timeout_s * 1000)
        return KafkaProducer(
            bootstrap_servers=self._settings.bootstrap_servers,
            acks="all",
            linger_ms=5,
            batch_size=256 * 1024,
            reconnect_backoff_max_ms=1000,
            # one attempt: unacknowledged records expire (their futures fail) instead of waiting 2 minutes
            delivery_timeout_ms=milliseconds,
            request_timeout_ms=min(30_000, max(1000, milliseconds - 500)),
            max_block_ms=milliseconds,  # a send waiting for metadata or buffer space
            bootstrap_timeout_ms=int((bootstrap_s or timeout_s) * 1000),  # a new producer while the broker is away
            client_id=f"streamem-{self._settings.instance_id}",
            **kafka_python_security(self._settings),
        )

    def _produce(self, records: list[OutputRecord]) -> None:
        send = self._producer.send
        self._futures.extend(send(r.topic, key=r.key, value=r.value) for r in records)

    def _wait(self) -> tuple[int, object] | None:
        try:
            self._producer.flush(timeout=self._attempt_s + FLUSH_GRACE_S)  # the records expire before this
        except self._client_errors as error:
            self._futures = []
            return len(self._pending), error
        failures = [f.exception for f in self._futures if not f.succeeded()]
        self._futures = []
        return (len(failures), _worst(failures)) if failures else None

    def _close_producer(self, timeout_s: float) -> int:
        unsent = sum(not f.is_done for f in self._futures)
        try:
            self._producer.close(timeout=timeout_s)
        except self._client_errors:
            # close() flushes first and raises on a timeout before it reaches its own force-close step:
            # its I/O thread would live on, and its __del__ raise again (a traceback on stderr)
            sender = getattr(self._producer, "_sender", None)
            if sender is not None:
                sender.force_close()
            raise
        return unsent


# -- confluent-kafka --------------------------------------------------------------------------
class ConfluentSource:
    def __init__(self, settings: ConsumerSettings, start_offsets: StartOffsets, revoked: Revoked | None = None):
        from confluent_kafka import Consumer, TopicPartition

        self._TopicPartition = TopicPartition
        self._topic = settings.input_topic
        self._consumer = Consumer(consumer_config(settings, "confluent"))

        def on_assign(consumer, assigned):
            partitions = [(tp.topic, tp.partition) for tp in assigned]
            offsets = start_offsets(partitions)
            for tp in assigned:
                if (tp.topic, tp.partition) in offsets:
                    tp.offset = offsets[(tp.topic, tp.partition)]
            consumer.assign(assigned)
            logger.info("partitions assigned: %s", sorted(partitions))

        def on_revoke(consumer, lost):
            partitions = sorted((tp.topic, tp.partition) for tp in lost)
            logger.info("partitions revoked: %s", partitions)
            if revoked is not None and partitions:
                revoked(partitions)

        self._consumer.subscribe([settings.input_topic], on_assign=on_assign, on_revoke=on_revoke)

    def assigned(self) -> set[Partition]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def poll(self, max_records: int, timeout_ms: int) -> InputBatch:
        """Up to `max_records` records, as soon as there are any (waiting up to `timeout_ms` for the first).

        `consume(n, timeout)` alone waits until it has n records or the timeout has passed: on a quiet
        topic every record waited out the whole poll timeout (p99 latency +0.4 s at 1,000 records/s).
        So: what is fetched already; if nothing, wait for one record, then take what came with it.
        """
        from confluent_kafka import Message

        consume = self._consumer.consume
        messages = consume(max_records, 0)
        if not messages and timeout_ms > 0:
            messages = consume(1, timeout_ms / 1000)
            if messages and max_records > 1:
                messages += consume(max_records - 1, 0)
        if any(map(Message.error, messages)):
            for message in messages:
                if message.error():
                    logger.warning("consume error: %s", message.error())
            messages = [message for message in messages if not message.error()]
        return InputBatch(
            self._topic,
            list(map(Message.partition, messages)),
            list(map(Message.offset, messages)),
            list(map(Message.key, messages)),
            list(map(Message.value, messages)),
        )

    def commit(self, offsets: dict[Partition, int]) -> bool:
        from confluent_kafka import KafkaException

        try:
            self._consumer.commit(
                offsets=[self._TopicPartition(t, p, offset) for (t, p), offset in offsets.items()], asynchronous=False
            )
        except KafkaException as error:  # e.g. REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION
            logger.info("commit deferred: %s", error)
            return False
        return True

    def lag(self) -> int | None:
        total = 0
        for tp in self._consumer.assignment():
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            position = self._consumer.position([tp])[0].offset
            if high < 0 or position < 0:
                return None
            total += max(0, high - position)
        return total

    def close(self) -> None:
        self._consumer.close()


class ConfluentSink(_ResendingSink):
    @property
    def _client_errors(self):
        from confluent_kafka import KafkaException

        return (KafkaException,)

    def _new_producer(self, timeout_s: float, bootstrap_s: float | None = None):
        from confluent_kafka import Producer

        self._failures: list = []
        return Producer(
            {
                "bootstrap.servers": self._settings.bootstrap_servers,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                # A report only for a record that failed: a Python call per delivered record cost 0.5 us or so
                "delivery.report.only.error": True,
                "on_delivery": self._report,
                # one attempt: unacknowledged records fail with _MSG_TIMED_OUT instead of after 5 minutes
                "message.timeout.ms": int(timeout_s * 1000),
                "logger": logging.getLogger("confluent_kafka.producer"),  # not straight to stderr: throttled
                "client.id": f"streamem-{self._settings.instance_id}",
                **confluent_security(self._settings),
            }
        )

    def _report(self, error, _message) -> None:
        if error is not None:
            self._failures.append(error)

    def _produce(self, records: list[OutputRecord]) -> None:
        if not records:
            return
        topics, keys, values = zip(*records)
        start = 0
        while True:
            remaining = iter(topics[start:])
            try:  # the loop runs in C (deque over map): no Python call per record
                collections.deque(map(self._producer.produce, remaining, values[start:], keys[start:]), maxlen=0)
                return
            except BufferError:  # local queue full: serve delivery reports to drain it, then go on from that record
                start = len(records) - operator.length_hint(remaining) - 1
                self._producer.poll(0.05)

    def _wait(self) -> tuple[int, object] | None:
        remaining = self._producer.flush(self._attempt_s + FLUSH_GRACE_S)  # the records time out before this
        failures, self._failures = self._failures, []
        if failures or remaining:
            return len(failures) + remaining, _worst(failures) if failures else "flush timed out"
        return None

    def _close_producer(self, timeout_s: float) -> int:
        unsent = self._producer.flush(timeout_s)
        if unsent:
            self._producer.purge()
            self._producer.poll(0)
        return unsent

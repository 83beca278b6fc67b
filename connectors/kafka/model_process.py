"""The consume loop's handle on its `Answerer`, which runs in a child process by default.

Why a child: kafka-python is Python code, so in one process polling, producing and
the model's work take turns under one interpreter lock. With the answerer (the
model and the producer of its answers) in a child, the loop polls batch N+2 while
the child answers, learns and sends batch N, on a second core, with batch N+1
already handed over (so the child never waits for the loop between two batches).
The child builds each checkpoint's documents; the loop's process stores them, while
the child answers the batches polled after the checkpoint.

`AnswererHandle` offers the same calls either way (`--no-model-process` keeps the
answerer in this process). Calls that only keep books (the rebalance callbacks,
the offsets learned through) are answered here, from the same books the learner
keeps, and forwarded with the next request, so a rebalance callback never waits
for the model and the learner sees every call in the order the loop made it. The
child ignores SIGINT and SIGTERM: the loop decides when to stop (after its last
checkpoint), and the child exits when the loop closes it or dies (its end of the
pipe closes); on Linux also while it is blocked, e.g. retrying a delivery to a broker
that is down (`_die_with`).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import logging.handlers
import multiprocessing
import os
import select
import signal
import sys
import threading
import traceback

from streamem_connectors.kafka.answerer import Answerer, Report
from streamem_connectors.kafka.checkpoint import CheckpointError, make_store
from streamem_connectors.kafka.clients import DeliveryFailed, make_sink
from streamem_connectors.kafka.learner import Counters, OffsetBook, Partition
from streamem_connectors.kafka.records import InputBatch, RecordDecoder
from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.topics import BrokerUnreachable

__all__ = ["AnswererHandle", "LearnerFailed", "spare_the_collector"]


def _context():
    """A fork server where there is one (Linux, macOS): it forks each child from a clean process
    that has the model code imported already, so a child starts in milliseconds and nothing of
    the consumer's threads (the Kafka clients') is copied into it. Elsewhere, spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["streamem_connectors.kafka.answerer"])  # no effect once the server runs
    return context


class LearnerFailed(RuntimeError):
    """The model process raised an error or died; the consumer stops without committing past it."""


class AnswererHandle:
    """Hands batches to an `Answerer` (in a child process, or in this one) and keeps the offset books."""

    def __init__(self, settings: ConsumerSettings, in_child: bool = True):
        self._transport = _Child(settings) if in_child else _InProcess(settings)
        offsets, counters, forget_lost = self._transport.ready()
        self._book = OffsetBook(offsets, forget_lost)  # kept here as the learner keeps its own
        self.counters = Counters(**counters)
        self._deferred: list[tuple[str, tuple]] = []
        self._books_lock = threading.Lock()  # rebalance callbacks may run on the client's IO thread
        self._decoder = RecordDecoder(settings.features, settings.target, settings.model_key)
        # Checkpoints are stored from here, while the model process answers the next batches (with one
        # model per key, sending their documents took a sixth of that process's time).
        try:
            self._sink = None if settings.checkpoint_dir is not None else make_sink(settings)
            self._store = make_store(settings, self._sink)
        except BaseException:
            self._transport.close()
            raise

    # -- answered here, forwarded with the next request ------------------------------------
    def revoked(self, partitions: list[Partition]) -> None:
        with self._books_lock:
            self._book.revoked(partitions)
            self._deferred.append(("revoked", (partitions,)))

    def start_offsets(self, assigned: list[Partition]) -> dict[Partition, int]:
        """Where to resume each assigned partition, by the same book the learner keeps."""
        with self._books_lock:
            self._deferred.append(("start_offsets", (assigned,)))
            return self._book.resume(assigned)[0]

    def advance(self, offsets: dict[Partition, int]) -> None:
        """The batch just submitted is learned through these offsets once it is answered."""
        with self._books_lock:
            self._book.advance(offsets)
            self._deferred.append(("advance", (offsets,)))

    # -- requests ------------------------------------------------------------------------------
    def decoded(self, batch: InputBatch) -> InputBatch:
        """The batch with its values decoded: the loop decodes a batch while the model process still
        answers the one before (decoding was a fifth of that process's work)."""
        return batch.decoded_by(self._decoder)

    def submit(self, batch: InputBatch) -> None:
        """Start answering, learning and sending `batch` (decoded by `decoded`, or by the learner if not);
        `collect` waits for it."""
        self._request("process", batch)

    def collect(self) -> Report:
        report = self._transport.receive()
        for name, value in report.counters.items():  # in place: the loop holds on to this object
            setattr(self.counters, name, value)
        return report

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint of the batches submitted so far: once they are answered, every answer
        acknowledged, then the checkpoint's documents built (batches submitted after this are not in
        it). Collect those batches, then take the documents with `checkpoint_documents`."""
        self._request("checkpoint_entries")

    def checkpoint_documents(self) -> list[tuple[str, bytes]]:
        """The documents of the checkpoint asked for (`DeliveryFailed` if its answers were not all
        acknowledged). Taken before the next batch is submitted: the two are the large messages
        between the processes, and each side would otherwise wait for the other to read."""
        return self._transport.receive()

    def store(self, documents: list[tuple[str, bytes]]) -> None:
        """Store a checkpoint's documents (from this process, while the model process answers on);
        `DeliveryFailed` if they cannot be (the state topic's outage outlasts delivery_timeout_s, or the
        checkpoint directory cannot be written)."""
        try:
            self._store.save_all(documents)
        except OSError as error:  # e.g. a full disk: one line, as an undelivered checkpoint record
            raise DeliveryFailed(f"the checkpoint could not be stored: {error}") from None

    def idle(self) -> None:
        self._call("idle")

    def finish(self) -> None:
        self._call("finish")

    def close(self) -> None:
        try:
            self._transport.close()
        finally:
            if self._sink is not None:
                self._sink.close()

    def _call(self, name: str) -> None:
        self._request(name)
        self._transport.receive()

    def _request(self, name: str, *args) -> None:
        with self._books_lock:
            calls, self._deferred = [*self._deferred, (name, args)], []
        self._transport.send(calls)


def _run(answerer: Answerer, calls: list[tuple[str, tuple]]):
    result = None
    for name, args in calls:
        result = getattr(answerer, name)(*args)
    return result


def _books(answerer: Answerer) -> tuple:
    learner = answerer.learner
    return dict(learner.offsets), dataclasses.asdict(learner.counters), learner.book.forget_lost


class _InProcess:
    """The answerer in this process: a request runs at once, its result waits for `receive`."""

    def __init__(self, settings: ConsumerSettings):
        self.answerer = Answerer(settings)
        self.results: collections.deque = collections.deque()

    def ready(self) -> tuple:
        return _books(self.answerer)

    def send(self, calls) -> None:
        self.results.append(_run(self.answerer, calls))

    def receive(self):
        return self.results.popleft()

    def close(self) -> None:
        self.answerer.close()


class _Child:
    """The answerer in a child process, over a pipe; its log records come back over another."""

    def __init__(self, settings: ConsumerSettings):
        context = _context()
        self._connection, child = context.Pipe()
        self._logs, child_logs = context.Pipe(duplex=False)
        self._log_thread = threading.Thread(
            target=_relay_logs, args=(self._logs,), name="streamem-model-logs", daemon=True
        )
        self._log_thread.start()
        level = logging.getLogger("streamem_connectors").getEffectiveLevel()
        self._process = context.Process(
            target=_serve, args=(settings, child, child_logs, level, os.getpid()), name="streamem-model", daemon=True
        )
        self._process.start()
        child.close()
        child_logs.close()
        self._waiting = 1  # requests sent and not answered yet (the first: its start)

    def ready(self) -> tuple:
        try:
            return self.receive()
        except BaseException:
            self.close()
            raise

    def send(self, calls) -> None:
        try:
            self._connection.send(calls)
        except (BrokenPipeError, OSError):
            raise self._died() from None
        self._waiting += 1

    def receive(self):
        try:
            status, value = self._connection.recv()
        except (EOFError, OSError):
            raise self._died() from None
        self._waiting -= 1
        if status == "error":
            raise LearnerFailed(f"the model process failed:\n{value}")
        if status == "refused":  # a checkpoint it may not resume from: its message says why
            raise CheckpointError(value)
        if status == "unreachable":  # no broker answered at start: one line, as ensure_topics says it
            raise BrokerUnreachable(value)
        if status == "undelivered":  # outputs the broker did not take in time: one line, no traceback
            raise DeliveryFailed(value)
        return value

    def close(self) -> None:
        """Stop the child; it closes its Kafka clients first. (Mid-request, after an error, closing
        the pipe is what stops it: its next read or write fails; after a failed request it stops by
        itself.)"""
        try:
            if not self._waiting:
                self._connection.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._connection.close()
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._log_thread.join(timeout=10)  # ends when the child's end of the log pipe closes
        self._logs.close()

    def _died(self) -> LearnerFailed:
        self._process.join(timeout=5)
        return LearnerFailed(f"the model process exited (exit code {self._process.exitcode})")


def _relay_logs(logs) -> None:
    while True:
        try:
            record = logs.recv()
        except (EOFError, OSError):
            return
        logging.getLogger(record.name).handle(record)


class _PipeHandler(logging.handlers.QueueHandler):
    """Sends each record (formatted, picklable) through a pipe instead of a queue: no locks to leak."""

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.send(record)
        except OSError:  # the consumer is gone (e.g. kill -9): say it on the stderr we share, in one line
            print(f"streamem model process: {record.levelname} {record.getMessage()}", file=sys.stderr)


def _pipe_handler(logs, level: int) -> _PipeHandler:
    """The model process's log handler: its records cross the pipe formatted, tracebacks included, so
    the Kafka clients' lines are throttled here as in the consumer's own process (a client's traceback,
    a socket reset while the broker goes away, as one line unless at DEBUG)."""
    from streamem_connectors.kafka.observability import ClientLogThrottle

    handler = _PipeHandler(logs)
    handler.addFilter(ClientLogThrottle(tracebacks=level <= logging.DEBUG))
    return handler


def _reply(connection, reply: tuple) -> bool:
    """Send `reply`; False when the consumer is gone (e.g. stopped by a signal while this process
    started): then this process just exits, without a traceback."""
    try:
        connection.send(reply)
    except (BrokenPipeError, OSError):
        return False
    return True


def _die_with(consumer: int) -> None:
    """End this process as soon as the consumer (pid `consumer`) is gone, even while it is blocked, e.g.
    retrying a delivery to a broker that is down: an orphan would retry its outputs for up to
    --delivery-timeout-s and could deliver them after its replacement started. (Linux: a thread waits
    on a pidfd of the consumer; its pipe closing is the rule elsewhere.)"""
    try:
        watcher = os.pidfd_open(consumer)
    except ProcessLookupError:  # gone already
        os._exit(1)
    except (AttributeError, OSError):
        return

    def watch() -> None:
        select.select([watcher], [], [])
        os._exit(1)  # as a kill -9 of the whole consumer: the restart resumes from the last checkpoint

    threading.Thread(target=watch, name="streamem-consumer-watch", daemon=True).start()


def spare_the_collector() -> None:
    """The model process's collector settings, from the moment its long-lived objects exist."""
    # Everything alive now (modules, the model, the clients) lives as long as the process: spare
    # the collector from walking it again on every full collection (a fifth of the model's time).
    gc.freeze()
    # And collect the youngest objects every 10,000 net allocations, not 700: nearly every object a
    # batch makes is freed by its reference count anyway, and each collection that reaches the oldest
    # generation walks every live object, which with one model per key is hundreds of thousands
    # (2.2 s of a 14 s keyed run went to the collector; 0.35 s at this threshold).
    gc.set_threshold(10_000, 10, 10)


def _serve(settings: ConsumerSettings, connection, logs, level: int, consumer: int) -> None:
    """The child: build the answerer, then run the calls it is sent until told to stop."""
    _die_with(consumer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    root = logging.getLogger()
    root.handlers[:] = [_pipe_handler(logs, level)]
    root.setLevel(level)
    from streamem_connectors.kafka.observability import quiet_client_loggers

    quiet_client_loggers(level)  # as in the main process: the Kafka client's chatter only at DEBUG
    try:
        answerer = Answerer(settings)
    except CheckpointError as error:
        _reply(connection, ("refused", str(error)))
        return
    except BrokerUnreachable as error:
        _reply(connection, ("unreachable", str(error)))
        return
    except Exception:
        _reply(connection, ("error", traceback.format_exc()))
        return
    if not _reply(connection, ("ok", _books(answerer))):
        answerer.close()
        return
    spare_the_collector()
    try:
        while True:
            try:
                calls = connection.recv()
            except (EOFError, OSError):  # the consumer is gone
                return
            if calls is None:
                return
            try:
                reply = ("ok", _run(answerer, calls))
            except CheckpointError as error:
                reply = ("refused", str(error))
            except DeliveryFailed as error:
                reply = ("undelivered", str(error))
            except Exception:
                reply = ("error", traceback.format_exc())
            try:
                connection.send(reply)
            except (BrokenPipeError, OSError):  # the consumer is gone
                return
            if reply[0] != "ok":  # the consumer stops on it: a request already sent after it is not run
                return
    finally:
        answerer.close()

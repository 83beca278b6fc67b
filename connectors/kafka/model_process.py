"""The learner in a process of its own, so the model works while the consumer does Kafka I/O.

Why: in one process, the model's work (decoding, scoring, learning, encoding answers)
and the Kafka client's Python code (kafka-python sends and fetches in Python) take
turns under one interpreter lock, so every microsecond of model work is a
microsecond less of Kafka work. In a child process the model answers batch N+1
while the consumer sends the answers to batch N, on a second core.

`LearnerProcess` stands in for a learner (`connectors.kafka.learners`): the loop
`submit`s a batch, does its Kafka work, then `collect`s the answers. Calls that only
keep books (the rebalance callbacks, the offsets learned through) are answered
here, from the same books the learner keeps, and forwarded with the next request,
so a rebalance callback never waits for the model. The child ignores SIGINT and
SIGTERM: the consumer decides when it stops (after its last checkpoint), and the
child exits when the consumer closes it or dies (its end of the pipe closes).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import logging.handlers
import multiprocessing
import signal
import threading
import traceback

from connectors.kafka.learners import Counters, Partition
from connectors.kafka.records import InputRecord, OutputRecord
from connectors.kafka.settings import ConsumerSettings

__all__ = ["LearnerFailed", "LearnerProcess"]

logger = logging.getLogger(__name__)

# A fork server forks each child from a clean process that has the model code imported
# already: starting a child takes milliseconds, and nothing of the consumer's threads
# (the Kafka clients') is copied into it.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["connectors.kafka.learners"])


class LearnerFailed(RuntimeError):
    """The model process raised an error or died; the consumer stops without committing past it."""


class LearnerProcess:
    """A learner (instance, keyed or replicated, as the settings say) running in a child process."""

    def __init__(self, settings: ConsumerSettings):
        self._connection, child = _CONTEXT.Pipe()
        # The child's log records come back here, to this process's handlers and level.
        self._logs, child_logs = _CONTEXT.Pipe(duplex=False)
        self._log_thread = threading.Thread(
            target=_relay_logs, args=(self._logs,), name="streamem-model-logs", daemon=True
        )
        self._log_thread.start()
        level = logging.getLogger("connectors").getEffectiveLevel()
        self._process = _CONTEXT.Process(
            target=_serve, args=(settings, child, child_logs, level), name="streamem-model", daemon=True
        )
        self._process.start()
        child.close()
        child_logs.close()
        self._deferred: list[tuple[str, tuple]] = []
        self._waiting = True
        try:
            offsets, counters, self._forgets_lost = self._receive()
        except BaseException:
            self.close()
            raise
        self.offsets: dict[Partition, int] = offsets
        self.counters = Counters(**counters)
        self._revoked: set[Partition] = set()
        self._weights: list[float] = []

    # -- answered here, forwarded with the next request ------------------------------------
    def revoked(self, partitions: list[Partition]) -> None:
        self._revoked |= set(partitions)
        self._deferred.append(("revoked", (partitions,)))

    def start_offsets(self, assigned: list[Partition]) -> dict[Partition, int]:
        """Where to resume each assigned partition: the rule of the learner in the child."""
        if self._forgets_lost:
            for tp in self._revoked - set(assigned):
                self.offsets.pop(tp, None)
        self._revoked = set()
        self._deferred.append(("start_offsets", (assigned,)))
        return {tp: self.offsets[tp] for tp in assigned if tp in self.offsets}

    def advance(self, offsets: dict[Partition, int]) -> None:
        self.offsets.update(offsets)
        self._deferred.append(("advance", (offsets,)))

    def weights(self) -> list[float]:
        """The weights after the last collected batch."""
        return self._weights

    # -- requests ------------------------------------------------------------------------------
    def submit(self, batch: list[InputRecord]) -> None:
        """Start answering and learning `batch` (sent as columns: a sixth of the pickling cost)."""
        self._send(("process", (tuple(zip(*batch)),)))

    def collect(self) -> list[OutputRecord]:
        """The outputs of the submitted batch, as `learner.process` returns them."""
        (topics, keys, values), counters, self._weights = self._receive()
        for name, value in counters.items():  # in place: the loop holds on to this object
            setattr(self.counters, name, value)
        return list(map(OutputRecord, topics, keys, values))

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        return self._call("checkpoint_entries")

    def idle(self) -> None:
        self._call("idle")

    def finish(self) -> None:
        self._call("finish")

    def close(self) -> None:
        """Stop the child (it closes the learner's own clients first)."""
        try:
            if not self._waiting:
                self._connection.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._connection.close()
        self._log_thread.join(timeout=10)  # ends when the child's end of the log pipe closes
        self._logs.close()

    def _call(self, name: str):
        self._send((name, ()))
        return self._receive()

    def _send(self, request: tuple[str, tuple]) -> None:
        calls, self._deferred = [*self._deferred, request], []
        try:
            self._connection.send(calls)
        except (BrokenPipeError, OSError):
            raise self._died() from None
        self._waiting = True

    def _receive(self):
        try:
            status, value = self._connection.recv()
        except (EOFError, OSError):
            raise self._died() from None
        self._waiting = False
        if status == "error":
            raise LearnerFailed(f"the model process failed:\n{value}")
        return value

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
        self.queue.send(record)


def _serve(settings: ConsumerSettings, connection, logs, level: int) -> None:
    """The child: build the learner, then run the calls it is sent until told to stop."""
    from connectors.kafka.checkpoint import make_store
    from connectors.kafka.learners import make_learner

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    root = logging.getLogger()
    root.handlers[:] = [_PipeHandler(logs)]
    root.setLevel(level)
    try:
        learner = make_learner(settings, make_store(settings, sink=None))  # the consumer stores checkpoints
    except Exception:
        connection.send(("error", traceback.format_exc()))
        return
    connection.send(("ok", (dict(learner.offsets), dataclasses.asdict(learner.counters), learner.forgets_lost)))
    # Everything alive now (modules, the learner) lives as long as the process: spare the
    # collector from walking it again on every full collection (a fifth of the model's time).
    gc.freeze()
    try:
        while True:
            try:
                calls = connection.recv()
            except EOFError:  # the consumer is gone
                return
            if calls is None:
                return
            try:
                result = None
                for name, args in calls:
                    result = _run(learner, name, args)
                connection.send(("ok", result))
            except Exception:
                connection.send(("error", traceback.format_exc()))
    finally:
        learner.close()


def _run(learner, name: str, args: tuple):
    if name == "process":
        outputs = learner.process(list(map(InputRecord, *args[0])))
        columns = ([o.topic for o in outputs], [o.key for o in outputs], [o.value for o in outputs])
        return columns, dataclasses.asdict(learner.counters), learner.weights()
    return getattr(learner, name)(*args)

"""`streamem run` and `produce-demo` as a user runs them: real processes on the embedded broker."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from streamem_connectors.kafka.demo import produce_regimes
from tests.kafka_helpers import TopicCounter, produce, read_all, unique, wait_for


def test_produce_demo_writes_exactly_the_records_asked_for(broker):
    """`produce_regimes(n=1000)` writes 1000 records (+ the malformed ones), not 3 * (1000 // 3)."""
    topic = unique("demo-count")
    changes = produce_regimes(broker.bootstrap_servers, topic, 1000, 3, seed=0)
    assert len(read_all(broker.bootstrap_servers, topic)) == 1003
    assert changes == [334, 667]


class _StderrLines:
    """A process's stderr, read on a thread as it comes, so a test can wait for a line without blocking."""

    def __init__(self, stream):
        self.seen: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, deadline: float) -> None:
        """Until a line containing `text` has come (fails if the stream ends or the deadline passes)."""
        while not any(text in line for line in self.seen):
            line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(self.seen)
            self.seen.append(line)

    def rest(self) -> str:
        """Everything, once the process has exited."""
        while (line := self._queue.get(timeout=10)) is not None:
            self.seen.append(line)
        return "".join(self.seen)


@pytest.mark.parametrize(
    ("signum", "status"),
    [(signal.SIGTERM, 0), (signal.SIGINT, 130)],
)
def test_a_second_signal_ends_without_a_traceback(broker, signum, status):
    """GNU timeout sends SIGTERM to the consumer and again to its process group: the second SIGTERM changes
    nothing (the batch is finished, the summary printed, exit 0). A second Ctrl-C (SIGINT) aborts: exit 130
    and one line saying so. Never a traceback."""
    topic = unique("signals")
    produce(broker.bootstrap_servers, topic, [b'{"a": %d.5}' % (i % 7) for i in range(300)])
    process = subprocess.Popen(
        [sys.executable, "-m", "streamem", "run", "--bootstrap-servers", broker.bootstrap_servers,
         "--input-topic", topic, "--features", "a", "--n-components", "2", "--warmup", "50",
         "--group-id", unique("g"), "--poll-timeout-ms", "20000"],  # a long idle poll: the 2nd signal lands in it
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines = _StderrLines(process.stderr)

    try:
        deadline = time.monotonic() + 60
        lines.wait_for("partitions assigned", deadline)
        answered = TopicCounter(broker.bootstrap_servers, f"{topic}.assignments")
        try:  # every record answered: the consumer now waits in its 20 s idle poll
            wait_for(lambda: answered.count() >= 300, 60, "the 300 assignments")
        finally:
            answered.close()
        os.killpg(process.pid, signum)
        # the second signal once the first has been handled (two signals sent at once are merged into one)
        lines.wait_for("finishing the current batch", deadline)
        os.killpg(process.pid, signum)
        process.wait(timeout=60)  # not communicate(): it would take stderr lines from the reader thread
        out = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = lines.rest()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert process.returncode == status, "".join(line for line in lines.seen if "settings" not in line)
    if signum == signal.SIGTERM:
        assert "SIGTERM again: still finishing the current batch" in stderr  # the second signal did land
        assert re.match(r"records \d+", out), out
    else:
        assert any(line.startswith("streamem run: interrupted: stopped at once") for line in stderr.splitlines())


@pytest.mark.parametrize(
    ("when", "signals", "status"),
    [("settings: ", [signal.SIGTERM], 0), ("created topics", [signal.SIGTERM], 0),
     ("created topics", [signal.SIGINT, signal.SIGINT], 130)],
)  # fmt: skip
def test_a_signal_during_start_up_stops_cleanly(broker, tmp_path, when, signals, status):
    """A signal while the consumer starts (settings read, topics created, model process starting) is the same
    as one later: SIGTERM -> exit 0 and the one-line summary, a second Ctrl-C -> one line and exit 130 (one
    landing after the clean stop finished is ignored: exit 0); never a traceback (nor one from the model
    process, whose parent stopped waiting for it), never death by the signal."""
    topic = unique("startup-signal")
    produce(broker.bootstrap_servers, topic, [b'{"a": 1, "b": 2}'])
    process = subprocess.Popen(
        [sys.executable, "-m", "streamem", "run", "--bootstrap-servers", broker.bootstrap_servers,
         "--input-topic", topic, "--features", "a,b", "--group-id", unique("g"), "--instance-id", topic,
         "--checkpoint-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = _StderrLines(process.stderr)

    try:
        deadline = time.monotonic() + 60
        lines.wait_for(when, deadline)
        process.send_signal(signals[0])
        if len(signals) > 1:
            lines.wait_for("finishing the current batch", deadline)
            process.send_signal(signals[1])
        process.wait(timeout=60)
        out = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = lines.rest()
    assert "Traceback" not in stderr, stderr
    if len(signals) > 1 and process.returncode == 0:
        # the clean stop finished before the second Ctrl-C landed (a loaded machine): it is ignored, not a crash
        status = 0
    assert process.returncode == status, stderr
    if status == 0:
        assert re.match(r"records \d+ .*this run", out), out
    else:
        assert "streamem run: interrupted: stopped at once" in stderr, stderr

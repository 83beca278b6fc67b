"""The Kafka consumer on the embedded broker: every offset answered once, restarts, crashes, groups."""

from __future__ import annotations

import base64
import contextlib
import json
import multiprocessing
import os
import pathlib
import queue
import select
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from streamem_connectors.kafka.checkpoint import Checkpoint, TopicStore
from streamem_connectors.kafka.model_process import LearnerFailed
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import TopicCounter, produce, read_all, unique, wait_for

BAD = {
    b"not json": "not valid JSON",
    b"[1, 2, 3]": "not a JSON object",
    b'{"a": 1.0}': "field 'b' is missing",
    b'{"a": "1.5", "b": 2.0}': "field 'a' is not a number",
    b'{"a": NaN, "b": 2.0}': "not finite",
    b'{"a": 1e400, "b": 2.0}': "not finite",
    b"": "empty message",
    b"\xff\xfe\x00": "not valid JSON",
    b'{"a": true, "b": 2.0}': "field 'a' is not a number",
}


def good_values(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [8.0, 3.0]])
    points = centres[rng.integers(2, size=n)] + rng.normal(size=(n, 2))
    return [json.dumps({"a": a, "b": b, "id": i}).encode() for i, (a, b) in enumerate(points.tolist())]


def make_settings(broker, topic: str, **overrides) -> ConsumerSettings:
    values = dict(
        bootstrap_servers=broker.bootstrap_servers,
        input_topic=topic,
        group_id=f"{topic}-group",
        features=["a", "b"],
        n_components=2,
        warmup=200,
        batch_size=50,
        max_poll_records=300,
        poll_timeout_ms=200,
        log_level="WARNING",
    )
    values.update(overrides)
    return ConsumerSettings(**values)


def stored_checkpoint(settings: ConsumerSettings) -> Checkpoint:
    return Checkpoint.parse(TopicStore(settings, sink=None).load(settings.checkpoint_key))


def _unlearned(settings: ConsumerSettings, total: int) -> int:
    """Records of a `total`-record input after the stored checkpoint's offsets (what a resumed run polls)."""
    raw = TopicStore(settings, sink=None).load(settings.checkpoint_key)
    return total - (sum(o.offset for o in Checkpoint.parse(raw).offsets) if raw else 0)


def outputs(broker, settings):
    topics = settings.topics
    return read_all(broker.bootstrap_servers, topics["assignments"]), read_all(
        broker.bootstrap_servers, topics["dead_letter"]
    )


def offsets_of(records) -> list[tuple[int, int]]:
    return [(r["source"]["partition"], r["source"]["offset"]) for r in records]


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_every_offset_ends_in_one_assignment_or_one_dead_letter(broker, client):
    """Good and every kind of bad record: assignments + dead letters = input, once each, with reasons."""
    topic = unique("accounting")
    settings = make_settings(broker, topic, max_records=1000 + len(BAD), client=client)
    ensure_topics(settings, input_partitions=2)
    values = good_values(1000)
    for position, bad in zip(range(37, 1000, 97), BAD):
        values.insert(position, bad)
    produce(broker.bootstrap_servers, topic, values, keys=[str(i % 5).encode() for i in range(len(values))])

    counters = run_consumer(settings)

    assignments, dead = outputs(broker, settings)
    every = offsets_of(assignments) + offsets_of(dead)
    assert len(every) == len(set(every)) == len(values) == counters.records_in
    assert counters.dead_lettered == len(dead) == len(BAD)
    by_value = {(d["value"], d["encoding"]): d["error"] for d in dead}
    for raw, reason in BAD.items():
        try:
            stored = (raw.decode("utf-8"), "utf-8")
        except UnicodeDecodeError:
            stored = (base64.b64encode(raw).decode(), "base64")  # non-UTF-8 payloads travel as base64
        assert reason in by_value[stored], (raw, by_value[stored])
    first = assignments[0]
    assert set(first) == {"source", "key", "component", "probabilities", "log_likelihood", "n_seen"}
    assert abs(sum(first["probabilities"]) - 1.0) < 1e-9


def test_clean_restart_neither_duplicates_nor_relearns(broker):
    """Runs of 600 then 600 more records (--max-records counts a run's own) answer each offset once and learn each
    once."""
    topic = unique("restart")
    settings = make_settings(broker, topic, max_records=600)
    ensure_topics(settings, input_partitions=2)
    produce(broker.bootstrap_servers, topic, good_values(1200), keys=[str(i % 3).encode() for i in range(1200)])

    first = run_consumer(settings)
    second = run_consumer(settings)

    assert first.records_in >= 600 and second.records_in == 1200
    assignments, dead = outputs(broker, settings)
    every = offsets_of(assignments)
    assert len(every) == len(set(every)) == 1200 and not dead
    assert stored_checkpoint(settings).model["n_seen"] == 1200


def test_checkpoint_directory_option(broker, tmp_path):
    """With --checkpoint-dir the model state is a JSON file that the next run resumes from."""
    topic = unique("dir")
    settings = make_settings(broker, topic, max_records=400, checkpoint_dir=tmp_path)
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, good_values(800))
    run_consumer(settings)
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["model"]["n_seen"] == 400 and saved["offsets"] == [{"topic": topic, "partition": 0, "offset": 400}]
    run_consumer(settings)
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["model"]["n_seen"] == 800


def _start(settings: ConsumerSettings, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "streamem",
        "run",
        "--bootstrap-servers",
        settings.bootstrap_servers,
        "--input-topic",
        settings.input_topic,
        "--group-id",
        settings.group_id,
        "--features",
        "a,b",
        "--n-components",
        "2",
        "--warmup",
        "200",
        "--batch-size",
        "50",
        "--max-poll-records",
        "200",
        "--poll-timeout-ms",
        "200",
        *extra,
    ]
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _lines(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in process.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, generation) of every process descended from `pid` (1: its children, 2: theirs, ...)."""
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    descendants, todo = [], [(pid, 0)]
    while todo:
        parent, generation = todo.pop()
        found = [(child, generation + 1) for child in children.get(parent, [])]
        descendants += found
        todo += found
    return descendants


def _exit_watchers(pid: int) -> list[int]:
    """A pidfd (readable once the process exits) for every process descended from `pid`."""
    watchers = []
    for descendant, _ in _descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            watchers.append(os.pidfd_open(descendant))
    return watchers


def test_kill_9_mid_stream_then_restart_loses_nothing(broker):
    """SIGKILL mid-stream: its model process exits too; a restart answers every input offset, and the model
    learned each record once."""
    topic = unique("crash")
    total = 20_000
    settings = make_settings(broker, topic, max_records=total)
    ensure_topics(settings, input_partitions=2)
    values, keys = good_values(total), [str(i % 4).encode() for i in range(total)]
    first = 5000  # the rest goes in after the kill: the victim cannot finish first, however fast it runs
    produce(broker.bootstrap_servers, topic, values[:first], keys=keys[:first])

    counter = TopicCounter(broker.bootstrap_servers, settings.topics["assignments"])
    victim = _start(settings, "--max-records", str(total), "--checkpoint-every", "1000")
    helpers = []
    try:
        wait_for(lambda: counter.count() >= 3000, 60, "the first process to answer 3,000 records")
        helpers = _exit_watchers(victim.pid)  # the model process and the fork server it came from
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        counter.close()
    assert victim.returncode == -signal.SIGKILL
    assert len(helpers) >= 2
    for watcher in helpers:  # none outlives the consumer: each sees its pipe to the consumer close
        assert select.select([watcher], [], [], 30)[0], "a helper process outlived the killed consumer"
        os.close(watcher)
    last_words = victim.stderr.read()  # the model process shares the consumer's stderr
    assert "Traceback" not in last_words and "Logging error" not in last_words, last_words[-2000:]

    produce(broker.bootstrap_servers, topic, values[first:], keys=keys[first:])
    run_consumer(settings.model_copy(update={"max_records": _unlearned(settings, total)}))  # from the checkpoint

    assignments, _ = outputs(broker, settings)
    answered = set(offsets_of(assignments))
    assert len(answered) == total  # nothing lost
    # only the tail after the last checkpoint is answered twice: up to --checkpoint-every records, the
    # poll batch of 200 that crossed it, and the two batches answered while the checkpoint was stored
    assert len(assignments) - total <= 1000 + 3 * 200
    assert stored_checkpoint(settings).model["n_seen"] == total  # nothing learned twice


def test_a_model_process_blocked_on_a_dead_broker_dies_with_a_killed_consumer():
    """kill -9 of the consumer while its model process waits on a broker that is gone (its last checkpoint
    retrying for --delivery-timeout-s): the model process dies with the consumer, no orphan left retrying."""
    from streamem_connectors.kafka.broker import EmbeddedBroker

    with EmbeddedBroker() as own:  # a broker of its own: this test kills it
        topic = unique("orphan")
        settings = make_settings(own, topic)
        ensure_topics(settings, input_partitions=1)
        produce(own.bootstrap_servers, topic, good_values(500))
        counter = TopicCounter(own.bootstrap_servers, settings.topics["assignments"])
        victim = _start(settings, "--delivery-timeout-s", "120")
        lines = _lines(victim)
        model: list[int] = []
        try:
            wait_for(lambda: counter.count() >= 500, 60, "the consumer to answer its records")
            counter.close()
            model = [pid for pid, generation in _descendants(victim.pid) if generation == 2]  # the fork server's child
            watchers = [os.pidfd_open(pid) for pid in model]
            own.kill()
            victim.send_signal(signal.SIGTERM)  # its last checkpoint now waits on the broker that is gone

            def retrying() -> bool:
                try:
                    return "not acknowledged" in lines.get(timeout=1)
                except queue.Empty:
                    return False

            wait_for(retrying, 60, "the model process to retry its last checkpoint")
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            assert model
            for watcher in watchers:
                assert select.select([watcher], [], [], 30)[0], "the model process outlived the consumer"
                os.close(watcher)
        finally:
            if victim.poll() is None:
                victim.kill()
            for pid in model:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_two_processes_in_a_group_split_the_partitions_and_stop_on_sigterm(broker):
    """Two consumer processes in one group each own one partition; SIGTERM stops each cleanly (exit 0)."""
    topic = unique("group")
    settings = make_settings(broker, topic)
    ensure_topics(settings, input_partitions=2)
    processes = [_start(settings, "--instance-id", str(i)) for i in range(2)]
    logs = [_lines(p) for p in processes]
    try:
        owned: dict[int, str] = {}

        def both_assigned_one_partition():
            for i, lines in enumerate(logs):
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    continue
                if "partitions assigned" in line:
                    owned[i] = line.rsplit(":", 1)[1].strip()
            return len(owned) == 2 and all(text.count("(") == 1 for text in owned.values())

        wait_for(both_assigned_one_partition, 60, "each process to own one partition")
        produce(broker.bootstrap_servers, topic, good_values(2000), keys=[str(i % 6).encode() for i in range(2000)])
        counter = TopicCounter(broker.bootstrap_servers, settings.topics["assignments"])
        wait_for(lambda: counter.count() >= 2000, 60, "all 2,000 records to be answered")
        counter.close()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=60) for process in processes]
    assert codes == [0, 0]
    stored = [stored_checkpoint(settings.model_copy(update={"instance_id": str(i)})) for i in range(2)]
    learned = [{o.partition for o in checkpoint.offsets} for checkpoint in stored]
    assert learned[0] and learned[1] and not (learned[0] & learned[1])
    assert sum(checkpoint.model["n_seen"] for checkpoint in stored) == 2000
    assignments, _ = outputs(broker, settings)
    assert sorted(set(offsets_of(assignments))) == sorted(offsets_of(assignments))


def test_the_model_process_learns_exactly_what_the_model_in_process_learns(broker):
    """Same records through a model process and through the model in the consumer: same answers, same model.

    Each poll is answered before it is learned, so the answers and the drift detector's state depend on
    where polls cut the stream: the records are all there before either run starts (one fetch), and both
    runs poll the same cuts, which the test checks first.
    """
    topic = unique("same")
    values = good_values(900)
    for position, bad in zip(range(50, 900, 83), BAD):
        values.insert(position, bad)
    runs, cuts = {}, {}
    for model_process in (False, True):
        settings = make_settings(
            broker,
            topic,
            group_id=f"{topic}-{model_process}",
            assignments_topic=f"{topic}.assignments-{model_process}",
            dead_letter_topic=f"{topic}.dead-{model_process}",
            state_topic=f"{topic}.state-{model_process}",
            max_records=len(values),
            model_process=model_process,
        )
        if not model_process:
            ensure_topics(settings, input_partitions=1)
            produce(broker.bootstrap_servers, topic, values)
        polled: list[int] = []
        counters = run_consumer(settings, on_batch=lambda progress: polled.append(progress.counters.records_in))  # noqa: B023
        cuts[model_process] = polled
        assignments, dead = outputs(broker, settings)
        runs[model_process] = (counters, assignments, dead, stored_checkpoint(settings))
    assert cuts[False] == cuts[True]
    (c0, a0, d0, s0), (c1, a1, d1, s1) = runs[False], runs[True]
    assert c0 == c1 and c1.dead_lettered == len(BAD)
    assert {a["source"]["offset"]: a["n_seen"] for a in a0} == {a["source"]["offset"]: a["n_seen"] for a in a1}
    reasons = [sorted((d["source"]["offset"], d["error"]) for d in dead) for dead in (d0, d1)]
    assert reasons[0] == reasons[1]
    assert s0.model == s1.model and s0.detector == s1.detector and s0.offsets == s1.offsets


def test_a_dead_model_process_stops_the_consumer_and_a_restart_loses_nothing(broker):
    """kill -9 of the model process: the consumer raises LearnerFailed, commits nothing more; a restart answers all."""
    topic = unique("model-killed")
    settings = make_settings(broker, topic, max_records=1500, checkpoint_every=300)
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, good_values(1500))
    batches = []

    def kill_the_model_after_two_batches(progress):
        batches.append(progress.counters.records_in)
        if len(batches) == 2:
            (model,) = [p for p in multiprocessing.active_children() if p.name == "streamem-model"]
            os.kill(model.pid, signal.SIGKILL)

    with pytest.raises(LearnerFailed, match="exit code -9"):
        run_consumer(settings, on_batch=kill_the_model_after_two_batches)
    assert not [p for p in multiprocessing.active_children() if p.name == "streamem-model"]

    counters = run_consumer(settings.model_copy(update={"max_records": _unlearned(settings, 1500)}))
    assert counters.records_in == 1500
    assignments, _ = outputs(broker, settings)
    assert set(offsets_of(assignments)) == {(0, offset) for offset in range(1500)}
    assert stored_checkpoint(settings).model["n_seen"] == 1500

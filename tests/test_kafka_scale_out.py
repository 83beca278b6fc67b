"""Scale-out over consumer groups: keyed models follow their partitions; a killed consumer is replaced."""

from __future__ import annotations

import json
import queue
import signal

import numpy as np
from kafka import KafkaProducer

from streamem_connectors.kafka.checkpoint import ModelCheckpoint, TopicStore
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import AnsweredOffsets, TopicCounter, read_all, unique, wait_for
from tests.test_kafka_consumer import _lines, _start, good_values, make_settings, offsets_of

KEYS = {"k0": 0, "k1": 0, "k2": 1, "k3": 1}  # model key -> input partition


def produce_keyed(bootstrap: str, topic: str, per_key: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    futures = []
    for i in range(per_key):
        for key, partition in KEYS.items():
            a, b = rng.normal(0 if rng.random() < 0.5 else 6, 1, 2)
            value = json.dumps({"a": a, "b": b, "sensor": key, "i": i}).encode()
            futures.append(producer.send(topic, key=key.encode(), value=value, partition=partition))
    producer.flush()
    producer.close()
    assert all(f.succeeded() for f in futures)


class Assignments:
    """Follows each process's log for its latest 'partitions assigned' line."""

    def __init__(self, processes):
        self.logs = [_lines(p) for p in processes]
        self.latest: dict[int, str] = {}

    def each_owns_one(self) -> bool:
        for i, lines in enumerate(self.logs):
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if "partitions assigned" in line:
                self.latest[i] = line.rsplit(":", 1)[1].strip()
        return len(self.latest) == len(self.logs) and all(text.count("(") == 1 for text in self.latest.values())


def test_keyed_models_survive_a_rebalance_with_their_state(broker):
    """One model per key; when a second consumer takes a partition over, its keys' models continue from
    their checkpoints: every key's model ends having learned each of its records exactly once."""
    topic = unique("keyed")
    settings = make_settings(broker, topic, model_key="sensor", warmup=100, batch_size=20)
    ensure_topics(settings, input_partitions=2)
    common = ("--model-key", "sensor", "--warmup", "100", "--batch-size", "20", "--checkpoint-every", "500")
    first = _start(settings, "--instance-id", "a", *common)
    processes = [first]
    counter = TopicCounter(broker.bootstrap_servers, settings.topics["assignments"])
    try:
        produce_keyed(broker.bootstrap_servers, topic, per_key=500, seed=1)
        wait_for(lambda: counter.count() >= 2000, 60, "the first consumer to answer the first 2,000 records")
        second = _start(settings, "--instance-id", "b", *common)
        processes.append(second)
        assignments = Assignments(processes)
        wait_for(assignments.each_owns_one, 60, "the rebalance to give each consumer one partition")
        produce_keyed(broker.bootstrap_servers, topic, per_key=500, seed=2)
        wait_for(lambda: counter.count() >= 4000, 60, "all 4,000 records to be answered")
    finally:
        counter.close()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=60) for process in processes]
    assert codes == [0, 0]
    answered = read_all(broker.bootstrap_servers, settings.topics["assignments"])
    assert len(set(offsets_of(answered))) == 4000
    assert {a["model_key"] for a in answered} == set(KEYS)
    stored = TopicStore(settings, sink=None).load_prefix(f"{settings.group_id}/model/")
    models = {ModelCheckpoint.parse(raw).model_key: ModelCheckpoint.parse(raw) for raw in stored.values()}
    # a model restarted from scratch after the handover would show 500; one that re-learned, more than 1,000
    assert {key: m.model["n_seen"] for key, m in models.items()} == dict.fromkeys(KEYS, 1000)


def test_a_killed_consumer_hands_its_partitions_over_with_no_offset_missing(broker):
    """Two consumers; kill -9 one mid-stream; the other takes its partition over and every offset is answered."""
    topic = unique("handover")
    total = 12_000
    settings = make_settings(broker, topic)
    ensure_topics(settings, input_partitions=2)
    processes = [_start(settings, "--instance-id", str(i), "--checkpoint-every", "1000") for i in range(2)]
    assignments = Assignments(processes)
    counter = TopicCounter(broker.bootstrap_servers, settings.topics["assignments"])
    try:
        wait_for(assignments.each_owns_one, 60, "each consumer to own one partition")
        from tests.kafka_helpers import produce

        values, keys = good_values(total), [str(i % 7).encode() for i in range(total)]
        first = 4000  # the rest goes in after the kill, so the survivor must take the partition over to answer it
        produce(broker.bootstrap_servers, topic, values[:first], keys=keys[:first])
        wait_for(lambda: counter.count() >= 2000, 60, "the consumers to start answering")
        processes[0].send_signal(signal.SIGKILL)
        processes[0].wait()
        produce(broker.bootstrap_servers, topic, values[first:], keys=keys[first:])
        answered = AnsweredOffsets(broker.bootstrap_servers, settings.topics["assignments"])
        wait_for(lambda: answered.reached(total), 90, "the survivor to answer every offset")
    finally:
        counter.close()
        processes[1].send_signal(signal.SIGTERM)
        assert processes[1].wait(timeout=60) == 0
    assert len(answered.offsets) == total

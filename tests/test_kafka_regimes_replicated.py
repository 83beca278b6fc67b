"""`streamem run --model hmm --replicate`: parameters through the statistics log, filters that follow
their partitions from consumer to consumer."""

from __future__ import annotations

import json
import queue
import signal

import numpy as np
import orjson
import pytest
from kafka import KafkaProducer
from pydantic import ValidationError
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import streamem as se
from streamem_connectors.kafka.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    DirectoryStore,
    TopicStore,
    model_settings,
)
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.records import InputRecord
from streamem_connectors.kafka.regime_replication import ReplicatedRegimeLearner
from streamem_connectors.kafka.replication import StatisticsMessage
from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import AnsweredOffsets, TopicCounter, read_all, unique, wait_for
from tests.test_kafka_consumer import _start, stored_checkpoint
from tests.test_kafka_regimes import hmm_settings, produce_to, regime_stream
from tests.test_kafka_scale_out import Assignments


def replay(messages: list[dict]) -> list[se.OnlineGaussianHMM]:
    """The model after each message of the statistics log, rebuilt with the library from the log alone:
    the first init's model, then every other message's statistics applied in order."""
    first = next(i for i, m in enumerate(messages) if m["kind"] == "init")
    model = se.OnlineGaussianHMM.from_dict(messages[first]["model"])
    versions = [se.OnlineGaussianHMM.from_dict(model.to_dict())]
    for message in messages[first + 1 :]:
        model.apply(se.HMMStats.from_dict(message["statistics"]))
        versions.append(se.OnlineGaussianHMM.from_dict(model.to_dict()))
    return versions


def assert_each_answer_follows_the_last(answers: dict[int, list[dict]], X: np.ndarray, versions) -> list[int]:
    """Every answer after the warm-up is the previous answer moved one step by the filter recursion (scipy's
    densities) under a version of the log's parameters, the versions in order; returns the versions used.
    An offset answered twice (again after a kill) holds two answers: each continues an answer before it."""
    offsets = sorted(answers)
    warm = [t for t in offsets if any(a["log_likelihood"] is not None for a in answers[t])]
    pairs = [(t, i, j) for t in warm[1:] for i, _ in enumerate(answers[t]) for j, _ in enumerate(answers[t - 1])]
    previous = np.array([answers[t - 1][j]["probabilities"] for t, _, j in pairs])
    got = np.array([answers[t][i]["probabilities"] for t, i, _ in pairs])
    rows = X[[t for t, _, _ in pairs]]
    matches = []
    for model in versions:
        log_b = np.column_stack([multivariate_normal(model.means_[k], model.covariances_[k]).logpdf(rows)
                                 for k in range(model.n_states)])
        log_f = np.log(previous @ model.transmat_) + log_b
        expected = np.exp(log_f - logsumexp(log_f, axis=1, keepdims=True))
        matches.append(np.abs(expected - got).max(axis=1) < 1e-8)
    matches = np.array(matches)  # (versions, pairs)
    reached = {(warm[0], i): 0 for i, _ in enumerate(answers[warm[0]])}  # (offset, answer) -> earliest version
    used = []
    for column, (t, i, j) in enumerate(pairs):
        if (t - 1, j) not in reached:
            continue
        later = np.flatnonzero(matches[reached[(t - 1, j)] :, column])
        if later.size:
            version = reached[(t - 1, j)] + int(later[0])
            reached[(t, i)] = min(reached.get((t, i), version), version)
    for t in warm[1:]:
        for i, _ in enumerate(answers[t]):
            assert (t, i) in reached, f"offset {t}: an answer is not the filter step from the last under the log's " \
                                      "parameters"
        used.append(min(reached[(t, i)] for i, _ in enumerate(answers[t])))
    return used


def answers_of(broker, settings: ConsumerSettings, partition: int) -> dict[int, list[dict]]:
    """Each offset's assignments (two for one answered again after a kill)."""
    answers: dict[int, list[dict]] = {}
    for record in read_all(broker.bootstrap_servers, settings.topics["assignments"]):
        if record["source"]["partition"] == partition:
            answers.setdefault(record["source"]["offset"], []).append(record)
    return answers


def statistics_messages(broker, settings: ConsumerSettings) -> list[dict]:
    messages = read_all(broker.bootstrap_servers, settings.topics["statistics"])
    learned: dict[tuple, list] = {}
    for message in messages:
        for source in message["sources"]:
            learned.setdefault((source["topic"], source["partition"]), []).append((source["from"], source["to"]))
    for ranges in learned.values():  # no record learned twice
        ranges.sort()
        assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:])), ranges
    return messages


def test_one_replica_answers_with_the_logs_parameters_and_learns_every_block_once(broker):
    """One replica on one partition: every answer is the filter step from the previous one under the log's
    parameters (applied in order, each within a poll of being published), the regimes are the true ones,
    and the model is the log replayed with the library."""
    total = 3000
    X, states = regime_stream(total, seed=11)
    topic = unique("regimes-replicated")
    settings = hmm_settings(broker, topic, replicate=True, max_records=total, max_poll_records=173)
    ensure_topics(settings, input_partitions=1)
    produce_to(broker.bootstrap_servers, topic, 0, X)
    counters = run_consumer(settings)
    assert counters.assigned == total and counters.dead_lettered == 0
    answers = answers_of(broker, settings, 0)
    assert sorted(answers) == list(range(total)) and all(len(a) == 1 for a in answers.values())
    messages = statistics_messages(broker, settings)
    assert [m["kind"] for m in messages] == ["init"] + ["update"] * (len(messages) - 1)
    assert messages[0]["count"] == 300 and sum(m["count"] for m in messages) == 300 + 64 * ((total - 300) // 64)
    versions = replay(messages)
    used = assert_each_answer_follows_the_last(answers, X, versions)
    assert used[-1] >= len(versions) - 2  # the replica applies what it publishes before its next poll
    likely = np.array([np.argmax(answers[t][0]["probabilities"]) for t in range(300, total)])
    accuracy = max(np.mean(likely == states[300:]), np.mean(likely != states[300:]))
    assert accuracy > 0.95
    replica = stored_checkpoint(settings).replica
    mine = se.OnlineGaussianHMM.from_dict(replica["model"])
    np.testing.assert_allclose(mine.transmat_, versions[-1].transmat_, rtol=1e-12)
    np.testing.assert_allclose(mine.means_, versions[-1].means_, rtol=1e-12)
    assert mine.n_seen == versions[-1].n_seen == sum(m["count"] for m in messages)


def test_a_partition_handed_to_another_instance_keeps_its_filter(broker):
    """Instance a reads two partitions and stops; instance b of the same group reads on: every record is
    answered once and learned at most once, and b's first answer on each partition is the filter step from
    a's last one (b went on from the partition's stored filter), as every other answer is."""
    X0, _ = regime_stream(2000, seed=12)
    X1, _ = regime_stream(2000, seed=13)
    topic = unique("regimes-handover")
    settings = hmm_settings(broker, topic, replicate=True, max_poll_records=150)
    ensure_topics(settings, input_partitions=2)
    produce_to(broker.bootstrap_servers, topic, 0, X0)
    produce_to(broker.bootstrap_servers, topic, 1, X1)
    run_consumer(settings.model_copy(update={"instance_id": "a", "max_records": 2500}))
    store = TopicStore(settings, sink=None)
    stored = store.load_prefix(f"{settings.group_id}/filter/")
    assert sorted(stored) == [f"{settings.group_id}/filter/{topic}/{p}" for p in (0, 1)]
    run_consumer(settings.model_copy(update={"instance_id": "b", "max_records": 1500}))
    messages = statistics_messages(broker, settings)
    versions = replay(messages)
    for partition, X in ((0, X0), (1, X1)):
        answers = answers_of(broker, settings, partition)
        assert sorted(answers) == list(range(2000)) and all(len(a) == 1 for a in answers.values())
        assert_each_answer_follows_the_last(answers, X, versions)
    assert sum(m["count"] for m in messages) > 4000 - 2 * 64  # learned but the two open blocks


def _owns_both(lines: queue.Queue) -> bool:
    """A consumer's log says it was assigned two partitions."""
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            return False
        if "partitions assigned" in line and line.count("(") == 2:
            return True


def test_two_replicas_then_a_kill_9_keep_one_model_and_every_filter(broker):
    """Two replicas, a partition each (b starts from a's init); b is killed (-9) and a takes b's partition
    over from its stored filter. Every offset is answered; every answer on both partitions, across the kill,
    is the filter step from the one before under the log's parameters; no record is learned twice; a's
    model is the log replayed."""
    n = 2500
    X = {0: regime_stream(n, seed=14)[0], 1: regime_stream(n, seed=15)[0]}
    topic = unique("regimes-replicas")
    settings = hmm_settings(broker, topic, replicate=True)
    ensure_topics(settings, input_partitions=2)
    common = ("--model", "hmm", "--replicate", "--warmup", "300", "--batch-size", "64", "--checkpoint-every", "400")
    processes = [_start(settings, "--instance-id", name, *common) for name in ("a", "b")]
    assignments = Assignments(processes)
    log = TopicCounter(broker.bootstrap_servers, settings.topics["statistics"])
    answered_count = TopicCounter(broker.bootstrap_servers, settings.topics["assignments"])
    answered = AnsweredOffsets(broker.bootstrap_servers, settings.topics["assignments"])
    try:
        wait_for(assignments.each_owns_one, 90, "each replica to own one partition")
        owned = {int(assignments.latest[i].rsplit(",", 1)[1].strip(" )]")): i for i in (0, 1)}
        produce_to(broker.bootstrap_servers, topic, owned_by_a := next(p for p, i in owned.items() if i == 0),
                   X[owned_by_a][:1500])
        wait_for(lambda: log.count() >= 1, 60, "a's warm-up to reach the statistics log")
        produce_to(broker.bootstrap_servers, topic, 1 - owned_by_a, X[1 - owned_by_a][:1500])
        wait_for(lambda: answered_count.count() >= 3000, 90, "both replicas to answer their first 1,500")
        processes[1].send_signal(signal.SIGKILL)
        processes[1].wait()
        wait_for(lambda: _owns_both(assignments.logs[0]), 60, "a to take b's partition over")
        for partition in (0, 1):
            produce_to(broker.bootstrap_servers, topic, partition, X[partition][1500:])
        wait_for(lambda: answered.reached(2 * n), 120, "a to answer every offset")
    finally:
        log.close()
        answered_count.close()
        processes[0].send_signal(signal.SIGTERM)
        code = processes[0].wait(timeout=90)
        if processes[1].poll() is None:
            processes[1].kill()
    assert code == 0
    messages = statistics_messages(broker, settings)
    assert [m["kind"] for m in messages].count("init") == 1
    versions = replay(messages)
    for partition in (0, 1):
        answers = answers_of(broker, settings, partition)
        assert sorted(answers) == list(range(n))
        assert_each_answer_follows_the_last(answers, X[partition], versions)
    replica = stored_checkpoint(settings.model_copy(update={"instance_id": "a"})).replica
    mine = se.OnlineGaussianHMM.from_dict(replica["model"])
    np.testing.assert_allclose(mine.transmat_, versions[-1].transmat_, rtol=1e-12)
    assert mine.n_seen == sum(m["count"] for m in messages) > 2 * n - 2 * 64


def _records(topic: str, partition: int, X: np.ndarray, first: int) -> list[InputRecord]:
    return [InputRecord(topic, partition, first + i, None, json.dumps({"a": a, "b": b}).encode())
            for i, (a, b) in enumerate(X.tolist())]


def test_two_replicas_that_warm_up_at_once_end_on_one_model_and_lose_no_record(broker):
    """Both replicas warm up before either reads the other's init, their states in opposite orders: both end
    on the log's model (the first init's; the second's warm-up learned as an update with its states matched,
    its blocks learned again from fresh filters), the states still the two regimes, and every record either
    took is learned once or waits in an open block."""
    X0, states = regime_stream(600, seed=16)
    means = np.array([[0.0, 0.0], [3.0, 1.0]])
    X = {0: X0, 1: X0 - means[states] + means[1 - states]}  # the same chain, regimes swapped: labels swap too
    topic = unique("regimes-race")
    settings = hmm_settings(broker, topic, replicate=True)
    ensure_topics(settings, input_partitions=2)
    store = TopicStore(settings, sink=None)
    learners = {p: ReplicatedRegimeLearner(settings.model_copy(update={"instance_id": f"r{p}"}), store)
                for p in (0, 1)}
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)

    def answer(partition: int, rows: slice) -> list:
        outputs = learners[partition].process(_records(topic, partition, X[partition][rows], rows.start))
        return [o for o in outputs if o.topic == settings.topics["statistics"]]

    try:
        published = answer(0, slice(0, 350)) + answer(1, slice(0, 350))  # both warm, neither has read the log
        assert [json.loads(m.value)["kind"] for m in published] == ["init", "init"]
        for message in published:
            producer.send(message.topic, key=message.key, value=message.value)
        producer.flush()
        for partition in (0, 1):
            for message in answer(partition, slice(350, 600)):
                producer.send(message.topic, key=message.key, value=message.value)
            producer.flush()
        for learner in learners.values():
            learner.finish()
        engines = [learner.state.model.to_dict()["engine"] for learner in learners.values()]
        assert engines[0] == engines[1]
        warmed = [se.OnlineGaussianHMM.from_dict(json.loads(m.value)["model"]).means_ for m in published]
        assert np.argmin(np.abs(warmed[0][:, 0] - 3.0)) != np.argmin(np.abs(warmed[1][:, 0] - 3.0))  # swapped
        learned = learners[0].state.model.means_[:, 0]
        reference = se.GaussianHMM(2, random_state=0).fit(np.vstack([X[0], X[1]]), lengths=[600, 600]).means_[:, 0]
        # each state still one regime: as batch Baum-Welch over both (0.22 off, were the labels not matched)
        assert np.abs(np.sort(learned) - np.sort(reference)).max() < 0.1, (learned, reference)
        assert learners[1].state.model.n_seen == learners[0].state.model.n_seen
        messages = statistics_messages(broker, settings)
        for partition in (0, 1):
            learned = sum(s["to"] - s["from"] for m in messages for s in m["sources"] if s["partition"] == partition)
            waiting = len(learners[partition].pending.get(f"{topic}/{partition}", []))
            assert learned + waiting == 600, (partition, learned, waiting)
    finally:
        producer.close()
        for learner in learners.values():
            learner.close()


def test_hmm_replicate_refuses_a_model_key():
    """--model hmm --replicate is one model for the group: with --model-key it is a settings error."""
    with pytest.raises(ValueError, match="replicate works with one model for the group"):
        ConsumerSettings(features=["a", "b"], model="hmm", replicate=True, model_key="k")


# -- replicas driven directly (the log on the broker, checkpoints in files) --------------------------------
class Replicas:
    """Learners of one group driven batch by batch: their statistics messages go to the log as the
    consumer's sink would send them."""

    def __init__(self, broker, tmp_path, partitions: int = 2, **overrides):
        self.broker = broker
        self.topic = unique("replicas")
        self.settings = hmm_settings(broker, self.topic, replicate=True, checkpoint_dir=str(tmp_path), **overrides)
        ensure_topics(self.settings, input_partitions=partitions)
        self.store = DirectoryStore(tmp_path)
        self.producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        self.learners: list[ReplicatedRegimeLearner] = []
        for partition in range(partitions):  # the input holds the offsets the tests hand the learners
            for _ in range(1000):
                self.producer.send(self.topic, partition=partition, value=b'{"a": 0, "b": 0}')
        self.producer.flush()

    def learner(self, name: str) -> ReplicatedRegimeLearner:
        learner = ReplicatedRegimeLearner(self.settings.model_copy(update={"instance_id": name}), self.store)
        self.learners.append(learner)
        return learner

    def process(self, learner: ReplicatedRegimeLearner, partition: int, X: np.ndarray, first: int) -> list[dict]:
        return self.publish(learner.process(_records(self.topic, partition, X, first)))

    def publish(self, outputs) -> list[dict]:
        sent = [o for o in outputs if o.topic == self.settings.topics["statistics"]]
        for output in sent:
            self.producer.send(output.topic, key=output.key, value=output.value)
        self.producer.flush()
        return [json.loads(o.value) for o in sent]

    def checkpoint(self, learner: ReplicatedRegimeLearner) -> None:
        self.store.save_all(learner.checkpoint_entries())

    def unlearned(self, learner: ReplicatedRegimeLearner, partition: int, n: int) -> list[int]:
        """Offsets below n of a partition that the log (replayed with the replicas' rule: a message whose
        records overlap what is learned is skipped) never learned and that are not in the open block."""
        applied, learned = {}, set()
        for message in read_all(self.broker.bootstrap_servers, self.settings.topics["statistics"]):
            ranges = [(s["partition"], s["from"], s["to"]) for s in message["sources"]]
            if any(start < applied.get(p, 0) for p, start, _ in ranges):
                continue
            for p, start, end in ranges:
                learned |= {(p, o) for o in range(start, end)}
                applied[p] = max(applied.get(p, 0), end)
        waiting = {o for _, _, o in learner.pending.get(f"{self.topic}/{partition}", [])}
        return [o for o in range(n) if (partition, o) not in learned and o not in waiting]

    def close(self) -> None:
        self.producer.close()
        for learner in self.learners:
            learner.close()


@pytest.fixture
def replicas(broker, tmp_path):
    made: list[Replicas] = []

    def make(**overrides) -> Replicas:
        made.append(Replicas(broker, tmp_path, **overrides))
        return made[-1]

    yield make
    for group in made:
        group.close()


def test_an_init_read_while_idle_loses_no_record(replicas):
    """A cold replica that reads another's init on an idle poll learns its warm-up buffer through the log's
    model at its next batch (no message is made where none can be sent)."""
    group = replicas()
    X0, X1 = regime_stream(600, seed=21)[0], regime_stream(600, seed=22)[0]
    r0, r1 = group.learner("r0"), group.learner("r1")
    assert group.process(r0, 0, X0[:250], 0) == []  # cold: 250 records in its warm-up buffer
    assert group.process(r1, 1, X1[:350], 0)[0]["kind"] == "init"
    wait_for(lambda: (r0.idle(), r0.started)[1], 30, "r0 to read r1's init")
    assert r0.messages == []
    group.process(r0, 0, X0[250:600], 250)
    r0.finish()
    assert group.unlearned(r0, 0, 600) == []


def test_a_cold_replicas_records_keep_their_partitions(replicas):
    """A warm-up buffer holding two partitions' records, learned again through another replica's init:
    each block names only its own partition's offsets, and none is lost."""
    group = replicas(partitions=3)
    X = [regime_stream(600, seed=23 + p)[0] for p in range(3)]
    r0, r1 = group.learner("r0"), group.learner("r1")
    group.process(r0, 0, X[0][:100], 0)
    group.process(r0, 1, X[1][:100], 0)
    group.process(r0, 0, X[0][100:180], 100)  # 280 buffered, in arrival order p0, p1, p0
    group.process(r1, 2, X[2][:350], 0)  # r1 warms first
    sent = group.process(r0, 0, X[0][180:181], 180)
    wait_for(lambda: r0.started or sent.extend(group.publish(r0.process([]))), 30, "r0 to read r1's init")
    sent += group.publish(r0.process([]))  # the records learned again go out with the next batch
    blocks = [[(s["partition"], s["from"], s["to"]) for s in m["sources"]] for m in sent]
    assert blocks[:2] == [[(0, 0, 64)], [(0, 64, 128)]] and [(1, 0, 64)] in blocks, blocks
    r0.finish()
    assert group.unlearned(r0, 0, 181) == [] and group.unlearned(r0, 1, 100) == []


def test_a_replica_restarted_cold_beside_a_warm_group_loses_no_record(replicas):
    """A replica whose own checkpoint is cold, restarted after the group's model warmed up, learns its
    buffered records through the group's model and goes on: no record of its partition is lost."""
    group = replicas()
    X0, X1 = regime_stream(600, seed=26)[0], regime_stream(600, seed=27)[0]
    r0, r1 = group.learner("r0"), group.learner("r1")
    group.process(r0, 0, X0[:250], 0)
    group.checkpoint(r0)
    group.process(r1, 1, X1[:350], 0)
    r1.finish()
    group.checkpoint(r1)
    r0.close()
    group.learners.remove(r0)
    restarted = group.learner("r0")
    assert restarted.started and restarted.leftovers
    group.process(restarted, 0, X0[250:600], 250)
    restarted.finish()
    assert group.unlearned(restarted, 0, 600) == []


def test_a_poll_of_dead_letters_moves_the_stored_filter_with_the_partition(replicas):
    """A poll whose records of a partition are all dead-lettered still moves the partition's stored filter
    to the offset after them: the next reader goes on from it and no record is lost."""
    group = replicas(partitions=1)
    X = regime_stream(600, seed=28)[0]
    first = group.learner("a")
    group.process(first, 0, X[:400], 0)
    group.checkpoint(first)
    bad = [InputRecord(group.topic, 0, 400 + i, None, b"not json") for i in range(5)]
    outputs = first.process(bad)
    group.publish(outputs)
    assert sum(o.topic == group.settings.topics["dead_letter"] for o in outputs) == 5
    group.checkpoint(first)
    first.finish()
    first.close()
    group.learners.remove(first)
    second = group.learner("b")
    group.process(second, 0, X[405:600], 405)
    second.finish()
    assert set(group.unlearned(second, 0, 600)) <= set(range(400, 405))
    assert second.state.model.stream_state(f"{group.topic}/0") is not None


@pytest.mark.parametrize("state, offsets", [
    ({"block": None}, []), ({"block": 5}, []), ({"filter": ["BIG", 0]}, []), ({"block": [["BIG", 1.0]]}, [9]),
    ({"block": [[1.0, 2.0], [1.0, 2.0]]}, [8, 999_999]), ({"block": [[1.0, 2.0]]}, [-1]),
], ids=["block-null", "block-int", "huge-filter", "huge-block", "offset-beyond", "offset-negative"])
def test_a_corrupted_stored_filter_starts_a_fresh_filter(replicas, caplog, state, offsets):
    """A stored filter that does not fit (bad types, numbers beyond a float, block offsets out of order or past
    its offset) gives a WARNING and a fresh filter: never an exception, never offsets the log would trust."""
    group = replicas()
    X = regime_stream(700, seed=29)[0]
    learner = group.learner("a")
    group.process(learner, 0, X[:350], 0)
    wait_for(lambda: (group.publish(learner.process([])), learner.started)[1], 30, "the init to be read back")
    stream = f"{group.topic}/1"
    document = {"version": CHECKPOINT_VERSION, "stream": stream, "offset": 10, "block_offsets": offsets,
                "settings": model_settings(group.settings),
                "state": {"filter": [0.5, 0.5], "block": [], "latest": None, **state}}
    raw = orjson.dumps(document).replace(b'"BIG"', b"1" + b"0" * 400)
    group.store.save_all([(f"{group.settings.group_id}/filter/{stream}", raw)])
    learner.stale = True  # as after a rebalance that gave it partition 1
    group.process(learner, 1, X[10:300], 10)
    assert any("its filter starts anew" in message for message in caplog.messages)
    learner.finish()
    assert learner.applied.get((group.topic, 1), 0) <= 300  # no offset from the document reached the log
    assert group.unlearned(learner, 1, 300) == list(range(10))  # before the batch: not ours to learn


def test_a_block_overlapping_what_the_log_learned_is_skipped_by_every_replica(replicas):
    """A partition taken over before its previous owner's last block was read: the new owner's block overlaps
    it (its boundaries differ), and the log skips it rather than learn records twice."""
    group = replicas(outlier_threshold=float("inf"))
    X0, X1 = regime_stream(400, seed=30)[0], regime_stream(400, seed=31)[0]
    X0[340] = [40.0, 40.0]
    a = group.learner("a")
    group.process(a, 0, X0[:330], 0)
    wait_for(lambda: (group.publish(a.process([])), a.started)[1], 30, "a's init to be read back")
    group.checkpoint(a)
    b = ReplicatedRegimeLearner(group.settings.model_copy(update={"instance_id": "b", "outlier_threshold": 25.0}),
                                group.store)
    group.learners.append(b)
    group.process(b, 1, X1[:10], 0)
    from_a = a.process(_records(group.topic, 0, X0[330:400], 330))  # a learns 340: block [300, 364)
    b.start_offsets([(group.topic, 0), (group.topic, 1)])  # a dies; p0 goes to b from the commit, 330
    from_b = b.process(_records(group.topic, 0, X0[330:400], 330))  # b refuses 340: block [300, 365)
    sent = group.publish(from_a) + group.publish(from_b)
    assert {(s["from"], s["to"]) for m in sent for s in m["sources"] if s["partition"] == 0} >= {(300, 364), (300, 365)}
    b.finish()
    a.finish()
    assert a.state.model.to_dict()["engine"] == b.state.model.to_dict()["engine"]
    assert b.applied[(group.topic, 0)] == 364  # b's overlapping block was not learned


def test_a_replica_with_other_settings_than_the_groups_model_stops_with_one_line(replicas):
    """Two replicas of a fresh group started with different covariance types: the one whose settings differ
    from the statistics log's first init stops with a CheckpointError naming both, rather than run a model
    of its own beside the group's."""
    group = replicas()
    X0, X1 = regime_stream(400, seed=32)[0], regime_stream(400, seed=33)[0]
    full = group.learner("full")
    group.process(full, 0, X0[:350], 0)  # the log's first init
    odd = ReplicatedRegimeLearner(group.settings.model_copy(update={"instance_id": "diag",
                                                                    "covariance_type": "diag"}), group.store)
    group.learners.append(odd)
    with pytest.raises(CheckpointError, match="the group's hidden Markov model .* covariance type .*'full'.*'diag'"):
        for _ in range(100):
            group.process(odd, 1, X1[:5], 0)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["replica"].update(log_offset="x"), "log_offset"),
    (lambda d: d["replica"].update(log_offset=10**30), "log_offset"),
    (lambda d: d["replica"].update(started="yes"), "started"),
    (lambda d: d["replica"].update(applied=[[d["replica"]["applied"][0][0], 0, 10**15]]), "not in the input"),
    (lambda d: d["replica"].update(leftovers=[["s", [[1e200, 0.0]], [[d["replica"]["applied"][0][0], 0, 3]]]]),
     "beyond"),
    (lambda d: d.update(replica=None), "'replica' is null"),
], ids=["log-offset-text", "log-offset-huge", "started-text", "applied-past-the-end", "leftover-huge", "null"])
def test_a_corrupted_replica_checkpoint_is_refused_in_one_line(replicas, change, message):
    """A replica checkpoint with a field no run could write is refused by name (CheckpointError, which the CLI
    prints as one line), never a traceback in the model process nor offsets the log would trust."""
    group = replicas()
    learner = group.learner("a")
    group.process(learner, 0, regime_stream(400, seed=34)[0], 0)
    group.checkpoint(learner)
    key = group.settings.model_copy(update={"instance_id": "a"}).checkpoint_key
    document = json.loads(group.store.load(key))
    change(document)
    group.store.save_all([(key, json.dumps(document).encode())])
    with pytest.raises(CheckpointError, match=message):
        ReplicatedRegimeLearner(group.settings.model_copy(update={"instance_id": "a"}), group.store)


def test_a_statistics_message_without_sources_is_refused():
    """A statistics message must name the records it summarises (else the log could learn them twice)."""
    body = {"kind": "update", "origin": "x", "sequence": 1, "count": 64, "sources": [], "statistics": {}}
    with pytest.raises(ValidationError, match="sources"):
        StatisticsMessage.model_validate_json(json.dumps(body))

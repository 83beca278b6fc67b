"""`streamem run --model hmm --replicate`: parameters through the statistics log, filters that follow
their partitions from consumer to consumer."""

from __future__ import annotations

import json
import queue
import signal

import numpy as np
import pytest
from kafka import KafkaProducer
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import streamem as se
from streamem_connectors.kafka.checkpoint import TopicStore
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.records import InputRecord
from streamem_connectors.kafka.regime_replication import ReplicatedRegimeLearner
from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import TopicCounter, read_all, unique, wait_for
from tests.test_kafka_consumer import _start, offsets_of, stored_checkpoint
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
    answered: set = set()

    def everything_answered() -> bool:
        answered.update(offsets_of(read_all(broker.bootstrap_servers, settings.topics["assignments"])))
        return len(answered) >= 2 * n

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
        wait_for(everything_answered, 120, "a to answer every offset")
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
    """Both replicas warm up before either reads the other's init: both end on the log's model (the first
    init's; the second's warm-up learned as an update, its open blocks learned again from fresh filters), and
    every record either took is learned once or waits in an open block."""
    X = {0: regime_stream(600, seed=16)[0], 1: regime_stream(600, seed=17)[0]}
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

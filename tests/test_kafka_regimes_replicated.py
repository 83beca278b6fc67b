"""`streamem run --model hmm --replicate`: parameters through the statistics log, filters that follow
their partitions from consumer to consumer."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import streamem as se
from streamem_connectors.kafka.checkpoint import TopicStore
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import read_all, unique
from tests.test_kafka_consumer import stored_checkpoint
from tests.test_kafka_regimes import by_offset, hmm_settings, produce_to, regime_stream


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


def assert_each_answer_follows_the_last(answers: dict[int, dict], X: np.ndarray, versions) -> list[int]:
    """Every answer after the warm-up is the previous answer moved one step by the filter recursion (scipy's
    densities) under a version of the log's parameters, the versions in order; returns the versions used."""
    offsets = sorted(answers)
    warm = [t for t in offsets if answers[t]["log_likelihood"] is not None]
    steps = [t for t in warm if t - 1 in answers and answers[t - 1]["log_likelihood"] is not None]
    assert len(steps) == len(warm) - 1  # the first answer after the warm-up follows the warm-up's filter
    previous = np.array([answers[t - 1]["probabilities"] for t in steps])
    got = np.array([answers[t]["probabilities"] for t in steps])
    matches = []
    for model in versions:
        log_b = np.column_stack([multivariate_normal(model.means_[k], model.covariances_[k]).logpdf(X[steps])
                                 for k in range(model.n_states)])
        log_f = np.log(previous @ model.transmat_) + log_b
        expected = np.exp(log_f - logsumexp(log_f, axis=1, keepdims=True))
        matches.append(np.abs(expected - got).max(axis=1) < 1e-8)
    matches = np.array(matches)  # (versions, steps)
    used, version = [], 0
    for i, t in enumerate(steps):
        later = np.flatnonzero(matches[version:, i])
        assert later.size, f"offset {t}: no version of the log's parameters from {version} on gives this answer"
        version += int(later[0])
        used.append(version)
    return used


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
    answers = by_offset(broker, settings.topics["assignments"])
    assert sorted(answers) == list(range(total))
    messages = statistics_messages(broker, settings)
    assert [m["kind"] for m in messages] == ["init"] + ["update"] * (len(messages) - 1)
    assert messages[0]["count"] == 300 and sum(m["count"] for m in messages) == 300 + 64 * ((total - 300) // 64)
    versions = replay(messages)
    used = assert_each_answer_follows_the_last(answers, X, versions)
    assert used[-1] >= len(versions) - 2  # the replica applies what it publishes before its next poll
    likely = np.array([np.argmax(answers[t]["probabilities"]) for t in range(300, total)])
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
        answers = by_offset(broker, settings.topics["assignments"], partition)
        assert sorted(answers) == list(range(2000))
        assert_each_answer_follows_the_last(answers, X, versions)
    assert sum(m["count"] for m in messages) > 4000 - 2 * 64  # learned but the two open blocks


def test_hmm_replicate_refuses_a_model_key():
    """--model hmm --replicate is one model for the group: with --model-key it is a settings error."""
    with pytest.raises(ValueError, match="replicate works with one model for the group"):
        ConsumerSettings(features=["a", "b"], model="hmm", replicate=True, model_key="k")

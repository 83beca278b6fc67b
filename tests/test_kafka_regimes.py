"""`streamem run --model hmm`: a hidden Markov model, one filter per partition, regime_change records."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from kafka import KafkaProducer

import streamem as se
from streamem_connectors.kafka.checkpoint import CheckpointError
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import TopicCounter, read_all, unique, wait_for
from tests.test_kafka_consumer import _start, make_settings, stored_checkpoint


def regime_stream(n: int, seed: int, stay: float = 0.99) -> tuple[np.ndarray, np.ndarray]:
    """Records {a, b} of a sticky two-state chain (means 0 and 3 apart) and its states."""
    rng = np.random.default_rng(seed)
    states = np.empty(n, dtype=np.int64)
    state = 0
    for t, leave in enumerate(rng.random(n) > stay):
        state = 1 - state if leave else state
        states[t] = state
    means = np.array([[0.0, 0.0], [3.0, 1.0]])
    return means[states] + rng.normal(size=(n, 2)), states


def produce_to(bootstrap: str, topic: str, partition: int, X: np.ndarray, extra: dict | None = None) -> None:
    """The rows of X as JSON records {a, b}, in order, to one partition."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    futures = [
        producer.send(topic, partition=partition, value=json.dumps({"a": a, "b": b, **(extra or {})}).encode())
        for a, b in X.tolist()
    ]
    producer.flush()
    producer.close()
    assert all(f.succeeded() for f in futures)


def hmm_settings(broker, topic: str, **overrides) -> ConsumerSettings:
    return make_settings(broker, topic, model="hmm", n_components=2, warmup=300, batch_size=64, **overrides)


def by_offset(broker, topic: str, partition: int = 0) -> dict[int, dict]:
    return {r["source"]["offset"]: r for r in read_all(broker.bootstrap_servers, topic)
            if r["source"]["partition"] == partition}


def test_one_partition_is_answered_as_the_library_filters_it(broker):
    """On one partition, every assignment's probabilities and log-likelihood equal OnlineGaussianHMM's
    filter_and_learn over the same records (NaN during the warm-up), and the regime_change records mark
    the true regime switches."""
    total = 3000
    X, states = regime_stream(total, seed=1)
    topic = unique("regimes-one")
    settings = hmm_settings(broker, topic, max_records=total, max_poll_records=173)
    ensure_topics(settings, input_partitions=1)
    produce_to(broker.bootstrap_servers, topic, 0, X)
    counters = run_consumer(settings)
    assert counters.assigned == total and counters.dead_lettered == 0
    answers = by_offset(broker, settings.topics["assignments"])
    assert sorted(answers) == list(range(total))
    model = se.OnlineGaussianHMM(2, warmup=300, batch_size=64, features=("a", "b"), seed=0,
                                 step=se.schedules.StepSize(alpha=0.8, eta_min=0.02))
    expected, log_likelihood = model.filter_and_learn(X, stream=f"{topic}/0")
    ours = np.array([answers[t]["probabilities"] for t in range(total)])
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)
    assert all(answers[t]["log_likelihood"] is None for t in range(300))  # the warm-up has no model yet
    np.testing.assert_allclose([answers[t]["log_likelihood"] for t in range(300, total)], log_likelihood[300:],
                               rtol=1e-9)
    changes = [r for r in read_all(broker.bootstrap_servers, settings.topics["drift"]) if r.get("regime_change")]
    switches = int((np.diff(states[300:]) != 0).sum())
    assert switches - 3 <= len(changes) - 1 <= switches + 3, (switches, len(changes))
    for change in changes:
        offset = change["source"]["offset"]
        assert max(change["probabilities"]) >= 0.9 and change["to"] == int(np.argmax(expected[offset]))


def test_each_partition_is_its_own_sequence_and_a_restart_resumes_its_filter(broker):
    """Two partitions with their own regimes, consumed in two runs (stopped after 2,500 of 4,000 records):
    every record answered once; each partition's regime_change records follow its own switches; the
    checkpoint holds a filter for each partition and the regime last announced on it."""
    X0, states0 = regime_stream(2000, seed=3)  # its first 300 records (the warm-up) hold both regimes
    X1, states1 = regime_stream(2000, seed=4)
    topic = unique("regimes-two")
    settings = hmm_settings(broker, topic, max_records=2500)
    ensure_topics(settings, input_partitions=2)
    produce_to(broker.bootstrap_servers, topic, 0, X0)
    produce_to(broker.bootstrap_servers, topic, 1, X1)
    run_consumer(settings)
    checkpoint = stored_checkpoint(settings)
    streams = {s["stream"] for s in checkpoint.model["streams"]}
    assert streams == {f"{topic}/0", f"{topic}/1"} and set(checkpoint.regimes) <= streams
    run_consumer(settings.model_copy(update={"max_records": 1500}))
    for partition, states in ((0, states0), (1, states1)):
        answers = by_offset(broker, settings.topics["assignments"], partition)
        assert sorted(answers) == list(range(2000))
        changes = [r for r in read_all(broker.bootstrap_servers, settings.topics["drift"])
                   if r.get("regime_change") and r["source"]["partition"] == partition]
        first = changes[0]["source"]["offset"]  # partition 0 after the warm-up (its first 300), partition 1 at once
        switches = int((np.diff(states[first:]) != 0).sum())
        assert abs(len(changes) - 1 - switches) <= 0.25 * switches + 3, (partition, switches, len(changes))


def test_a_restart_answers_as_if_the_consumer_never_stopped(broker):
    """One partition consumed in three runs (stops mid-block and mid-warm-up) gives the same answers, record
    for record, as one run: the checkpoint holds the filter and the open block with the offsets."""
    total = 1500
    X, _ = regime_stream(total, seed=4)
    answers = []
    for runs in ([total], [250, 777, total - 1027]):
        topic = unique("regimes-restart")
        settings = hmm_settings(broker, topic, max_poll_records=100)
        ensure_topics(settings, input_partitions=1)
        produce_to(broker.bootstrap_servers, topic, 0, X)
        for count in runs:
            run_consumer(settings.model_copy(update={"max_records": count}))
        answers.append(by_offset(broker, settings.topics["assignments"]))
    once, restarted = answers
    assert sorted(restarted) == list(range(total))
    for offset in range(total):
        assert once[offset]["probabilities"] == pytest.approx(restarted[offset]["probabilities"], rel=1e-12)


def test_a_value_too_large_is_dead_lettered_and_the_filter_goes_on(broker):
    """A record of 1e200 gets a dead letter naming the field; its neighbours are answered and learned."""
    X, _ = regime_stream(600, seed=5)
    topic = unique("regimes-large")
    settings = hmm_settings(broker, topic, max_records=601)
    ensure_topics(settings, input_partitions=1)
    produce_to(broker.bootstrap_servers, topic, 0, X[:400])
    produce_to(broker.bootstrap_servers, topic, 0, np.array([[1e200, 0.0]]))
    produce_to(broker.bootstrap_servers, topic, 0, X[400:])
    counters = run_consumer(settings)
    assert counters.assigned == 600 and counters.dead_lettered == 1
    dead = read_all(broker.bootstrap_servers, settings.topics["dead_letter"])
    assert dead[0]["source"]["offset"] == 400 and "'a' is 1e+200, too large" in dead[0]["error"]
    assert stored_checkpoint(settings).model["n_seen"] == 600


@pytest.mark.parametrize("replicate", [False, True])
def test_absurd_records_in_a_fresh_models_first_poll_are_dead_lettered(broker, replicate):
    """Records of 1e149 and 1e6 among the first of a fresh model (one poll: nothing buffered before it) are
    judged against the poll's own median and dead-lettered; the warm-up fits the two regimes, not them."""
    X, _ = regime_stream(800, seed=6)
    X[5], X[100] = [1e149, 0.0], [1e6, 0.0]
    topic = unique("regimes-absurd")
    settings = hmm_settings(broker, topic, max_records=800, replicate=replicate)
    ensure_topics(settings, input_partitions=1)
    produce_to(broker.bootstrap_servers, topic, 0, X)
    counters = run_consumer(settings)
    dead = read_all(broker.bootstrap_servers, settings.topics["dead_letter"])
    assert sorted(d["source"]["offset"] for d in dead) == [5, 100] and counters.assigned == 798
    assert all("outlier: squared distance" in d["error"] for d in dead), dead
    checkpoint = stored_checkpoint(settings)
    model = se.OnlineGaussianHMM.from_dict(checkpoint.replica["model"] if replicate else checkpoint.model)
    assert np.abs(np.sort(model.means_[:, 0]) - [0.0, 3.0]).max() < 0.3, model.means_


def test_a_far_record_is_dead_lettered_and_a_moved_stream_is_learned_again(broker):
    """A legal but absurd record ({a: 1e10}) after the warm-up gets a dead letter naming its distance and is
    not learned (the states' covariances stay small); when every record moves far away for good, the first
    --batch-size of them are dead-lettered and the rest answered and learned (the stream moved)."""
    X, _ = regime_stream(1000, seed=9)
    moved = X[700:] + 1e4
    topic = unique("regimes-far")
    settings = hmm_settings(broker, topic, max_records=1001)
    ensure_topics(settings, input_partitions=1)
    produce_to(broker.bootstrap_servers, topic, 0, X[:500])
    produce_to(broker.bootstrap_servers, topic, 0, np.array([[1e10, 1e10]]))
    produce_to(broker.bootstrap_servers, topic, 0, X[500:700])
    produce_to(broker.bootstrap_servers, topic, 0, moved)
    counters = run_consumer(settings)
    dead = read_all(broker.bootstrap_servers, settings.topics["dead_letter"])
    assert dead[0]["source"]["offset"] == 500 and "squared distance" in dead[0]["error"], dead[0]
    assert [d["source"]["offset"] for d in dead[1:]] == list(range(701, 701 + 64))  # one block of the moved stream
    assert counters.assigned + counters.dead_lettered == 1001
    model = stored_checkpoint(settings).model
    assert model["n_seen"] == 1001 - len(dead)
    assert max(np.max(np.abs(c)) for c in model["engine"]["covariances"]) < 1e9  # 1e10 was never learned


def test_with_a_model_key_each_key_is_its_own_sequence(broker):
    """--model hmm --model-key site: two sites interleaved on one partition, each with its own regimes: every
    record answered once with its site as model_key; each site's filtered labels follow its own regimes (a
    poll's records are learned key by key, so the answers depend on how polls cut the stream: no exact
    reference); its regime_change records carry the site and follow its own switches; the checkpoint holds a
    filter per site."""
    X0, states0 = regime_stream(1500, seed=3)
    X1, states1 = regime_stream(1500, seed=4)
    order = np.random.default_rng(10).permutation(np.r_[np.zeros(1500, dtype=int), np.ones(1500, dtype=int)])
    position = [0, 0]
    rows, sites = [], []
    for site in order.tolist():
        rows.append((X0, X1)[site][position[site]])
        position[site] += 1
        sites.append(f"s{site}")
    topic = unique("regimes-keyed")
    settings = hmm_settings(broker, topic, model_key="site", max_records=3000, max_poll_records=173)
    ensure_topics(settings, input_partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    for (a, b), site in zip(np.array(rows).tolist(), sites, strict=True):
        producer.send(topic, partition=0, key=site.encode(), value=json.dumps({"a": a, "b": b, "site": site}).encode())
    producer.flush()
    producer.close()
    counters = run_consumer(settings)
    assert counters.assigned == 3000
    answers = by_offset(broker, settings.topics["assignments"])
    assert [answers[t]["model_key"] for t in range(3000)] == sites
    truth = np.empty(3000, dtype=int)
    for t, site in enumerate(sites):
        states = (states0, states1)[int(site[1])]
        truth[t] = states[sum(1 for u in range(t) if sites[u] == site)]
    labels = np.array([answers[t]["component"] for t in range(3000)])
    late = slice(600, None)  # after the warm-up (300 records) and a few blocks
    agreement = (labels[late] == truth[late]).mean()
    assert max(agreement, 1 - agreement) > 0.9, agreement
    changes = [r for r in read_all(broker.bootstrap_servers, settings.topics["drift"]) if r.get("regime_change")]
    for site, states in (("s0", states0), ("s1", states1)):
        mine = [c for c in changes if c["model_key"] == site]
        first = sum(1 for t in range(mine[0]["source"]["offset"]) if sites[t] == site)  # the site's own count
        switches = int((np.diff(states[first:]) != 0).sum())
        assert abs(len(mine) - 1 - switches) <= 0.25 * switches + 3, (site, switches, len(mine))
    assert {s["stream"] for s in stored_checkpoint(settings).model["streams"]} == {"s0", "s1"}


def test_with_a_target_the_assignments_carry_the_markov_switching_forecast(broker):
    """--model hmm --target y: every assignment's prediction, probabilities and log-likelihood equal
    OnlineMarkovSwitchingRegression.forecast_and_learn over the same records (one partition)."""
    total = 1500
    rng = np.random.default_rng(8)
    X, states = regime_stream(total, seed=8)
    y = np.where(states == 0, 2.0 * X[:, 0] + 1.0, -X[:, 0] + 4.0) + 0.3 * rng.normal(size=total)
    topic = unique("regimes-target")
    settings = hmm_settings(broker, topic, target="y", max_records=total, max_poll_records=173)
    ensure_topics(settings, input_partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    for (a, b), target in zip(X.tolist(), y.tolist(), strict=True):
        producer.send(topic, partition=0, value=json.dumps({"a": a, "b": b, "y": target}).encode())
    producer.flush()
    producer.close()
    counters = run_consumer(settings)
    assert counters.assigned == total
    answers = by_offset(broker, settings.topics["assignments"])
    model = se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, features=("a", "b"), seed=0,
                                               step=se.schedules.StepSize(alpha=0.8, eta_min=0.02))
    probabilities, _, forecasts = model.forecast_and_learn(np.column_stack([X, y]), stream=f"{topic}/0")
    np.testing.assert_allclose([answers[t]["prediction"] for t in range(total)], forecasts, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose([answers[t]["probabilities"] for t in range(total)], probabilities, rtol=1e-9,
                               atol=1e-12)
    late = slice(1000, total)  # once the model knows the lines, the forecast beats the mean
    assert np.mean((forecasts[late] - y[late]) ** 2) < 0.5 * np.var(y[late])


def test_a_checkpoint_of_another_model_is_refused(broker):
    """A gmm checkpoint resumed with --model hmm (or the reverse) is refused, naming the setting."""
    X, _ = regime_stream(400, seed=6)
    topic = unique("regimes-switch")
    settings = make_settings(broker, topic, max_records=250)
    ensure_topics(settings, input_partitions=1)
    produce_to(broker.bootstrap_servers, topic, 0, X)
    run_consumer(settings)
    with pytest.raises((CheckpointError, SystemExit)) as raised:
        run_consumer(settings.model_copy(update={"model": "hmm"}))
    assert "model" in str(raised.value)


def test_kill_9_then_restart_answers_every_record_as_an_uninterrupted_run(broker):
    """SIGKILL of `streamem run --model hmm` mid-stream, then a restart from its checkpoint: every offset is
    answered, and every answer (the tail after the checkpoint twice, identically) equals an uninterrupted run's:
    the checkpoint resumed the filter where the partition was."""
    total = 6000
    X, _ = regime_stream(total, seed=7)
    answers = {}
    for mode in ("uninterrupted", "killed"):
        topic = unique(f"regimes-kill-{mode}")
        settings = make_settings(broker, topic, model="hmm", max_records=total, max_poll_records=200)
        ensure_topics(settings, input_partitions=1)
        if mode == "killed":
            # half the stream first: the victim cannot finish before the kill, however fast it runs
            produce_to(broker.bootstrap_servers, topic, 0, X[: total // 2])
            counter = TopicCounter(broker.bootstrap_servers, settings.topics["assignments"])
            victim = _start(settings, "--model", "hmm", "--max-records", str(total), "--checkpoint-every", "1000")
            try:
                wait_for(lambda: counter.count() >= 2500, 60, "the first process to answer 2,500 records")  # noqa: B023
            finally:
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                counter.close()
            produce_to(broker.bootstrap_servers, topic, 0, X[total // 2 :])
            learned = sum(o.offset for o in stored_checkpoint(settings).offsets)
            assert 0 < learned <= total // 2
            run_consumer(settings.model_copy(update={"max_records": total - learned}))
        else:
            produce_to(broker.bootstrap_servers, topic, 0, X)
            run_consumer(settings)
        records = read_all(broker.bootstrap_servers, settings.topics["assignments"])
        seen: dict[int, list] = {}
        for record in records:
            seen.setdefault(record["source"]["offset"], []).append(record["probabilities"])
        answers[mode] = seen
    once, killed = answers["uninterrupted"], answers["killed"]
    assert sorted(killed) == sorted(once) == list(range(total))
    for offset, repeated in killed.items():
        for probabilities in repeated:
            assert probabilities == pytest.approx(once[offset][0], rel=1e-12, abs=1e-15), offset

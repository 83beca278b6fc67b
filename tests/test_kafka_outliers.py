"""The consumer on the embedded broker: absurd records become dead letters, are not learned, and leave
the model where the clean stream leaves it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamem import OnlineGMM, OnlineRegressionMixture
from streamem_connectors.kafka.checkpoint import Checkpoint, ModelCheckpoint, TopicStore
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.replication import ReplicatedLearner
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import produce, read_all, unique
from tests.test_kafka_consumer import make_settings

CENTRES = np.array([[0.0, 0.0], [8.0, 3.0]])
# 2**65 travels as the JSON integer 36893488147419103232, as a producer would send it
OUTLIERS = {
    150: ({"a": 2**65, "b": 0}, "outlier: squared robust distance"),  # during the warm-up (200 records)
    1200: ({"a": 1e300, "b": 0}, "outlier: feature 'a' is 1e+300, too large for the model's statistics"),
    1800: ({"a": 2**65, "b": 0}, "outlier: squared Mahalanobis distance"),
    2400: ({"a": 1e6, "b": 0}, "outlier: squared Mahalanobis distance"),
}


def _stream(n: int, seed: int = 0, outliers: bool = True) -> list[bytes]:
    """n records of the two-cluster mixture, with the outliers at their positions (n + 4 in all)."""
    rng = np.random.default_rng(seed)
    points = CENTRES[rng.integers(2, size=n)] + rng.normal(size=(n, 2))
    values = [json.dumps({"a": a, "b": b}).encode() for a, b in points.tolist()]
    for position, (record, _) in sorted(OUTLIERS.items()) if outliers else []:
        values.insert(position, json.dumps(record).encode())
    return values


def _check_outputs(broker, settings, values, offsets_of_outliers):
    assignments = read_all(broker.bootstrap_servers, settings.topics["assignments"])
    dead = read_all(broker.bootstrap_servers, settings.topics["dead_letter"])
    answered = [a["source"]["offset"] for a in assignments] + [d["source"]["offset"] for d in dead]
    assert sorted(answered) == list(range(len(values)))  # every offset once: one assignment or one dead letter
    reasons = {d["source"]["offset"]: d["error"] for d in dead}
    assert sorted(reasons) == sorted(offsets_of_outliers)
    return reasons


def _close_to_centres(means: np.ndarray, tolerance: float = 0.15) -> None:
    order = np.argsort(means[:, 0])
    np.testing.assert_allclose(means[order], CENTRES, atol=tolerance)


def test_outliers_are_dead_lettered_not_learned_and_the_model_stays_right(broker):
    """1e300, 2**65 (warm-up and later) and 1e6 mid-stream: dead letters with the reason, no assignment, not
    learned; the consumer finishes and the means are the simulated mixture's within 0.15."""
    topic = unique("outliers")
    values = _stream(3000)
    settings = make_settings(broker, topic, max_records=len(values))
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, values)

    counters = run_consumer(settings)

    reasons = _check_outputs(broker, settings, values, OUTLIERS)
    for offset, (_, reason) in OUTLIERS.items():
        assert reason in reasons[offset], reasons[offset]
    assert "(threshold 1e+06)" in reasons[2400]
    assert counters.dead_lettered == 4
    model = OnlineGMM.from_dict(Checkpoint.parse(TopicStore(settings, sink=None).load(settings.checkpoint_key)).model)
    assert model.n_seen == 3000
    _close_to_centres(model.means_)


def test_each_keyed_model_refuses_its_own_outliers(broker):
    """--model-key: the outliers of key "x" are dead-lettered by its model; both keys' models stay right."""
    topic = unique("outliers-keyed")
    x, y = _stream(3000, seed=1), _stream(3000, seed=2, outliers=False)
    values, keys = [], []
    for i in range(max(len(x), len(y))):
        for key, stream in (("x", x), ("y", y)):
            if i < len(stream):
                record = json.loads(stream[i])
                record["sensor"] = key
                values.append(json.dumps(record).encode())
                keys.append(key.encode())
    settings = make_settings(broker, topic, max_records=len(values), model_key="sensor")
    ensure_topics(settings, input_partitions=2)
    produce(broker.bootstrap_servers, topic, values, keys)

    run_consumer(settings)

    dead = read_all(broker.bootstrap_servers, settings.topics["dead_letter"])
    assert len(dead) == 4 and all(json.loads(d["value"])["sensor"] == "x" for d in dead)
    assignments = read_all(broker.bootstrap_servers, settings.topics["assignments"])
    assert len(assignments) + len(dead) == len(values)
    stored = TopicStore(settings, sink=None).load_prefix(f"{settings.group_id}/model/")
    documents = [ModelCheckpoint.parse(raw) for raw in stored.values()]
    models = {document.model_key: OnlineGMM.from_dict(document.model) for document in documents}
    assert models["x"].n_seen == 3000 and models["y"].n_seen == len(y)
    for model in models.values():
        _close_to_centres(model.means_)


def test_replicated_model_refuses_outliers(broker):
    """--replicate: outliers are dead-lettered and never reach the statistics log; the model stays right."""
    topic = unique("outliers-replicated")
    values = _stream(3000, seed=3)
    settings = make_settings(broker, topic, max_records=len(values), replicate=True)
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, values)

    run_consumer(settings)

    _check_outputs(broker, settings, values, OUTLIERS)
    log = read_all(broker.bootstrap_servers, settings.topics["statistics"])
    assert sum(message["count"] for message in log) == 3000  # the 4 outliers never reach the statistics
    newcomer = ReplicatedLearner(settings.model_copy(update={"instance_id": "new"}), TopicStore(settings, sink=None))
    try:
        newcomer.finish()  # the latest shared checkpoint plus the rest of the log
    finally:
        newcomer.close()
    assert newcomer.state.model.n_seen == 3000
    _close_to_centres(newcomer.state.model.means_)


@pytest.mark.parametrize("threshold", ["inf"])
def test_regression_consumer_refuses_an_absurd_target_and_the_threshold_can_be_turned_off(broker, threshold):
    """--target: y = 1e6 among lines near 0-20 is dead-lettered; with --outlier-threshold inf it is learned,
    but y = 1e300 (too large for the statistics) is dead-lettered either way."""
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 10, 1000)
    y = np.where(rng.random(1000) < 0.5, 0.5 * x + 1.0, 1.5 * x + 2.0) + rng.normal(0, 0.1, 1000)
    values = [json.dumps({"a": float(a), "y": float(b)}).encode() for a, b in zip(x, y, strict=True)]
    values.insert(500, json.dumps({"a": 1.0, "y": 1e6}).encode())
    values.insert(700, json.dumps({"a": 1.0, "y": 1e300}).encode())
    for name, overrides, expected in (
        ("on", {}, {500: "outlier: squared distance", 700: "too large"}),
        ("off", {"outlier_threshold": threshold}, {700: "too large"}),
    ):
        topic = unique(f"outliers-regression-{name}")
        settings = make_settings(broker, topic, features=["a"], target="y", max_records=len(values), **overrides)
        ensure_topics(settings, input_partitions=1)
        produce(broker.bootstrap_servers, topic, values)
        run_consumer(settings)
        reasons = _check_outputs(broker, settings, values, expected)
        for offset, reason in expected.items():
            assert reason in reasons[offset], reasons[offset]
        model = OnlineRegressionMixture.from_dict(
            Checkpoint.parse(TopicStore(settings, sink=None).load(settings.checkpoint_key)).model
        )
        assert model.n_seen == len(values) - len(expected)


def _sensor_stream(n_before: int, n_after: int, seed: int = 5) -> list[bytes]:
    """A precise sensor (sd 0.001) at 2.0, then at 7.0 (5000 sd away); b ~ N(0, 1) throughout."""
    rng = np.random.default_rng(seed)
    level = np.concatenate([np.full(n_before, 2.0), np.full(n_after, 7.0)])
    a, b = level + rng.normal(0.0, 0.001, level.size), rng.normal(size=level.size)
    return [json.dumps({"a": float(x), "b": float(y)}).encode() for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize(("model_key", "shift"), [(None, 1200), ("sensor", 1190)])
def test_a_stream_that_moves_is_learned_again_not_dead_lettered_for_ever(broker, model_key, shift):
    """Reviewer's repro: a sd-0.001 sensor moving by 5 after 1,200 (or 1,190: 10 refusals end a poll of 300)
    records: at most batch_size = 50 dead letters (the refusals before the model re-warms), then the records
    are answered and learned again and the model's mean is the new level 7 within 0.001 (also per key with
    --model-key)."""
    topic = unique("outliers-moved")
    values = _sensor_stream(shift, 2400 - shift)
    if model_key is not None:
        values = [json.dumps({**json.loads(v), "sensor": "s"}).encode() for v in values]
    settings = make_settings(broker, topic, n_components=1, max_records=len(values), model_key=model_key)
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, values)

    polled: list[int] = []
    run_consumer(settings, on_batch=lambda progress: polled.append(progress.counters.records_in))
    assert 1200 in polled  # a poll ends at 1,200: the 1,190 case's refusals end it

    dead = read_all(broker.bootstrap_servers, settings.topics["dead_letter"])
    assignments = read_all(broker.bootstrap_servers, settings.topics["assignments"])
    assert 0 < len(dead) <= settings.batch_size
    assert all(d["source"]["offset"] >= shift for d in dead)
    assert len(assignments) + len(dead) == len(values)
    if model_key is None:
        document = Checkpoint.parse(TopicStore(settings, sink=None).load(settings.checkpoint_key)).model
    else:
        stored = TopicStore(settings, sink=None).load_prefix(f"{settings.group_id}/model/")
        (document,) = [ModelCheckpoint.parse(raw).model for raw in stored.values()]
    model = OnlineGMM.from_dict(document)
    assert model.is_warm
    assert model.means_[0, 0] == pytest.approx(7.0, abs=1e-3)


def test_an_outlier_among_a_fresh_models_first_20_records_is_dead_lettered(broker):
    """Reviewer's repro: a=1e5 at offset 3 of a fresh model's first 100 records: a dead letter, not an
    assignment (99 assigned)."""
    topic = unique("outliers-first-20")
    values = _stream(100, seed=8, outliers=False)
    values[3] = json.dumps({"a": 1e5, "b": 0.0}).encode()
    settings = make_settings(broker, topic, max_records=len(values))
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, values)

    counters = run_consumer(settings)

    reasons = _check_outputs(broker, settings, values, [3])
    assert "outlier: squared robust distance" in reasons[3]
    assert (counters.assigned, counters.dead_lettered) == (99, 1)

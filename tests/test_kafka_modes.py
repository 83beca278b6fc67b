"""The consumer's modes answer records the same way: they differ only in where statistics are learned."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

import streamem as se
from streamem.drift import WeightDriftDetector
from streamem.families.cold_kernels import cold_answers_each
from streamem_connectors.kafka.checkpoint import DirectoryStore, model_checkpoint, model_settings
from streamem_connectors.kafka.modes import make_learner
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.records import InputRecord
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import produce, read_all, unique
from tests.test_kafka_consumer import good_values, make_settings, stored_checkpoint


def _answers(broker, settings) -> dict[int, tuple]:
    """offset -> (component, probabilities, log-likelihood, n_seen) of every assignment."""
    return {
        r["source"]["offset"]: (r["component"], r["probabilities"], r["log_likelihood"], r["n_seen"])
        for r in read_all(broker.bootstrap_servers, settings.topics["assignments"])
    }


def test_the_three_modes_answer_a_single_partition_stream_identically(broker):
    """A single-partition stream whose records all carry one model key: the keyed consumer's and a single
    replica's assignments (components, responsibilities, log-likelihoods, n_seen) equal the instance
    consumer's, record by record, through the warm-up and 15 stepwise updates: the modes differ only in where
    statistics are learned (the replica reads its own statistics back before answering the next batch). The
    answers depend on how polls batch the records (each poll is answered, then learned), so the data are all
    there before the runs start, and each run polls them alike."""
    total = 1000
    values = [json.dumps({**json.loads(v), "site": "s"}).encode() for v in good_values(total, seed=3)]
    answers, cuts = [], []
    modes = (("instance", {}), ("keyed", {"model_key": "site"}), ("replicated", {"replicate": True}))
    for mode, overrides in modes:
        topic = unique(f"modes-{mode}")
        # polls of 173 records: mini-batches of 50 straddle them, and the first chunk of a poll completes a pool
        settings = make_settings(broker, topic, max_records=total, max_poll_records=173, **overrides)
        ensure_topics(settings, input_partitions=1)
        produce(broker.bootstrap_servers, topic, values)
        cuts.append([])
        run_consumer(settings, on_batch=lambda progress: cuts[-1].append(progress.counters.records_in))
        answers.append(_answers(broker, settings))
    assert cuts[0] == cuts[1] == cuts[2] and cuts[0][0] == 173  # polled alike, in polls of 173
    instance = answers[0]
    assert instance[total - 1][3] == total - 1  # the last record was answered by a model that learned the rest
    for (mode, _), other in zip(modes[1:], answers[1:], strict=True):
        assert sorted(other) == list(range(total)), mode
        for offset in range(total):
            assert instance[offset][0] == other[offset][0], (mode, offset)
            np.testing.assert_allclose(instance[offset][1], other[offset][1], rtol=1e-9, atol=1e-12)
            assert instance[offset][2:] == pytest.approx(other[offset][2:], rel=1e-9), (mode, offset)


def test_a_replicated_one_component_model_runs_and_reports_drift(broker):
    """`--replicate --n-components 1`: every record answered, the model warm, and the drift records carry two
    weights (the detector's second column stays 0), periodic ones included."""
    total = 1200
    topic = unique("replicated-one")
    settings = make_settings(broker, topic, replicate=True, n_components=1, max_records=total, drift_every=200)
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, good_values(total, seed=4))
    counters = run_consumer(settings)
    assert counters.assigned == total and counters.dead_lettered == 0
    answers = read_all(broker.bootstrap_servers, settings.topics["assignments"])
    assert sorted(r["source"]["offset"] for r in answers) == list(range(total))
    assert all(r["probabilities"] == [1.0] for r in answers)
    drifts = read_all(broker.bootstrap_servers, settings.topics["drift"])
    periodic = [d for d in drifts if not d["drift"]]
    assert periodic, drifts
    assert all(len(d["weights"]) == 2 and d["weights"][1] == 0.0 for d in periodic), periodic


def test_a_replica_stopped_during_its_warm_up_learns_every_record_once_after_a_restart(broker):
    """A replica stopped after 150 records (its warm-up takes 200) keeps them in its checkpoint: restarted to the
    end of 600 records, its model has learned 600, as the instance consumer's does."""
    learned = {}
    for mode, overrides in (("instance", {}), ("replicated", {"replicate": True})):
        topic = unique(f"warm-up-restart-{mode}")
        settings = make_settings(broker, topic, max_records=150, **overrides)
        ensure_topics(settings, input_partitions=1)
        produce(broker.bootstrap_servers, topic, good_values(600, seed=5))
        run_consumer(settings)
        run_consumer(settings.model_copy(update={"max_records": 450}))
        checkpoint = stored_checkpoint(settings)
        learned[mode] = (checkpoint.replica["model"] if mode == "replicated" else checkpoint.model)["n_seen"]
    assert learned == {"instance": 600, "replicated": 600}


def test_unreadable_statistics_messages_are_skipped_not_fatal(broker):
    """Messages on the statistics log that are not JSON, not an object, without sources, with an absurd count,
    or with statistics of no record are skipped (logged); the replica answers and learns every record once."""
    total = 600
    topic = unique("replicated-bad-log")
    settings = make_settings(broker, topic, replicate=True, max_records=total)
    ensure_topics(settings, input_partitions=1)
    good = {"kind": "update", "origin": "x", "sequence": 1, "count": 5, "sources": [], "statistics": {}}
    zero = {
        "type": "GaussianStats",
        "shift": [0.0, 0.0],
        "mass": [0.0, 0.0],
        "first": [[0.0] * 2] * 2,
        "second": [[0.0] * 3] * 2,
    }
    bad = [
        b"not json",
        b"[]",
        json.dumps({**good, "sources": None}).encode(),
        json.dumps({**good, "count": 1e308}).encode(),
        json.dumps({**good, "statistics": zero}).encode(),
        json.dumps({**good, "sources": [{"topic": topic, "partition": 0, "from": 5, "to": 2}]}).encode(),
    ]
    produce(broker.bootstrap_servers, settings.topics["statistics"], bad)
    produce(broker.bootstrap_servers, topic, good_values(total, seed=6))
    counters = run_consumer(settings)
    assert counters.assigned == total
    assert stored_checkpoint(settings).replica["model"]["n_seen"] == total


@pytest.mark.parametrize("target", [None, "b"], ids=["mixture", "regression"])
def test_each_keys_model_answers_as_an_instance_model_fed_only_that_keys_records(broker, tmp_path, monkeypatch, target):
    """Polls mixing 12 keys (about four records of a key a poll), with outliers and an undecodable record: each
    key's outputs (assignments without their model key, dead letters, drift records) and its model equal
    those of an instance learner fed only that key's records, poll for poll, through the warm-up (where a
    poll's cold keys are answered and learned together: Gaussian mixtures mostly in one compiled call for
    all, regression mixtures one by one) and after it."""
    compiled = []
    monkeypatch.setattr(
        se.online_gmm, "cold_answers_each", lambda *a: compiled.append(len(a[3]) - 1) or cold_answers_each(*a)
    )
    topic = unique("keyed-vs-instance")
    common = dict(warmup=30, batch_size=10, drift_every=25, checkpoint_dir=str(tmp_path))
    if target is not None:
        common.update(features=["a"], target=target)
    keyed_settings = make_settings(broker, topic, model_key="site", **common)
    ensure_topics(keyed_settings, input_partitions=2)
    keyed = make_learner(keyed_settings, DirectoryStore(tmp_path))
    warm_ups = []  # how many cold models answer_warm_ups took, call by call
    answer_warm_ups = keyed.answer_warm_ups
    monkeypatch.setattr(
        keyed, "answer_warm_ups", lambda groups, values: warm_ups.append(len(groups)) or answer_warm_ups(groups, values)
    )
    instances = {}
    rng = np.random.default_rng(8)
    offsets = [0, 0]
    for _ in range(25):
        poll = []
        for _ in range(48):
            site = int(rng.integers(12))
            partition = site % 2
            a, b = (rng.normal(size=2) + [0.0, 4.0 * (site % 3)]).tolist()
            if rng.random() < 0.02:
                b += 1e7  # an outlier for the key's screen
            value = orjson.dumps({"a": a, "b": b, "site": f"s{site}"})
            if rng.random() < 0.01:
                value = value[:-3]  # undecodable: a dead letter in either mode
            poll.append(InputRecord(topic, partition, offsets[partition], f"s{site}".encode(), value))
            offsets[partition] += 1
        outputs = keyed.process(poll)
        drifts = {}
        for output in outputs[len(poll) :]:
            drifts.setdefault(orjson.loads(output.value)["model_key"], []).append(output)
        for site in {r.key.decode() for r in poll}:
            instance = instances.get(site)
            if instance is None:
                settings = make_settings(broker, topic, group_id=f"{topic}-{site}", instance_id=site, **common)
                instance = instances[site] = make_learner(settings, DirectoryStore(tmp_path))
            mine = [j for j, r in enumerate(poll) if r.key.decode() == site]
            expected = instance.process([poll[j] for j in mine])
            got = [outputs[j] for j in mine] + drifts.get(site, [])
            assert len(got) == len(expected)
            for output, want in zip(got, expected, strict=True):
                body, want_body = orjson.loads(output.value), orjson.loads(want.value)
                assert output.topic == want.topic
                # a keyed drift record is keyed by its model's key, as its body names it
                assert output.key == (site.encode() if output.topic == keyed.topics["drift"] else want.key)
                if "model_key" in body and "error" not in body:
                    assert body.pop("model_key") == site
                assert body == want_body
    for site, instance in instances.items():
        assert keyed.models[site].model.to_dict() == instance.state.model.to_dict(), site
        assert keyed.models[site].detector.to_dict() == instance.state.detector.to_dict(), site
    assert all(state.model.is_warm for state in keyed.models.values())
    assert keyed.counters.dead_lettered > 0
    assert sum(warm_ups) > 60  # of about 90 cold key batches
    assert sum(compiled) > 50 if target is None else not compiled


def test_a_restored_cold_key_model_takes_this_runs_threshold_and_another_shape_answers_alone(broker, tmp_path):
    """Key models restored cold: one written under the default --outlier-threshold refuses what this run's
    threshold (10) refuses, and one of an older checkpoint (no settings) with 3 components, polled beside a
    fresh 2-component key, answers alone instead of stopping the poll."""
    topic = unique("keyed-restored")
    settings = make_settings(broker, topic, model_key="site", checkpoint_dir=str(tmp_path), outlier_threshold=10.0)
    ensure_topics(settings, input_partitions=1)
    rng = np.random.default_rng(3)
    store = DirectoryStore(tmp_path)
    documents = []
    for key, n_components, written in (("default", 2, model_settings(settings)), ("older", 3, None)):
        model = se.OnlineGMM(n_components, features=("a", "b"), warmup=200, batch_size=50, outliers="skip")
        model.learn_many(rng.normal(size=(25, 2)))  # cold, with its warm-up reference (threshold 1e6)
        detector = WeightDriftDetector(max(2, n_components)).to_dict()
        document = model_checkpoint(key, model.to_dict(), detector, {}, written)
        documents.append((f"{settings.group_id}/model/{key}", document))
    store.save_all(documents)
    learner = make_learner(settings, store)

    def record(offset, site, a, b):
        return InputRecord(topic, 0, offset, site.encode(), orjson.dumps({"a": a, "b": b, "site": site}))

    poll = [record(0, "default", 8.0, 0.0), record(1, "older", 0.1, 0.2), record(2, "fresh", 0.3, 0.1)]
    outputs = [orjson.loads(output.value) for output in learner.process(poll)]
    assert "error" in outputs[0] and "threshold 10" in outputs[0]["error"]  # squared robust distance ~64 > 10
    assert len(outputs[1]["probabilities"]) == 3 and len(outputs[2]["probabilities"]) == 2
    assert learner.models["older"].model.n_seen == 26 and learner.models["fresh"].model.n_seen == 1


def _polls(topic: str, n_polls: int = 12, size: int = 37) -> list:
    """Polls of two partitions through a warm-up that ends mid-poll, a stream that moves (outliers, then a
    re-warm), undecodable records and keys of every kind."""
    from streamem_connectors.kafka.records import InputBatch

    rng, offset, polls = np.random.default_rng(0), 0, []
    for b in range(n_polls):
        points = rng.normal(size=(size, 2)) + (0.0 if b < 6 else 30.0)
        values = [orjson.dumps({"a": a, "b": c, "site": "st"[j % 2]}) for j, (a, c) in enumerate(points.tolist())]
        if b % 4 == 3:
            values[5] = b"not json"
        keys = [None if i % 3 else b"k%d" % i for i in range(size)]
        polls.append(InputBatch(topic, [i % 2 for i in range(size)], list(range(offset, offset + size)), keys, values))
        offset += size
    return polls


@pytest.mark.parametrize("mode", [{}, {"model": "hmm"}, {"model_key": "site"}])
def test_a_learner_answers_a_batch_view_as_its_records(broker, tmp_path, mode):
    """A poll handed over as its columns' view (`InputBatch.records_view`, as the model process hands it) is
    answered byte for byte as the same poll's `InputRecord`s are: assignments, dead letters (undecodable and
    refused by the outlier screen), drift records, through a warm-up that ends mid-poll and a re-warm."""
    topic = unique("view")
    settings = make_settings(broker, topic, warmup=50, batch_size=16, drift_every=40, outlier_threshold=4.0, **mode)
    ensure_topics(settings, input_partitions=2)
    outputs = {}
    for way in ("records", "view"):
        learner = make_learner(settings, DirectoryStore(tmp_path / way))
        outputs[way] = []
        for poll in _polls(topic):
            batch = poll.decoded_by(learner.decoder)
            records = batch.records_view() if way == "view" else batch.records()
            outputs[way].append(learner.process(records, batch.decoded))
    assert outputs["view"] == outputs["records"]
    topics = {output.topic for poll in outputs["view"] for output in poll}
    assert {settings.topics["assignments"], settings.topics["dead_letter"], settings.topics["drift"]} <= topics


def test_the_instance_learner_makes_each_record_of_a_view_at_most_once_a_poll(broker, tmp_path, monkeypatch):
    """The view's records are made only where one is needed, and then all at once (one pass in C), never one
    Python call per record nor twice a poll: a clean poll of a warm model makes none; a poll with outliers, a
    warm-up that ends within it or a drift event makes them at most once."""
    from streamem_connectors.kafka.records import BatchRecords

    made = []
    whole, one = BatchRecords.__iter__, BatchRecords.__getitem__
    monkeypatch.setattr(BatchRecords, "__iter__", lambda view: made.append("all") or whole(view))
    monkeypatch.setattr(BatchRecords, "__getitem__", lambda view, i: made.append("one") or one(view, i))
    topic = unique("view-once")
    settings = make_settings(broker, topic, warmup=50, batch_size=16, drift_every=40, outlier_threshold=4.0)
    ensure_topics(settings, input_partitions=2)
    learner = make_learner(settings, DirectoryStore(tmp_path))
    for poll in _polls(topic, n_polls=14):
        made.clear()
        batch = poll.decoded_by(learner.decoder)
        learner.process(batch.records_view(), batch.decoded)
        assert made.count("all") <= 1 and made.count("one") <= 3, made
    # clean polls of a warm model (the stream as it was: the default screen)
    learner = make_learner(settings.model_copy(update={"outlier_threshold": 1e6}), DirectoryStore(tmp_path / "clean"))
    for poll in _polls(topic, n_polls=6):
        made.clear()
        batch = poll.decoded_by(learner.decoder)
        learner.process(batch.records_view(), batch.decoded)
    assert learner.state.model.is_warm and not batch.decoded.errors
    assert made.count("all") + made.count("one") <= 1, made  # a periodic drift record's, if one is due

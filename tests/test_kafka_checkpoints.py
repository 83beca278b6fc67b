"""Resuming from checkpoints on the embedded broker: refusals that name what is wrong, --reset-model, --max-records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamem_connectors.kafka.checkpoint import CheckpointError, DirectoryStore, PartitionOffset, TopicStore
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import produce, read_all, unique
from tests.test_kafka_consumer import good_values, make_settings, offsets_of


def _cli(settings, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "streamem", "run", "--bootstrap-servers", settings.bootstrap_servers]
    args += ["--input-topic", settings.input_topic, "--group-id", settings.group_id, "--features", "a,b"]
    args += ["--n-components", "2", "--warmup", "200", "--batch-size", "50", "--poll-timeout-ms", "200", *extra]
    return subprocess.run(
        args, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def _one_line_refusal(result: subprocess.CompletedProcess) -> str:
    """The refusal line on stderr (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("streamem run: ")]
    return line


@pytest.fixture
def learned_400(broker, tmp_path):
    """A group whose first run learned and committed 400 of 800 records, checkpointed in tmp_path/first."""
    topic = unique("resume")
    settings = make_settings(broker, topic, max_records=400, checkpoint_dir=tmp_path / "first", model_process=False)
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, good_values(800))
    run_consumer(settings)
    return settings


def test_committed_offsets_without_checkpoint_refuse_unless_reset(learned_400, tmp_path):
    """Committed offsets but no checkpoint (another --checkpoint-dir): exit 2 naming group, offsets and where;
    --reset-model starts a fresh model at the committed offsets, with a warning."""
    other = tmp_path / "other"
    line = _one_line_refusal(_cli(learned_400, "--checkpoint-dir", str(other), "--max-records", "100"))
    assert repr(learned_400.group_id) in line and f"{learned_400.input_topic}[0]=400" in line
    assert str(other) in line and "--reset-model" in line

    reset = _cli(learned_400, "--checkpoint-dir", str(other), "--max-records", "400", "--reset-model")
    assert reset.returncode == 0, reset.stderr
    assert "WARNING" in reset.stderr and "fresh model starts at the group's committed offsets" in reset.stderr
    saved = json.loads(next(other.glob("*.json")).read_text())
    assert saved["model"]["n_seen"] == 400 and saved["offsets"][0]["offset"] == 800


def test_a_tombstone_on_the_state_topic_reads_as_no_checkpoint(broker):
    """A tombstone for <group>/<instance> on the state topic: the consumer refuses, naming topic and key."""
    topic = unique("tombstone")
    settings = make_settings(broker, topic, max_records=300, model_process=False)
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, good_values(600))
    run_consumer(settings)
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    producer.send(settings.topics["state"], key=settings.checkpoint_key.encode(), value=None).get(timeout=30)
    producer.close()
    with pytest.raises(CheckpointError) as refused:
        run_consumer(settings)  # in the model process: the refusal crosses the pipe as one message
    message = str(refused.value)
    assert f"state topic {settings.topics['state']!r} key {settings.checkpoint_key!r}" in message
    assert f"{topic}[0]=300" in message


def test_changed_model_settings_are_refused_naming_each_difference(learned_400):
    """A K=2 full checkpoint resumed with K=3, diag, batch 7: refused naming the three; --reset-model starts fresh."""
    changed = learned_400.model_copy(update={"n_components": 3, "covariance_type": "diag", "batch_size": 7})
    with pytest.raises(CheckpointError) as refused:
        run_consumer(changed)
    message = str(refused.value)
    assert "n_components: checkpoint 2, flags 3" in message
    assert "covariance_type: checkpoint 'full', flags 'diag'" in message
    assert "batch_size: checkpoint 50, flags 7" in message
    assert "warmup" not in message  # only what differs

    run_consumer(changed.model_copy(update={"reset_model": True, "max_records": 400}))
    saved = json.loads(next((learned_400.checkpoint_dir).glob("*.json")).read_text())
    assert saved["model"]["params"]["n_components"] == 3 and saved["model"]["n_seen"] == 400


def _edit_checkpoint(settings, edit) -> str:
    (path,) = settings.checkpoint_dir.glob("*.json")
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    return str(path)


def test_an_offset_past_the_end_is_refused_not_idled_on(learned_400):
    """Checkpoint offset 10**9 on an 800-record partition: refused naming partition, offset and end."""
    _edit_checkpoint(learned_400, lambda d: d["offsets"][0].update(offset=10**9))
    with pytest.raises(
        CheckpointError, match=rf"offset 1000000000 for {learned_400.input_topic}\[0\] is past its end 800"
    ):
        run_consumer(learned_400.model_copy(update={"max_records": 10}))


def test_offsets_of_another_topic_are_refused(learned_400):
    """Offsets for another topic or a missing partition mean another input's checkpoint: refused, naming them."""

    def edit(document):
        document["offsets"] = [
            {"topic": "elsewhere", "partition": 0, "offset": 5},
            {"topic": learned_400.input_topic, "partition": 3, "offset": 7},
        ]

    _edit_checkpoint(learned_400, edit)
    with pytest.raises(CheckpointError) as refused:
        run_consumer(learned_400.model_copy(update={"max_records": 10}))
    assert "offsets of topic 'elsewhere', not of the input topic" in str(refused.value)
    assert f"{learned_400.input_topic}[3], which does not exist (the topic has 1 partitions)" in str(refused.value)


def test_an_offset_before_the_first_record_resumes_at_the_first():
    """Offsets below a partition's first offset (deleted by retention) resume there; above the end are problems."""
    from streamem_connectors.kafka.clients import InputPositions
    from streamem_connectors.kafka.resume import check_resume
    from streamem_connectors.kafka.settings import ConsumerSettings

    settings = ConsumerSettings(features=["a"], input_topic="t")
    positions = InputPositions("t", {0: (100, 500), 1: (0, 50)}, {})
    resume = check_resume(settings, "here", None, [PartitionOffset(topic="t", partition=0, offset=7)], positions)
    assert resume == {("t", 0): 100}
    with pytest.raises(CheckpointError, match=r"offset 51 for t\[1\] is past its end 50"):
        check_resume(settings, "here", None, [PartitionOffset(topic="t", partition=1, offset=51)], positions)


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [
        (lambda d: d["detector"].pop("params"), "detector.params", "is missing"),
        (lambda d: d["counters"].update(bogus=1), "counters.bogus", "is not expected"),
        (lambda d: d["counters"].pop("assigned"), "counters.assigned", "is missing"),
        (lambda d: d["detector"].update(short=[[0.5]]), "detector", "wrong shape"),
        (lambda d: d["model"].pop("n_seen"), "model.n_seen", "is missing"),
    ],
)
def test_a_bad_checkpoint_names_its_file_and_field(learned_400, edit, field, problem):
    """A bad detector section or counters: CheckpointError naming the file and the field (no KeyError/TypeError)."""
    path = _edit_checkpoint(learned_400, edit)
    with pytest.raises(CheckpointError) as refused:
        run_consumer(learned_400)
    message = str(refused.value)
    assert message.startswith(f"checkpoint file {path}: field {field!r}") and problem in message, message


def test_a_bad_checkpoint_stops_the_cli_with_one_line(learned_400):
    """streamem run on a bad checkpoint exits 2 with one line on stderr naming file and field, no traceback."""
    path = _edit_checkpoint(learned_400, lambda d: d["detector"].pop("params"))
    line = _one_line_refusal(_cli(learned_400, "--checkpoint-dir", str(learned_400.checkpoint_dir)))
    assert line.startswith(f"streamem run: checkpoint file {path}: field 'detector.params' is missing")


def test_max_records_counts_this_run_only(learned_400):
    """--max-records 400 after a 400-record run learns 400 more (not 0); progress counts this run's records."""
    progress = []
    counters = run_consumer(learned_400, on_batch=progress.append)
    assert counters.records_in == 800
    assert progress[0].records_this_run <= learned_400.max_poll_records
    assert progress[-1].records_this_run == 400
    saved = json.loads(next(learned_400.checkpoint_dir.glob("*.json")).read_text())
    assert saved["model"]["n_seen"] == 800
    assignments = read_all(learned_400.bootstrap_servers, learned_400.topics["assignments"])
    assert sorted(offsets_of(assignments)) == [(0, offset) for offset in range(800)]


def test_the_checkpoint_validates_exactly_the_consumers_counters():
    """The checkpoint's counters section has the same names as the consumer's Counters (missing/extra refused)."""
    import dataclasses

    from streamem_connectors.kafka.checkpoint import CountersDocument
    from streamem_connectors.kafka.learner import Counters

    assert set(CountersDocument.model_fields) == {field.name for field in dataclasses.fields(Counters)}


def test_keyed_models_refuse_other_settings_and_reset_each_model(keyed_600, tmp_path):
    """--model-key: counters checkpoint with K=2 resumed with K=3 is refused; with --reset-model each key's model
    starts fresh (and is stored with K=3)."""
    settings = keyed_600
    changed = settings.model_copy(update={"n_components": 3})
    with pytest.raises(CheckpointError, match="n_components: checkpoint 2, flags 3") as refused:
        run_consumer(changed)
    assert str(tmp_path) in str(refused.value)

    run_consumer(changed.model_copy(update={"reset_model": True}))
    models = [json.loads(p.read_text()) for p in tmp_path.glob("*model*.json")]
    assert len(models) == 2 and all(m["model"]["params"]["n_components"] == 3 for m in models)
    assert sum(m["model"]["n_seen"] for m in models) == 600  # the fresh models learned this run's records only


@pytest.mark.parametrize("model_key", ["s" * 256, "κ" * 256, "a/b%c+d~e" * 40])
def test_directory_store_keeps_long_keys(tmp_path, model_key):
    """A key whose quoted file name would pass the file system's 255-byte limit is stored, found by
    prefix and loaded back (a 256-character model key gave 'File name too long' at a checkpoint)."""
    store = DirectoryStore(tmp_path)
    key = f"group/model/{model_key}"
    store.save_all([(key, b'{"long": true}'), ("group/model/short", b'{"short": true}'), ("group/0", b"{}")])
    assert store.load(key) == b'{"long": true}'
    assert store.load_prefix("group/model/") == {key: b'{"long": true}', "group/model/short": b'{"short": true}'}
    assert all(len(path.name.encode()) <= 255 for path in tmp_path.iterdir())


# -- a missing checkpoint is judged per partition ----------------------------------------------------
def _two_partition_group(broker, tmp_path, name: str):
    """A two-partition input of 600 records, all learned and committed by instance 'a' (checkpoint in tmp_path)."""
    topic = unique(name)
    settings = make_settings(
        broker, topic, max_records=600, checkpoint_dir=tmp_path, model_process=False, instance_id="a"
    )
    ensure_topics(settings, input_partitions=2)
    produce(broker.bootstrap_servers, topic, good_values(600), keys=[str(i % 2).encode() for i in range(600)])
    run_consumer(settings)
    return settings


def test_a_partition_no_visible_checkpoint_learned_is_refused(broker, tmp_path):
    """Committed partitions 0 and 1, and the only other checkpoint covers partition 0: a newcomer is refused,
    naming partition 1 (it was a fresh start with a warning because *some* other checkpoint existed)."""
    settings = _two_partition_group(broker, tmp_path, "uncovered")
    store = DirectoryStore(tmp_path)
    document = json.loads(store.load(f"{settings.group_id}/a"))
    document["key"] = f"{settings.group_id}/b"
    document["offsets"] = [o for o in document["offsets"] if o["partition"] == 0]
    store.save_all([(f"{settings.group_id}/b", json.dumps(document).encode())])
    store._path(f"{settings.group_id}/a").unlink()
    newcomer = settings.model_copy(update={"instance_id": "c", "max_records": 10})
    with pytest.raises(CheckpointError) as refused:
        run_consumer(newcomer)
    message = str(refused.value)
    assert f"{settings.input_topic}[1]" in message and f"{settings.input_topic}[0]" not in message, message
    assert "--reset-model" in message


def test_a_renamed_instance_starts_fresh_where_another_checkpoint_covers_every_partition(broker, tmp_path, caplog):
    """Instance 'a' renamed 'b': every committed partition was learned by the checkpoint of 'a', so 'b' starts a
    fresh model of its own at the committed offsets, with a WARNING that names the checkpoint it does not use."""
    settings = _two_partition_group(broker, tmp_path, "renamed")
    produce(broker.bootstrap_servers, settings.input_topic, good_values(100), keys=[b"0"] * 100)
    renamed = settings.model_copy(update={"instance_id": "b", "max_records": 100})
    with caplog.at_level("WARNING", logger="streamem_connectors.kafka"):
        run_consumer(renamed)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"{settings.group_id}/a" in warning and "starts fresh" in warning, warning
    saved = json.loads(DirectoryStore(tmp_path).load(f"{settings.group_id}/b"))
    assert saved["model"]["n_seen"] == 100


# -- keyed models are checked when the consumer starts ---------------------------------------------
@pytest.fixture
def keyed_600(broker, tmp_path):
    """--model-key: 600 records of keys 0 and 1 learned and checkpointed in tmp_path; 600 more waiting."""
    topic = unique("keyedcheck")
    settings = make_settings(
        broker, topic, max_records=600, model_key="id_mod", checkpoint_dir=tmp_path, model_process=False, warmup=50
    )
    ensure_topics(settings, input_partitions=1)
    values = [json.dumps({**json.loads(v), "id_mod": i % 2}).encode() for i, v in enumerate(good_values(1200))]
    produce(broker.bootstrap_servers, topic, values)
    run_consumer(settings)
    return settings


def _edit_key(settings, key: str, edit) -> str:
    store = DirectoryStore(settings.checkpoint_dir)
    name = f"{settings.group_id}/model/{key}"
    document = json.loads(store.load(name))
    edit(document)
    store.save_all([(name, json.dumps(document).encode())])
    return str(store._path(name))


def test_a_key_model_learned_past_the_end_is_refused_at_start(keyed_600):
    """A key model with learned_through 10**9 (it would never learn again) is refused at start naming its file
    and field; --reset-model starts that key fresh with a warning."""
    path = _edit_key(keyed_600, "1", lambda d: d["learned_through"][0].update(offset=10**9))
    with pytest.raises(CheckpointError) as refused:
        run_consumer(keyed_600.model_copy(update={"max_records": 10}))
    message = str(refused.value)
    assert message.startswith(f"checkpoint file {path}: field 'learned_through'"), message
    assert "past its end 1200" in message

    run_consumer(keyed_600.model_copy(update={"reset_model": True}))
    model = json.loads(DirectoryStore(keyed_600.checkpoint_dir).load(f"{keyed_600.group_id}/model/1"))
    assert model["model"]["n_seen"] == 300 and model["learned_through"][0]["offset"] == 1200


def test_a_bad_key_model_is_refused_before_any_record(keyed_600):
    """A key model whose document is bad is refused at start, even when none of its records come in this run."""
    path = _edit_key(keyed_600, "1", lambda d: d["model"].pop("n_seen"))
    with pytest.raises(CheckpointError) as refused:
        run_consumer(keyed_600.model_copy(update={"max_records": 0}))
    assert str(refused.value).startswith(f"checkpoint file {path}: field 'model.n_seen' is missing")


# -- which setting differences matter -------------------------------------------------------------
def test_a_setting_the_checkpoint_did_not_record_is_no_difference(learned_400):
    """A checkpoint written before a setting existed (its name absent from `settings`) resumes: only recorded
    names are compared."""
    _edit_checkpoint(learned_400, lambda d: d["settings"].pop("step_floor"))
    counters = run_consumer(learned_400)
    assert counters.records_in == 800


def test_seed_and_warmup_do_not_matter_to_a_warm_model(learned_400):
    """A warm model resumed with another seed and warm-up length resumes (they act only before warm-up ends)."""
    counters = run_consumer(learned_400.model_copy(update={"seed": 7, "warmup": 300}))
    assert counters.records_in == 800


def test_warmup_is_refused_for_a_cold_model(broker, tmp_path):
    """A model still in warm-up (100 of 200 records) resumed with --warmup 300 is refused: the warm-up it
    would finish is the checkpoint's."""
    topic = unique("cold")
    settings = make_settings(broker, topic, max_records=100, checkpoint_dir=tmp_path, model_process=False)
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, good_values(300))
    run_consumer(settings)
    with pytest.raises(CheckpointError, match="warmup: checkpoint 200, flags 300"):
        run_consumer(settings.model_copy(update={"warmup": 300}))


def test_features_in_another_order_are_the_same_model(learned_400):
    """--features b,a resumes a model written with a,b: the model maps features by name, so its means keep
    their columns (the feature 'a' mean stays the data's 'a' mean)."""
    before = json.loads(next(learned_400.checkpoint_dir.glob("*.json")).read_text())
    run_consumer(learned_400.model_copy(update={"features": ["b", "a"]}))
    after = json.loads(next(learned_400.checkpoint_dir.glob("*.json")).read_text())
    assert after["model"]["n_seen"] == 800
    import numpy as np

    values = np.array([[json.loads(v)["a"], json.loads(v)["b"]] for v in good_values(800)])
    import streamem as se

    model = se.OnlineGMM.from_dict(after["model"])
    np.testing.assert_allclose(model.weights_ @ model.means_, values.mean(axis=0), atol=0.5)
    assert before["model"]["features"] == after["model"]["features"]


def test_features_in_another_order_are_another_replicated_model():
    """With --replicate the statistics log holds rows by position: another feature order is a difference."""
    from streamem_connectors.kafka.checkpoint import model_settings
    from streamem_connectors.kafka.resume import settings_differences
    from streamem_connectors.kafka.settings import ConsumerSettings

    written = model_settings(ConsumerSettings(features=["a", "b"], replicate=True))
    assert settings_differences(written, ConsumerSettings(features=["b", "a"], replicate=True), warm=True)
    assert not settings_differences(written, ConsumerSettings(features=["a", "b"], replicate=True), warm=True)


# -- start-up failures are one line ----------------------------------------------------------------
def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_input_positions_and_the_sink_say_an_unreachable_broker_in_one_line():
    """input_positions, the kafka-python sink and the state-topic store, with no broker: BrokerUnreachable (the
    topics.py message) within about connect_timeout_s (were a 30 s TimeoutError and raw client errors)."""
    import time

    from streamem_connectors.kafka.clients import input_positions, make_sink
    from streamem_connectors.kafka.settings import ConsumerSettings
    from streamem_connectors.kafka.topics import BrokerUnreachable

    settings = ConsumerSettings(
        features=["a"], input_topic="t", bootstrap_servers=f"127.0.0.1:{_closed_port()}", connect_timeout_s=1
    )
    def state_topic(settings):
        return TopicStore(settings, sink=None).load_prefix("group/")

    for lookup in (make_sink, input_positions, state_topic):
        start = time.monotonic()
        with pytest.raises(BrokerUnreachable, match="cannot reach the Kafka bootstrap servers .* within 1 s"):
            lookup(settings)
        assert time.monotonic() - start < 10, lookup


def test_the_model_process_says_an_unreachable_broker_in_one_line():
    """run_consumer in a model process with no broker: BrokerUnreachable with one line, not LearnerFailed
    carrying a traceback."""
    from streamem_connectors.kafka.settings import ConsumerSettings
    from streamem_connectors.kafka.topics import BrokerUnreachable

    settings = ConsumerSettings(
        features=["a"], input_topic="t", bootstrap_servers=f"127.0.0.1:{_closed_port()}", connect_timeout_s=1
    )
    with pytest.raises(BrokerUnreachable) as unreachable:
        run_consumer(settings)
    assert "\n" not in str(unreachable.value) and "Traceback" not in str(unreachable.value)


def test_a_refused_replica_is_told_what_to_do(broker, tmp_path):
    """A replica refused for its checkpoint's settings names the remedy (--reset-model is not allowed with
    --replicate): restore the flag, or a new group and statistics topic."""
    topic = unique("replica")
    settings = make_settings(
        broker, topic, max_records=400, replicate=True, checkpoint_dir=tmp_path, model_process=False, warmup=200
    )
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, good_values(800))
    run_consumer(settings)
    with pytest.raises(CheckpointError) as refused:
        run_consumer(settings.model_copy(update={"n_components": 3, "max_records": 10}))
    message = str(refused.value)
    assert "n_components: checkpoint 2, flags 3" in message
    assert "--n-components 2" in message and "new --group-id and --statistics-topic" in message, message


def test_a_replica_refused_for_its_offsets_is_told_which_key_to_delete(broker, tmp_path):
    """A replica whose own checkpoint has an offset past the end is told to delete that key (the replica then
    rebuilds from the group's replica checkpoint and the statistics log)."""
    topic = unique("replicaoff")
    settings = make_settings(
        broker, topic, max_records=400, replicate=True, checkpoint_dir=tmp_path, model_process=False, warmup=200
    )
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, good_values(800))
    run_consumer(settings)
    store = DirectoryStore(tmp_path)
    document = json.loads(store.load(settings.checkpoint_key))
    document["offsets"][0]["offset"] = 10**9
    store.save_all([(settings.checkpoint_key, json.dumps(document).encode())])
    with pytest.raises(CheckpointError) as refused:
        run_consumer(settings.model_copy(update={"max_records": 10}))
    message = str(refused.value)
    assert "past its end 800" in message and f"delete {store.where(settings.checkpoint_key)}" in message, message


@pytest.mark.parametrize("warm", [False, True])
def test_a_keyed_models_document_written_fast_reads_back_as_the_validated_one(warm):
    """`model_checkpoint` (a keyed model's document without pydantic's validation on write: thousands a
    checkpoint) reads back equal to the document pydantic validates and dumps, for a cold and a warm model
    with a detector that has seen records."""
    import numpy as np

    from streamem import OnlineGMM
    from streamem.drift import WeightDriftDetector
    from streamem_connectors.kafka.checkpoint import CHECKPOINT_VERSION, ModelCheckpoint, model_checkpoint

    rng = np.random.default_rng(1)
    model = OnlineGMM(2, features=("a", "b"), warmup=50, batch_size=20, seed=0)
    model.learn_many(rng.normal(size=(80 if warm else 30, 2)))
    detector = WeightDriftDetector(2)
    detector.update_many(np.full((40, 2), 0.5))
    through = {("in", 1): 812, ("in", 0): 7}
    settings = {"model": "gmm", "features": ["a", "b"], "n_components": 2, "seed": 0, "target": None}
    fast = model_checkpoint("site-1", model.to_dict(), detector.to_dict(), through, settings)
    validated = ModelCheckpoint(
        version=CHECKPOINT_VERSION,
        model_key="site-1",
        model=model.to_dict(),
        detector=detector.to_dict(),
        learned_through=[PartitionOffset(topic=t, partition=p, offset=o) for (t, p), o in sorted(through.items())],
        settings=settings,
    ).dump()
    assert ModelCheckpoint.parse(fast) == ModelCheckpoint.parse(validated)
    assert OnlineGMM.from_dict(ModelCheckpoint.parse(fast).model).to_dict() == model.to_dict()


def test_a_keyed_models_document_with_a_detector_that_is_not_finite_is_refused_naming_the_key():
    """A keyed model's document whose drift detector holds a NaN or an infinity is refused on write, naming
    the key (JSON would store null, which a restart then refuses, replacing the last good document)."""
    from streamem.drift import WeightDriftDetector
    from streamem_connectors.kafka.checkpoint import model_checkpoint

    for bad in (float("nan"), float("inf")):
        detector = WeightDriftDetector(2).to_dict()
        detector["short"][1][0] = bad
        with pytest.raises(ValueError, match="'site-7'.*detector.*not finite"):
            model_checkpoint("site-7", {}, detector, {("in", 0): 3}, None)


@pytest.mark.parametrize("in_child", [True, False])
def test_a_checkpoint_stored_while_the_next_batch_is_answered_covers_only_the_batches_before_it(broker, in_child):
    """The loop stores a checkpoint (documents built by the model process, sent from the loop's process)
    while the model process answers the batch polled after it: that checkpoint's model and offsets are
    those of the batches before it, and the next checkpoint's include the batch."""
    from streamem_connectors.kafka.model_process import AnswererHandle
    from streamem_connectors.kafka.records import InputBatch
    from tests.test_kafka_consumer import stored_checkpoint

    topic = unique("ckpt-then")
    settings = make_settings(broker, topic, warmup=100)
    ensure_topics(settings, input_partitions=1)
    values = good_values(300)

    def batch(start: int, stop: int) -> InputBatch:
        return InputBatch(topic, [0] * (stop - start), list(range(start, stop)), [None] * (stop - start),
                          values[start:stop])

    handle = AnswererHandle(settings, in_child=in_child)
    try:
        first, then = batch(0, 200), batch(200, 300)
        handle.submit(handle.decoded(first))
        handle.advance(first.next_offsets())
        handle.request_checkpoint()
        handle.collect()
        documents = handle.checkpoint_documents()
        handle.submit(handle.decoded(then))  # answered while the checkpoint is stored
        handle.advance(then.next_offsets())
        handle.store(documents)
        stored = stored_checkpoint(settings)
        assert [(o.partition, o.offset) for o in stored.offsets] == [(0, 200)]
        assert stored.model["n_seen"] == 200 and stored.counters.records_in == 200
        assert handle.collect().counters["records_in"] == 300
        handle.request_checkpoint()
        handle.store(handle.checkpoint_documents())
        stored = stored_checkpoint(settings)
        assert [(o.partition, o.offset) for o in stored.offsets] == [(0, 300)]
        assert stored.model["n_seen"] == 300
    finally:
        handle.close()


def test_a_rebalance_at_any_poll_answers_every_record_once_and_learns_it_once(broker, monkeypatch):
    """Every poll that may find records already fetched (timeout 0: between batches, and around a checkpoint)
    also runs an eager rebalance that takes every partition away and gives it back: the loop's books say
    where each partition resumes, so every record is answered exactly once and learned exactly once."""
    from kafka import TopicPartition

    from streamem_connectors.kafka import pipeline

    topic = unique("rebalance-every-poll")
    settings = make_settings(
        broker, topic, max_records=900, max_poll_records=40, checkpoint_every=100, model_process=False
    )
    ensure_topics(settings, input_partitions=2)
    produce(broker.bootstrap_servers, topic, good_values(900))
    real_make_source = pipeline.make_source
    rebalances = []

    def make_source(settings, start_offsets, revoked):
        source = real_make_source(settings, start_offsets, revoked)
        real_poll = source.poll

        def poll(max_records, timeout_ms):
            owned = sorted(source.assigned())
            if timeout_ms == 0 and owned:  # as kafka-python runs a rebalance inside poll, before fetching
                revoked(owned)
                for (name, partition), offset in start_offsets(owned).items():
                    source._consumer.seek(TopicPartition(name, partition), offset)
                rebalances.append(owned)
            return real_poll(max_records, timeout_ms)

        source.poll = poll
        return source

    monkeypatch.setattr(pipeline, "make_source", make_source)
    counters = run_consumer(settings)
    assignments = read_all(broker.bootstrap_servers, settings.topics["assignments"])
    assert len(rebalances) > 10
    assert counters.records_in == 900
    assert sorted(offsets_of(assignments)) == sorted(set(offsets_of(assignments))) and len(assignments) == 900
    from tests.test_kafka_consumer import stored_checkpoint

    assert stored_checkpoint(settings).model["n_seen"] == 900


def test_a_keyed_model_whose_partition_is_revoked_then_given_back_in_a_later_poll_is_stored_whole(broker, monkeypatch):
    """A poll on the turn after a checkpoint that revokes the partitions (assigning none yet, as confluent-kafka
    and a lost group membership do), which a later poll gives back: a key that gets no more records still has
    its whole model stored."""
    from kafka import TopicPartition

    from streamem_connectors.kafka import pipeline
    from streamem_connectors.kafka.checkpoint import ModelCheckpoint
    from streamem_connectors.kafka.model_process import AnswererHandle
    from streamem_connectors.kafka.records import InputBatch

    topic = unique("revoked-while-stored")
    settings = make_settings(broker, topic, max_records=600, max_poll_records=40, checkpoint_every=100,
                             model_key="id_mod", model_process=False, warmup=50)
    ensure_topics(settings, input_partitions=1)
    keys = ["k0"] * 100 + [f"k{1 + i % 5}" for i in range(500)]  # k0's records all come before the first checkpoint
    values = [json.dumps({**json.loads(v), "id_mod": k}).encode() for v, k in zip(good_values(600), keys, strict=True)]
    produce(broker.bootstrap_servers, topic, values)
    real_make_source, real_documents = pipeline.make_source, AnswererHandle.checkpoint_documents
    state = {"armed": False, "revoked": None, "given_back": False}

    def checkpoint_documents(self):
        documents = real_documents(self)
        state["armed"] = state["revoked"] is None and any(name.endswith("/model/k0") for name, _ in documents)
        return documents

    def make_source(settings, start_offsets, revoked):
        source = real_make_source(settings, start_offsets, revoked)
        real_poll, real_assigned = source.poll, source.assigned

        def poll(max_records, timeout_ms):
            if state["armed"]:  # revoked in this poll, assigned in the next
                state["armed"] = False
                state["revoked"] = sorted(real_assigned())
                revoked(state["revoked"])
                return InputBatch(topic, [], [], [], [])
            if state["revoked"] and not state["given_back"]:
                state["given_back"] = True
                for (name, partition), offset in start_offsets(state["revoked"]).items():
                    source._consumer.seek(TopicPartition(name, partition), offset)
            return real_poll(max_records, timeout_ms)

        def assigned():
            return set() if state["revoked"] and not state["given_back"] else real_assigned()

        source.poll, source.assigned = poll, assigned
        return source

    monkeypatch.setattr(pipeline, "make_source", make_source)
    monkeypatch.setattr(AnswererHandle, "checkpoint_documents", checkpoint_documents)
    run_consumer(settings)
    assert state["given_back"], "the revocation never came"
    raw = TopicStore(settings, sink=None).load(f"{settings.group_id}/model/k0")
    assert raw is not None and ModelCheckpoint.parse(raw).model["n_seen"] == 100


def test_a_checkpoint_directory_that_cannot_be_written_stops_the_consumer_with_one_error(broker, tmp_path):
    """A --checkpoint-dir that cannot be written (here: under a file) stops the consumer with a DeliveryFailed
    naming the checkpoint and the OS error, committing nothing (the CLI prints it as one line)."""
    from streamem_connectors.kafka.clients import DeliveryFailed

    topic = unique("unwritable-dir")
    (tmp_path / "a-file").write_text("not a directory")
    settings = make_settings(broker, topic, max_records=100, checkpoint_dir=tmp_path / "a-file" / "checkpoints")
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, good_values(100))
    with pytest.raises(DeliveryFailed, match=r"checkpoint could not be stored: .*a-file"):
        run_consumer(settings)

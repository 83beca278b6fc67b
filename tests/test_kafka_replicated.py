"""One global model over three consumers, replicated through the statistics topic."""

from __future__ import annotations

import signal

import numpy as np

from streamem.online_gmm import OnlineGMM
from streamem_connectors.kafka.checkpoint import Checkpoint, TopicStore
from streamem_connectors.kafka.replication import ReplicatedLearner
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import AnsweredOffsets, produce, read_all, unique, wait_for
from tests.test_kafka_consumer import _start, good_values, make_settings, offsets_of
from tests.test_kafka_scale_out import Assignments


def _largest_difference(models: list[OnlineGMM]) -> float:
    first = models[0]
    return max(
        float(np.max(np.abs(np.asarray(getattr(m, name)) - np.asarray(getattr(first, name)))))
        for m in models[1:]
        for name in ("weights_", "means_", "covariances_")
    )


def test_replicas_of_the_global_model_agree(broker):
    """Three consumers share one model: after the log is applied, every replica holds the same parameters
    (largest difference 0), the model learned every record once, and a new replica rebuilds it."""
    topic = unique("replicated")
    total = 9000
    settings = make_settings(broker, topic, replicate=True, warmup=300, batch_size=50)
    ensure_topics(settings, input_partitions=3)
    processes = [
        _start(settings, "--instance-id", str(i), "--replicate", "--warmup", "300", "--batch-size", "50")
        for i in range(3)
    ]
    assignments = Assignments(processes)
    answered = AnsweredOffsets(broker.bootstrap_servers, settings.topics["assignments"])
    try:
        wait_for(assignments.each_owns_one, 90, "each consumer to own one partition")
        produce(broker.bootstrap_servers, topic, good_values(total), keys=[str(i % 11).encode() for i in range(total)])
        wait_for(lambda: answered.reached(total), 180, f"all {total} records to be answered")
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=90) for process in processes]
    assert codes == [0, 0, 0]
    assert len(set(offsets_of(read_all(broker.bootstrap_servers, settings.topics["assignments"])))) == total

    store = TopicStore(settings, sink=None)
    replicas = [
        Checkpoint.parse(store.load(settings.model_copy(update={"instance_id": str(i)}).checkpoint_key)).replica
        for i in range(3)
    ]
    assert len({r["log_offset"] for r in replicas}) == 1  # every replica applied the whole log
    models = [OnlineGMM.from_dict(r["model"]) for r in replicas]
    difference = _largest_difference(models)
    print(f"largest parameter difference between replicas: {difference}")
    assert difference == 0.0
    assert models[0].n_seen == total  # each record learned once, by one replica, applied by all

    newcomer = ReplicatedLearner(settings.model_copy(update={"instance_id": "new"}), store)
    newcomer.finish()  # latest shared checkpoint plus the rest of the log
    assert _largest_difference([models[0], newcomer.state.model]) == 0.0
    newcomer.close()

"""--fetch-max-wait-ms: the fetch wait reaches both clients, and a consumer run with it answers every record."""

from __future__ import annotations

import time

import pytest

from streamem_connectors.kafka.clients import consumer_config, make_source
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import produce, read_all, unique, wait_for
from tests.test_kafka_consumer import good_values, make_settings, offsets_of


def test_fetch_max_wait_has_a_flag_an_environment_variable_and_the_clients_default(monkeypatch):
    """The default is both clients' own (500 ms); STREAMEM_FETCH_MAX_WAIT_MS sets it; 0 is refused."""
    assert ConsumerSettings(features=["a"]).fetch_max_wait_ms == 500
    monkeypatch.setenv("STREAMEM_FETCH_MAX_WAIT_MS", "20")
    assert ConsumerSettings(features=["a"]).fetch_max_wait_ms == 20
    with pytest.raises(ValueError, match="fetch_max_wait_ms"):
        ConsumerSettings(features=["a"], fetch_max_wait_ms=0)


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_fetch_max_wait_reaches_the_consumer_the_factory_builds(broker, client):
    """make_source builds its consumer from consumer_config, which carries the wait in the client's own name."""
    topic = unique("fetch-wait-config")
    settings = make_settings(broker, topic, client=client, fetch_max_wait_ms=37)
    name = "fetch.wait.max.ms" if client == "confluent" else "fetch_max_wait_ms"
    assert consumer_config(settings)[name] == 37
    ensure_topics(settings, input_partitions=1)
    source = make_source(settings, lambda partitions: {})  # confluent refuses a misspelled option here
    try:
        if client == "kafka-python":
            assert source._consumer.config["fetch_max_wait_ms"] == 37
    finally:
        source.close()


def test_a_consumer_with_a_short_fetch_wait_answers_every_record(broker):
    """With --fetch-max-wait-ms 10, every input offset still gets exactly one assignment."""
    topic = unique("fetch-wait-run")
    settings = make_settings(broker, topic, client="confluent", fetch_max_wait_ms=10, max_records=600)
    ensure_topics(settings, input_partitions=2)
    produce(broker.bootstrap_servers, topic, good_values(600), keys=[str(i % 3).encode() for i in range(600)])

    counters = run_consumer(settings)

    every = offsets_of(read_all(broker.bootstrap_servers, settings.topics["assignments"]))
    assert counters.records_in == len(every) == len(set(every)) == 600


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_poll_returns_once_records_are_there_not_at_its_timeout(broker, client):
    """A poll on a quiet topic returns its first record after about a fetch wait, not after its whole timeout
    (confluent's consume(n, timeout) waits for n records or the timeout: the extra latency with --client confluent)."""
    topic = unique("poll-returns")
    settings = make_settings(broker, topic, client=client, fetch_max_wait_ms=50)
    ensure_topics(settings, input_partitions=1)
    source = make_source(settings, lambda partitions: {})
    try:
        wait_for(lambda: source.poll(100, 100).size == 0 and source.assigned(), 30, "the partition assigned")
        produce(broker.bootstrap_servers, topic, good_values(1))
        started = time.monotonic()
        batch = source.poll(1024, 10_000)
        waited = time.monotonic() - started
    finally:
        source.close()
    assert batch.size == 1
    assert waited < 5.0, f"the poll returned after {waited:.1f} s"

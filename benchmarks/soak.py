"""Soak the consumer as an operator fears: kill -9 it over and over, freeze the broker, feed it odd records.

Runs `streamem run` (the real CLI, default settings but for a test-sized warm-up and
`--checkpoint-every 2000`, so that kills land between checkpoints) against the embedded broker on
a stream of good records with the catalogue of odd records from `tests/test_kafka_bad_records.py`
mixed in, and:

1. `--cycles` times: start the consumer, wait until it has stored a checkpoint and answered a
   random number of records more, `kill -9` it;
2. runs it while a producer keeps adding 1,000 records a second, and freezes the broker (SIGSTOP:
   it neither answers nor loses its data, as in a network partition) for each of `--outages`
   seconds, then thaws it;
3. lets it answer to the end of the input and stops it with SIGTERM.

Then it checks the guarantees: every input offset answered (an assignment or a dead letter), every
odd record dead-lettered or assigned as catalogued, and the model has learned each good record
exactly once (`n_seen` in the checkpoint). The result is written to the `soak` section of
BENCHMARKS.md and quoted in the README's guarantees.

    python benchmarks/soak.py --cycles 20 --outages 30,60,120
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from _report import write_section  # noqa: E402

from streamem_connectors.kafka.broker import EmbeddedBroker  # noqa: E402
from streamem_connectors.kafka.settings import ConsumerSettings  # noqa: E402
from streamem_connectors.kafka.topics import ensure_topics  # noqa: E402
from tests.kafka_helpers import TopicCounter, produce, read_all, wait_for  # noqa: E402
from tests.test_kafka_bad_records import ASSIGNED, CATALOGUE  # noqa: E402
from tests.test_kafka_consumer import good_values  # noqa: E402


def start_consumer(bootstrap: str, topic: str, checkpoints: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "streamem", "run",
        "--bootstrap-servers", bootstrap, "--input-topic", topic, "--group-id", f"{topic}-group",
        "--features", "a,b", "--n-components", "2", "--warmup", "200",
        "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "2000", "--log-level", "WARNING",
    ]  # fmt: skip
    with open(log, "ab") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


class LastOffsetWatch(TopicCounter):
    """Counts the assignments of one source offset as they arrive."""

    def __init__(self, bootstrap: str, topic: str, offset: int):
        super().__init__(bootstrap, topic)
        self.offset, self.hits = offset, 0

    def answers(self) -> int:
        for messages in self.consumer.poll(timeout_ms=200).values():
            self.hits += sum(json.loads(m.value)["source"]["offset"] == self.offset for m in messages)
        return self.hits



def learned_so_far(checkpoints: pathlib.Path, topic: str) -> int:
    """Records the stored checkpoint's model has learned (0 before the first checkpoint)."""
    path = checkpoints / f"{topic}-group%2F0.json"
    return json.loads(path.read_text())["model"]["n_seen"] if path.exists() else 0


class PacedProducer:
    """Adds good records at a steady rate from a thread, riding out broker freezes itself."""

    def __init__(self, bootstrap: str, topic: str, rate: float):
        from kafka import KafkaProducer

        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=5, delivery_timeout_ms=900_000, max_block_ms=900_000
        )
        self.topic, self.rate, self.sent, self.futures = topic, rate, 0, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        values = good_values(2_000_000, seed=1)
        started = time.monotonic()
        while not self.done.is_set():
            self.futures.append(self.producer.send(self.topic, value=values[self.sent]))
            self.sent += 1
            ahead = self.sent / self.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)  # pacing the load, not synchronising

    def stop(self) -> int:
        """Stop adding; the number of records the broker acknowledged."""
        self.done.set()
        self.thread.join()
        self.producer.flush()
        self.producer.close()
        return sum(future.succeeded() for future in self.futures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="good records in the input at the start")
    parser.add_argument("--cycles", type=int, default=20, help="kill -9 cycles")
    parser.add_argument("--outages", default="30,60,120", help="broker freezes, in seconds, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    outages = [float(s) for s in args.outages.split(",") if s]
    rng = random.Random(args.seed)
    work = pathlib.Path(tempfile.mkdtemp(prefix="streamem-soak-"))
    log = work / "consumer.log"

    values = good_values(args.records)
    spacing = args.records // (len(CATALOGUE) + 1)
    odd_at = {}
    for i, (name, _key, value, reason) in enumerate(CATALOGUE):
        odd_at[(i + 1) * spacing + i] = (name, reason)
        values.insert((i + 1) * spacing + i, value)
    keys = [b"%d" % (i % 7) for i in range(len(values))]
    for position, (_, key, *_) in zip(sorted(odd_at), CATALOGUE):
        keys[position] = key
    total = len(values)

    with EmbeddedBroker() as broker:
        topic = "soak"
        settings = ConsumerSettings(bootstrap_servers=broker.bootstrap_servers, input_topic=topic, features=["a", "b"])
        ensure_topics(settings, input_partitions=1)  # one partition: offsets are positions in `values`
        produce(broker.bootstrap_servers, topic, values, keys=keys)
        counter = TopicCounter(broker.bootstrap_servers, settings.topics["assignments"])
        checkpoints = work / "checkpoints"

        killed = 0
        for _ in range(args.cycles):
            learned = learned_so_far(checkpoints, topic)
            target = counter.count() + rng.randint(500, 4000)
            consumer = start_consumer(broker.bootstrap_servers, topic, checkpoints, log)
            try:  # killed at a random moment after it has checkpointed at least once
                wait_for(
                    lambda t=target, c=consumer, n=learned: (
                        counter.count() >= t and learned_so_far(checkpoints, topic) > n
                    )
                    or c.poll() is not None,
                    120,
                    "answers and a checkpoint",
                )
            finally:
                os.kill(consumer.pid, signal.SIGKILL)
                consumer.wait()
            if consumer.returncode != -signal.SIGKILL:
                raise SystemExit(f"the consumer exited by itself ({consumer.returncode}); see {log}")
            killed += 1
            print(f"kill -9 #{killed}: {learned_so_far(checkpoints, topic)} records learned", flush=True)

        # Outages: the consumer runs while a producer keeps adding records, and the broker is frozen
        consumer = start_consumer(broker.bootstrap_servers, topic, checkpoints, log)
        feeder = PacedProducer(broker.bootstrap_servers, topic, rate=1000)
        ridden = []
        for seconds in outages:
            # this run's own progress (the counter may still be reading answers of the killed runs)
            learned = learned_so_far(checkpoints, topic)
            wait_for(
                lambda n=learned: learned_so_far(checkpoints, topic) > n + 2000 or consumer.poll() is not None,
                300,
                "a checkpoint 2,000 records on",
            )
            os.kill(broker.pid, signal.SIGSTOP)
            time.sleep(seconds)  # the outage itself: a length of time, not a synchronisation
            os.kill(broker.pid, signal.SIGCONT)
            if consumer.poll() is not None:
                print(f"the consumer did not ride out a {seconds:.0f} s outage: exit {consumer.returncode}")
                break
            ridden.append(seconds)
            print(f"rode out a {seconds:.0f} s broker freeze", flush=True)
        learned = learned_so_far(checkpoints, topic)
        wait_for(
            lambda: learned_so_far(checkpoints, topic) > learned + 2000 or consumer.poll() is not None,
            300,
            "a checkpoint 2,000 records after the last outage",
        )
        total += feeder.stop()
        # one partition answered in order: the final run is through once it has answered the last offset
        last = LastOffsetWatch(broker.bootstrap_servers, settings.topics["assignments"], total - 1)
        wait_for(lambda: last.answers() > 0 or consumer.poll() is not None, 600, "the last record")
        last.close()
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=120)
        counter.close()

        assignments = read_all(broker.bootstrap_servers, settings.topics["assignments"])
        dead = read_all(broker.bootstrap_servers, settings.topics["dead_letter"])
    answered_offsets = {a["source"]["offset"] for a in assignments} | {d["source"]["offset"] for d in dead}
    dead_offsets = {d["source"]["offset"] for d in dead}
    stored = json.loads((checkpoints / f"{topic}-group%2F0.json").read_text())
    n_seen = stored["model"]["n_seen"]
    good = total - sum(reason is not ASSIGNED for _, reason in odd_at.values())  # every other record is good
    wrong = [
        name for at, (name, reason) in odd_at.items() if (reason is ASSIGNED) == (at in dead_offsets)
    ]  # fmt: skip
    lost = total - len(answered_offsets)
    duplicates = len(assignments) + len(dead) - len(answered_offsets)
    checks = {
        "every offset answered": lost == 0,
        "every odd record as catalogued": not wrong,
        "each good record learned once": n_seen == good,
        "clean exit on SIGTERM": consumer.returncode == 0,
    }
    body = "\n".join(
        [
            "## Soak: kill -9, broker freezes, odd records (`benchmarks/soak.py`)",
            "",
            f"{total:,} records on one partition ({len(CATALOGUE)} kinds of odd record among them), "
            f"the real CLI with `--checkpoint-dir`.",
            "",
            "| what | result |",
            "|---|---|",
            f"| kill -9 cycles survived | {killed} |",
            f"| broker freezes ridden out (SIGSTOP) | {', '.join(f'{s:.0f} s' for s in ridden) or 'none'} |",
            f"| input offsets lost | {lost} |",
            f"| answered again after a kill (downstream de-duplicates by source offset) | {duplicates:,} |",
            f"| odd records not handled as catalogued | {len(wrong)} {wrong[:3]} |",
            f"| model's records learned / good records | {n_seen:,} / {good:,} |",
            f"| exit code on SIGTERM | {consumer.returncode} |",
            "",
            "Every check " + ("held." if all(checks.values()) else "did NOT hold: " + str(checks)),
        ]
    )
    print(body)
    write_section("soak", body)
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

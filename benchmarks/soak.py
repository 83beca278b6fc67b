"""Soak the consumer as an operator fears: kill -9 it over and over, freeze the broker, feed it odd records.

Runs `streamem run` (the real CLI, default settings but for the test-sized warm-up) against the
embedded broker on a stream of good records with the catalogue of odd records from
`tests/test_kafka_bad_records.py` mixed in, and:

1. `--cycles` times: start the consumer, let it answer a random number of records, `kill -9` it;
2. freezes the broker (SIGSTOP, so it neither answers nor loses its data, as in a network
   partition) for each of `--outages` seconds while the consumer runs, then thaws it;
3. runs the consumer to the end of the input and stops it with SIGTERM.

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
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from _report import write_section  # noqa: E402

from connectors.kafka.broker import EmbeddedBroker  # noqa: E402
from connectors.kafka.settings import ConsumerSettings  # noqa: E402
from connectors.kafka.topics import ensure_topics  # noqa: E402
from tests.kafka_helpers import TopicCounter, produce, read_all, wait_for  # noqa: E402
from tests.test_kafka_bad_records import ASSIGNED, CATALOGUE  # noqa: E402
from tests.test_kafka_consumer import good_values  # noqa: E402


def start_consumer(bootstrap: str, topic: str, checkpoints: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "streamem", "run",
        "--bootstrap-servers", bootstrap, "--input-topic", topic, "--group-id", f"{topic}-group",
        "--features", "a,b", "--n-components", "2", "--warmup", "200",
        "--checkpoint-dir", str(checkpoints), "--log-level", "WARNING",
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

    @classmethod
    def count_once(cls, bootstrap: str, topic: str, offset: int) -> int:
        return sum(a["source"]["offset"] == offset for a in read_all(bootstrap, topic))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=60_000, help="good records in the input")
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
            target = counter.count() + rng.randint(500, 4000)
            consumer = start_consumer(broker.bootstrap_servers, topic, checkpoints, log)
            try:
                wait_for(lambda t=target, c=consumer: counter.count() >= t or c.poll() is not None, 120, "answers")
            finally:
                os.kill(consumer.pid, signal.SIGKILL)
                consumer.wait()
            if consumer.returncode != -signal.SIGKILL:
                raise SystemExit(f"the consumer exited by itself ({consumer.returncode}); see {log}")
            killed += 1
            print(f"kill -9 #{killed}: {counter.seen} answers so far", flush=True)

        assignments_topic = settings.topics["assignments"]
        answered_before = LastOffsetWatch.count_once(broker.bootstrap_servers, assignments_topic, total - 1)
        consumer = start_consumer(broker.bootstrap_servers, topic, checkpoints, log)
        ridden = []
        for seconds in outages:
            before = counter.count()
            wait_for(lambda b=before: counter.count() > b, 120, "answers before the outage")
            os.kill(broker._process.pid, signal.SIGSTOP)
            time.sleep(seconds)  # the outage itself: a length of time, not a synchronisation
            os.kill(broker._process.pid, signal.SIGCONT)
            if consumer.poll() is not None:
                print(f"the consumer did not ride out a {seconds:.0f} s outage: exit {consumer.returncode}")
                break
            ridden.append(seconds)
            print(f"rode out a {seconds:.0f} s broker freeze", flush=True)
        # one partition answered in order: the final run is through once it has answered the last offset
        last = LastOffsetWatch(broker.bootstrap_servers, settings.topics["assignments"], total - 1)
        wait_for(lambda: last.answers() > answered_before or consumer.poll() is not None, 600, "the last record")
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
    good = total - sum(reason is not ASSIGNED for _, reason in odd_at.values())
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

"""`streamem run` and `streamem demo`, registered through the `streamem.commands` entry points.

`run`'s flags are generated from `ConsumerSettings`, so each flag has the
environment variable `STREAMEM_<NAME>` and the config-file key `<name>`.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

from pydantic import ValidationError

from connectors.kafka.settings import ConsumerSettings, load_settings

__all__ = ["register_demo", "register_produce_demo", "register_run", "settings_flags"]

logger = logging.getLogger(__name__)


def settings_flags() -> dict[str, str]:
    """CLI flag -> settings field, for every field (the deploy files are checked against this)."""
    return {"--" + name.replace("_", "-"): name for name in ConsumerSettings.model_fields}


def register_run(commands) -> None:
    parser = commands.add_parser(
        "run",
        help="run the Kafka consumer",
        description="Learn an online mixture from a Kafka topic; publish assignments, dead letters and drift.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=pathlib.Path, help="TOML or JSON file of settings")
    for flag, name in settings_flags().items():
        field = ConsumerSettings.model_fields[name]
        text = f"{field.description} [env STREAMEM_{name.upper()}]"
        if field.annotation is bool:  # --replicate / --no-replicate
            kind = dict(action=argparse.BooleanOptionalAction)
        else:
            kind = dict(metavar=name.upper())
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=text, **kind)
    parser.set_defaults(handler=_run)


def _settings(args) -> ConsumerSettings:
    flags = {k: v for k, v in vars(args).items() if k in ConsumerSettings.model_fields}
    try:
        return load_settings(flags, args.config)
    except (ValidationError, FileNotFoundError, ValueError) as error:
        print(f"streamem: invalid settings: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args) -> int:
    from connectors.kafka.checkpoint import CheckpointError
    from connectors.kafka.clients import DeliveryFailed
    from connectors.kafka.model_process import LearnerFailed
    from connectors.kafka.observability import Observability, configure_logging
    from connectors.kafka.pipeline import run_consumer
    from connectors.kafka.topics import ensure_topics

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    logger.info("settings: %s", settings.redacted())
    observability = Observability()
    if settings.http_port is not None:
        port = observability.serve(settings.http_port)
        logger.info("serving /metrics, /healthz and /readyz on port %d", port)
    ensure_topics(settings)
    progress_log = _ProgressLog()
    try:
        counters = run_consumer(settings, on_batch=progress_log, observability=observability)
    except CheckpointError as error:  # a checkpoint it may not resume from: one line, no traceback
        print(f"streamem: {error}", file=sys.stderr)
        return 2
    except (DeliveryFailed, LearnerFailed) as error:  # nothing was committed past the failure
        logger.error("stopped: %s", error)
        return 1
    finally:
        observability.close()
    print(
        f"records {counters.records_in} in total ({progress_log.records_this_run} this run): {counters.assigned} "
        f"assigned, {counters.dead_lettered} dead-lettered, {counters.drift_events} drift events"
    )
    return 0


class _ProgressLog:
    """Logs throughput and weights at most every `every_s` seconds."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self.last = 0.0
        self.records_this_run = 0

    def __call__(self, progress) -> None:
        self.records_this_run = progress.records_this_run
        now = time.monotonic()
        if now - self.last < self.every_s and not progress.drifts:
            return
        self.last = now
        rate = progress.records_this_run / max(progress.elapsed_s, 1e-9)  # not the restored records
        logger.info(
            "%d records this run (%.0f/s), %d in total, weights %s, lag %s",
            progress.records_this_run,
            rate,
            progress.counters.records_in,
            [round(w, 3) for w in progress.weights],
            progress.lag,
        )


def register_demo(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="the consumer on the embedded broker with a synthetic regime-switching stream",
        description="Starts the embedded Kafka-compatible broker (Tansu), produces a stream whose mixture weights "
        "switch between regimes, runs the consumer on it with live progress, and shows the outputs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--records", type=int, default=90_000, help="records in the stream (three regimes)")
    parser.add_argument("--bad-records", type=int, default=25, help="malformed records mixed in")
    parser.add_argument("--client", choices=["kafka-python", "confluent"], default="kafka-python")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_demo, log_level="ERROR")  # the demo prints its own progress


def _demo(args) -> int:
    from connectors.kafka.demo import run_demo

    return run_demo(records=args.records, bad_records=args.bad_records, client=args.client, seed=args.seed)


def register_produce_demo(commands) -> None:
    parser = commands.add_parser(
        "produce-demo",
        help="produce the demo's regime-switching stream to a Kafka topic",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", default="events")
    parser.add_argument("--records", type=int, default=90_000)
    parser.add_argument("--bad-records", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_produce_demo)


def _produce_demo(args) -> int:
    from connectors.kafka.demo import produce_regimes

    changes = produce_regimes(args.bootstrap_servers, args.topic, args.records, args.bad_records, args.seed)
    print(
        f"produced {args.records:,} records (+{args.bad_records} malformed) to {args.topic}; "
        f"regime changes after records {changes}"
    )
    return 0

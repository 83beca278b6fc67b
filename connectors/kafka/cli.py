"""`streamem run` and `streamem demo`, registered through the `streamem.commands` entry points.

`run`'s flags are generated from `ConsumerSettings`, so each flag has the
environment variable `STREAMEM_<NAME>` and the config-file key `<name>`.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import pathlib
import signal
import sys
import time
import typing

from pydantic import ValidationError

from streamem.cli import HelpFormatter
from streamem_connectors.kafka.settings import ConsumerSettings, load_settings
from streamem_connectors.kafka.topics import BrokerUnreachable

__all__ = ["register_demo", "register_produce_demo", "register_run", "settings_flags"]

logger = logging.getLogger(__name__)


def settings_flags() -> dict[str, str]:
    """CLI flag -> settings field, for every field (the deploy files are checked against this)."""
    return {"--" + name.replace("_", "-"): name for name in ConsumerSettings.model_fields}


# The spellings `fit` and `check` also accept, so a flag is spelled one way in every command.
ALIASES = {"n_components": ["--components"], "covariance_type": ["--covariance"]}

# A package the consumer imports, missing: what to tell the user (one line instead of a traceback).
MISSING_PACKAGES = {
    "kafka": "the kafka-python package is missing (a dependency of streamem): pip install 'kafka-python[crc32c]'",
    "orjson": "the orjson package is missing (a dependency of streamem): pip install orjson",
    "prometheus_client": "the prometheus-client package is missing (a dependency of streamem): "
    "pip install prometheus-client",
    "confluent_kafka": "--client confluent needs the confluent-kafka package: pip install 'streamem[confluent]'",
}


def register_run(commands) -> None:
    parser = commands.add_parser(
        "run",
        help="run the Kafka consumer",
        description="Learn an online mixture from a Kafka topic; publish assignments, dead letters and drift. "
        "Each flag can also be set by its environment variable or in the --config file; "
        "flags win over the environment, which wins over the file.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", type=pathlib.Path, help="TOML or JSON file of settings")
    for flag, name in settings_flags().items():
        field = ConsumerSettings.model_fields[name]
        text = f"{field.description} [env STREAMEM_{name.upper()}]"
        shown = "(default:" in (field.description or "")  # a default the description words better
        if field.default is not None and not field.is_required() and field.default_factory is None and not shown:
            # shown by hand: the argparse default stays SUPPRESS, so the environment and file can fill it
            text += f" (default: {field.default})"
        choices = _choices(field.annotation)
        if field.annotation is bool:  # --replicate / --no-replicate
            kind = dict(action=argparse.BooleanOptionalAction)
        elif choices:
            kind = dict(choices=choices)
        else:
            kind = dict(metavar=name.upper())
        flags = [flag, *ALIASES.get(name, [])]
        parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=text, **kind)
    parser.set_defaults(handler=_one_line_errors("run", _run))


def _choices(annotation) -> list[str] | None:
    """The values of a Literal[...] setting (None for any other type)."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(value) for value in typing.get_args(annotation)]
    return None


def _one_line_errors(command: str, handler):
    """`handler`, with what a user can fix said in one line on stderr instead of a traceback."""

    def handle(args) -> int:
        from streamem_connectors.kafka.broker import BrokerError

        try:
            return handler(args)
        except ModuleNotFoundError as error:
            message = MISSING_PACKAGES.get((error.name or "").split(".")[0])
            if message is None:
                raise
            print(f"streamem {command}: {message}", file=sys.stderr)
            return 2
        except BrokerError as error:  # the demo's embedded broker: not installed, or would not start
            print(f"streamem {command}: {error}", file=sys.stderr)
            return 2
        except BrokerUnreachable as error:
            print(f"streamem {command}: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # a second Ctrl-C (the first one stops cleanly), or one before the loop runs
            print(
                f"streamem {command}: interrupted: stopped at once, committing nothing past the last checkpoint "
                "(a restart resumes from it)",
                file=sys.stderr,
            )
            return 130

    return handle


def _require_client(client: str) -> None:
    """Import the chosen client now: a missing one is reported before any connection is tried."""
    if client == "confluent":
        import confluent_kafka  # noqa: F401
    else:
        import kafka  # noqa: F401


def _settings(args) -> ConsumerSettings:
    flags = {k: v for k, v in vars(args).items() if k in ConsumerSettings.model_fields}
    for line in unknown_environment(os.environ):
        print(f"streamem run: warning: {line}", file=sys.stderr)
    try:
        return load_settings(flags, args.config)
    except ValidationError as error:
        for line in settings_errors(error):
            print(f"streamem run: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    except (FileNotFoundError, ValueError) as error:
        print(f"streamem run: invalid settings: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def settings_errors(error: ValidationError) -> list[str]:
    """One line per error, naming the flag (each flag is also an environment variable and a file key)
    and the value given: "--n-components: Input should be greater than or equal to 1 (got 0)"."""
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a rule between settings: its message names the flags
            lines.append(message)
            continue
        name = str(item["loc"][0])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown setting {name!r} (in the --config file)")
            continue
        value = item.get("input")
        given = "" if isinstance(value, (dict, list)) or repr(value) in message else f" (got {value})"
        lines.append(f"--{name.replace('_', '-')}: {message}{given}")
    return lines


def unknown_environment(environment: typing.Mapping[str, str]) -> list[str]:
    """What to say about STREAMEM_* variables that are no setting (a misspelling would be ignored
    silently). A warning, not a refusal: other software sets such names too (Kubernetes gives every
    pod STREAMEM_SERVICE_HOST, STREAMEM_PORT, ... for a service called streamem)."""
    known = {f"STREAMEM_{name.upper()}" for name in ConsumerSettings.model_fields}
    lines = []
    for variable in sorted(environment):
        upper = variable.upper()
        if not upper.startswith("STREAMEM_") or upper in known:
            continue
        close = difflib.get_close_matches(upper, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{variable} is not a setting and is ignored{hint}")
    return lines


def _run(args) -> int:
    from streamem_connectors.kafka.signals import StopSignals  # light: installed before the heavy imports below

    stopper = StopSignals()
    try:
        with stopper.on_signals():  # before any start-up work: a signal during it stops as cleanly as one later
            return _start_and_run(args, stopper.event)
    finally:
        if stopper.event.is_set():  # stopped by a signal: a repeat landing while the interpreter exits is no crash
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)


def _start_and_run(args, stop) -> int:
    from streamem_connectors.kafka.checkpoint import CheckpointError
    from streamem_connectors.kafka.clients import DeliveryFailed
    from streamem_connectors.kafka.model_process import LearnerFailed
    from streamem_connectors.kafka.observability import Observability, configure_logging
    from streamem_connectors.kafka.pipeline import run_consumer
    from streamem_connectors.kafka.topics import ensure_topics

    settings = _settings(args)
    _require_client(settings.client)
    configure_logging(settings.log_level, settings.log_format)
    logger.info("settings: %s", settings.redacted())
    observability = Observability(delivery_timeout_s=settings.delivery_timeout_s)
    if settings.http_port is not None:
        try:
            port = observability.serve(settings.http_port)
        except OSError as error:  # in use, or not ours to take: one line, before anything is created
            print(f"streamem run: --http-port {settings.http_port}: cannot listen: {error.strerror}", file=sys.stderr)
            return 2
        logger.info("serving /metrics, /healthz and /readyz on port %d", port)
    progress_log = _ProgressLog()
    try:
        if not stop.is_set():
            ensure_topics(settings)
        if stop.is_set():  # stopped before the model was loaded: there is nothing to finish
            print("records 0 this run: stopped during start-up")
            return 0
        counters = run_consumer(settings, on_batch=progress_log, stop=stop, observability=observability)
    except CheckpointError as error:  # a checkpoint it may not resume from: one line, no traceback
        print(f"streamem run: {error}", file=sys.stderr)
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
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--records", type=int, default=90_000, help="records in the stream (three regimes)")
    parser.add_argument("--bad-records", type=int, default=25, help="malformed records mixed in")
    parser.add_argument(
        "--client", choices=["kafka-python", "confluent"], default="kafka-python", help="Kafka client library"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the stream")
    parser.set_defaults(handler=_one_line_errors("demo", _demo), log_level="ERROR")  # the demo prints its own progress


def _demo_sizes_refused(command: str, args) -> bool:
    """True (after saying why in one line) unless 1 <= --records and 0 <= --bad-records <= --records."""
    if args.records >= 1 and 0 <= args.bad_records <= args.records:
        return False
    print(
        f"streamem {command}: --records must be at least 1 and --bad-records between 0 and --records "
        f"(got {args.records} and {args.bad_records})",
        file=sys.stderr,
    )
    return True


def _demo(args) -> int:
    if _demo_sizes_refused("demo", args):
        return 2
    _require_client(args.client)
    from streamem_connectors.kafka.demo import run_demo

    return run_demo(records=args.records, bad_records=args.bad_records, client=args.client, seed=args.seed)


def register_produce_demo(commands) -> None:
    parser = commands.add_parser(
        "produce-demo",
        help="produce the demo's regime-switching stream to a Kafka topic",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--bootstrap-servers", required=True, help="Kafka bootstrap servers, host:port[,host:port]")
    parser.add_argument("--topic", default="events", help="topic to produce to")
    parser.add_argument("--records", type=int, default=90_000, help="records in the stream (three regimes)")
    parser.add_argument("--bad-records", type=int, default=25, help="malformed records mixed in")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the stream")
    parser.set_defaults(handler=_one_line_errors("produce-demo", _produce_demo))


def _produce_demo(args) -> int:
    if _demo_sizes_refused("produce-demo", args):
        return 2
    from streamem_connectors.kafka.demo import produce_regimes

    changes = produce_regimes(args.bootstrap_servers, args.topic, args.records, args.bad_records, args.seed)
    print(
        f"produced {args.records:,} records (+{args.bad_records} malformed) to {args.topic}; "
        f"regime changes after records {changes}"
    )
    return 0

"""The consumer's configuration: one typed model filled by CLI flags, environment and a config file.

Precedence, highest first: command-line flags, environment variables
(`STREAMEM_INPUT_TOPIC=...`), the config file (`--config FILE`, TOML or JSON),
then the defaults below. The CLI's flags are generated from this model's fields,
so every flag has an environment variable of the same name and vice versa.
"""

from __future__ import annotations

import json
import pathlib
from typing import Annotated, Any, Literal

import tomllib
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["ConsumerSettings", "load_settings"]


class ConsumerSettings(BaseSettings):
    """Everything `streamem run` needs; see `streamem run --help`."""

    model_config = SettingsConfigDict(env_prefix="STREAMEM_", extra="forbid", validate_default=True)

    # -- where ----------------------------------------------------------------------------------
    bootstrap_servers: str = Field("localhost:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    connect_timeout_s: float = Field(
        15.0, gt=0, description="at start, give up (exit 1) if no bootstrap server answers within this many seconds"
    )
    input_topic: str = Field("streamem.input", description="topic of JSON records to learn from")
    group_id: str = Field("streamem", description="consumer group")
    instance_id: str = Field(
        "0",
        description="this process's name within the group; its model checkpoint is stored under it, so keep it "
        "the same across restarts (a new name starts a fresh model)",
    )
    assignments_topic: str | None = Field(None, description="default: <input-topic>.assignments")
    drift_topic: str | None = Field(None, description="default: <input-topic>.drift")
    dead_letter_topic: str | None = Field(None, description="default: <input-topic>.dead-letter")
    state_topic: str | None = Field(None, description="compacted checkpoint topic; default: <input-topic>.state")
    checkpoint_dir: pathlib.Path | None = Field(
        None, description="keep checkpoints in this directory instead of the state topic"
    )
    client: Literal["kafka-python", "confluent"] = Field("kafka-python", description="Kafka client library")

    # -- what ----------------------------------------------------------------------------------
    features: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="feature fields, comma-separated: a,b,c"
    )
    target: str | None = Field(
        None,
        description="target field: learn a mixture of linear regressions on it (with --model hmm, a Markov-switching "
        "regression)",
    )
    model_key: str | None = Field(
        None, description="field whose value selects one model per key (key the messages by it too)"
    )
    replicate: bool = Field(
        False, description="one global model over every consumer of the group, replicated via the statistics topic"
    )
    statistics_topic: str | None = Field(None, description="default: <input-topic>.statistics (one partition)")
    model: Literal["gmm", "hmm"] = Field(
        "gmm",
        description="gmm: a mixture, every record on its own; hmm: a hidden Markov model, regimes that persist "
        "(the records of a partition are one sequence, with its own filter)",
    )
    n_components: int = Field(3, ge=1, description="mixture components K (hidden states with --model hmm)")
    covariance_type: Literal["full", "tied", "diag", "spherical"] = Field("full", description="Gaussian covariance")
    batch_size: int = Field(128, ge=1, description="records per stepwise-EM update")
    warmup: int = Field(500, ge=1, description="records fitted by batch EM before going stepwise")
    step_alpha: float = Field(0.8, gt=0.5, le=1.0, description="step-size decay exponent alpha")
    step_floor: float = Field(0.02, ge=0.0, lt=1.0, description="step floor eta_min: memory ~ 1/floor batches")
    seed: int | None = Field(0, description="seed of the warm-up's k-means++ starts")
    # (the settings above make the model: a checkpoint records them, see checkpoint.MODEL_SETTINGS)
    reset_model: bool = Field(
        False,
        description="start a fresh model at the group's committed offsets where the checkpoint is missing, "
        "unusable or written with other model settings (default: refuse to start)",
    )
    outlier_threshold: float = Field(
        1e6,
        gt=0,
        description="dead-letter a record whose squared Mahalanobis distance to the closest component exceeds this "
        "(1e6: 1000 sd; inf: off, values too large for the statistics still dead-lettered); may change between runs",
    )

    # -- drift -----------------------------------------------------------------------------------
    drift_every: int = Field(1000, ge=1, description="publish a drift record every this many input records")
    regime_threshold: float = Field(
        0.9,
        gt=0.5,
        le=1.0,
        description="with --model hmm: publish a regime_change drift record when a partition's most likely state "
        "changes and its filtered probability is at least this",
    )

    # -- how -------------------------------------------------------------------------------------
    max_records: int | None = Field(
        None,
        ge=1,
        description="stop cleanly after this many input records in this run "
        "(those of earlier runs, restored from the checkpoint, do not count)",
    )
    max_poll_records: int = Field(
        1024,
        ge=1,
        description="records per poll, answered as one batch (the poll before a checkpoint takes up to twice "
        "as many, answered as two batches, in the model process while the checkpoint is stored)",
    )
    model_process: bool = Field(
        True, description="run the model in a child process, beside the Kafka client (a second core)"
    )
    checkpoint_every: int = Field(
        10_000, ge=1, description="flush outputs, store a checkpoint and commit at least every this many records"
    )
    checkpoint_interval_s: float = Field(
        5.0, gt=0, description="... and at least every this many seconds; a crash re-answers what came after"
    )
    delivery_timeout_s: float = Field(
        300.0,
        ge=1,  # below a second not even the connection to the broker is made in time
        description="ride out a broker outage this long, retrying unacknowledged outputs; then stop (exit 1)",
    )
    poll_timeout_ms: int = Field(500, ge=1, description="poll wait when the topic is idle")
    fetch_max_wait_ms: int = Field(
        500,
        ge=1,
        le=300_000,
        description="longest the broker holds a fetch for new records (both clients' default); lower answers "
        "sooner on a quiet topic, at the cost of more fetch requests",
    )
    session_timeout_ms: int = Field(6000, ge=1000, description="group session timeout (a join takes ~half)")
    heartbeat_interval_ms: int = Field(
        1000, ge=100, description="group heartbeat interval (at most a third of the session timeout)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="log lines as text or one JSON object each")
    http_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics, /healthz and /readyz on this port (none: off)"
    )

    # -- security (passed through to the client) -------------------------------------------------
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol"
    )
    sasl_mechanism: str | None = Field(None, description="e.g. PLAIN, SCRAM-SHA-256, SCRAM-SHA-512")
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    ssl_cafile: pathlib.Path | None = Field(None, description="CA certificate file")
    ssl_certfile: pathlib.Path | None = Field(None, description="client certificate file")
    ssl_keyfile: pathlib.Path | None = Field(None, description="client private key file")

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_servers(cls, value: str) -> str:
        """host:port[,host:port]: checked here, as the clients would only fail later with a traceback."""
        for server in value.split(","):
            server = server.strip()
            host, _, port = server.rpartition(":")
            bracketed = host.startswith("[") and host.endswith("]")  # an IPv6 address: [::1]:9092
            name = host[1:-1] if bracketed else host
            odd = any(character.isspace() or character in "/@[]" for character in name)
            if not name or odd or (":" in name and not bracketed) or not _is_port(port):
                raise ValueError(f"{server!r} is not host:port (a list is host:port,host:port)")
        return value

    @field_validator("features", mode="before")
    @classmethod
    def _split_features(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> ConsumerSettings:
        if not self.features:
            raise ValueError("features must name at least one field (--features a,b,c or STREAMEM_FEATURES)")
        if self.target is not None and self.target in self.features:
            raise ValueError(f"target {self.target!r} is also listed among the features")
        if self.replicate and self.reset_model:
            raise ValueError(
                "reset_model does not apply to replicate: a replica rebuilds the model from the statistics log; "
                "a fresh replicated model needs a new group and statistics topic"
            )
        if self.replicate and (self.model_key is not None or self.target is not None):
            raise ValueError("replicate works with one model for the group (a Gaussian mixture or, with --model hmm, "
                             "a Gaussian hidden Markov model): not with model_key or target")
        if self.model_key is not None and self.model_key in [*self.features, self.target]:
            raise ValueError(f"model_key {self.model_key!r} is also a feature or the target")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"features are listed twice: {self.features}")
        if self.warmup < self.n_components:  # the warm-up's batch EM needs a record per component at least
            raise ValueError(f"--warmup ({self.warmup}) must be at least --n-components ({self.n_components})")
        if 3 * self.heartbeat_interval_ms > self.session_timeout_ms:  # as Kafka advises; the client refuses >=
            raise ValueError(
                f"--heartbeat-interval-ms ({self.heartbeat_interval_ms}) must be at most a third of "
                f"--session-timeout-ms ({self.session_timeout_ms})"
            )
        return self

    @property
    def topics(self) -> dict[str, str]:
        """The output topics, defaults filled in."""
        base = self.input_topic
        return {
            "assignments": self.assignments_topic or f"{base}.assignments",
            "drift": self.drift_topic or f"{base}.drift",
            "dead_letter": self.dead_letter_topic or f"{base}.dead-letter",
            "state": self.state_topic or f"{base}.state",
            "statistics": self.statistics_topic or f"{base}.statistics",
        }

    @property
    def checkpoint_key(self) -> str:
        return f"{self.group_id}/{self.instance_id}"

    def redacted(self) -> dict:
        """Settings as a dict for logs, with secrets masked."""
        return self.model_dump(mode="json")  # SecretStr dumps as '**********'

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _ConfigFileSource(settings_cls)


def _is_port(text: str) -> bool:
    return text.isdigit() and 1 <= int(text) <= 65535


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Values from the file named by `_config_file` (set by `load_settings`)."""

    path: pathlib.Path | None = None

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = type(self).path
        if path is None:
            return {}
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a table/object of settings")
        return {key.replace("-", "_"): value for key, value in data.items()}


def load_settings(flags: dict[str, Any], config_file: pathlib.Path | None = None) -> ConsumerSettings:
    """Settings from explicit flags, the environment and an optional config file."""
    if config_file is not None and not config_file.exists():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    _ConfigFileSource.path = config_file
    try:
        return ConsumerSettings(**flags)
    finally:
        _ConfigFileSource.path = None

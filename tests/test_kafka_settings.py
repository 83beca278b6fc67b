"""Consumer settings: flags over environment over config file; the CLI is generated from the model."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from pydantic import ValidationError

from streamem_connectors.kafka.cli import settings_flags
from streamem_connectors.kafka.settings import ConsumerSettings, load_settings


def test_flags_beat_environment_which_beats_the_config_file(tmp_path, monkeypatch):
    """A value given as a flag wins over STREAMEM_*, which wins over the config file."""
    config = tmp_path / "consumer.toml"
    config.write_text('features = ["a", "b"]\nn_components = 7\ngroup_id = "from-file"\nbatch_size = 64\n')
    monkeypatch.setenv("STREAMEM_N_COMPONENTS", "5")
    monkeypatch.setenv("STREAMEM_GROUP_ID", "from-env")
    settings = load_settings({"group_id": "from-flag"}, config)
    assert settings.group_id == "from-flag"
    assert settings.n_components == 5
    assert settings.batch_size == 64
    assert settings.features == ["a", "b"]


def test_json_config_and_comma_separated_features(tmp_path, monkeypatch):
    """A JSON config file works; STREAMEM_FEATURES=a,b,c is a comma-separated list."""
    config = tmp_path / "consumer.json"
    config.write_text(json.dumps({"input-topic": "events", "features": "x"}))
    monkeypatch.setenv("STREAMEM_FEATURES", "a, b,c")
    settings = load_settings({}, config)
    assert settings.features == ["a", "b", "c"] and settings.input_topic == "events"
    assert settings.topics == {
        "assignments": "events.assignments",
        "drift": "events.drift",
        "dead_letter": "events.dead-letter",
        "state": "events.state",
        "statistics": "events.statistics",
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "features must name at least one field"),
        ({"features": "a,b", "target": "a"}, "target 'a' is also listed"),
        ({"features": "a,a"}, "listed twice"),
        ({"features": "a", "n_components": 0}, "greater than or equal to 1"),
        ({"features": "a", "unknown_setting": 1}, "Extra inputs are not permitted"),
        ({"features": "a", "covariance_type": "round"}, "full"),
    ],
)
def test_invalid_settings_are_named(values, message):
    """Missing features, a target among the features, duplicates, bad numbers or names: clear errors."""
    with pytest.raises(ValidationError, match=message):
        ConsumerSettings(**values)


def test_secrets_are_masked_when_settings_are_logged():
    """The SASL password never appears in the settings dump used for logging."""
    settings = ConsumerSettings(features=["a"], sasl_password="hunter2", sasl_username="svc")
    assert "hunter2" not in json.dumps(settings.redacted())
    assert settings.sasl_password.get_secret_value() == "hunter2"


def test_every_setting_has_a_flag_in_run_help():
    """`streamem run --help` shows a flag and an environment variable for every settings field."""
    help_text = subprocess.run(
        [sys.executable, "-m", "streamem", "run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag, name in settings_flags().items():
        assert flag in help_text, flag
        assert f"STREAMEM_{name.upper()}" in help_text, name


def test_invalid_settings_exit_2_with_a_message():
    """`streamem run` without features exits 2 and says what is missing."""
    result = subprocess.run([sys.executable, "-m", "streamem", "run"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "features must name at least one field" in result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"features": "a", "warmup": 1}, "--warmup (1) must be at least --n-components (3)"),
        ({"features": "a", "n_components": 1000}, "--warmup (500) must be at least --n-components (1000)"),
        ({"features": "a", "heartbeat_interval_ms": 10000, "session_timeout_ms": 6000}, "at most a third"),
        ({"features": "a", "heartbeat_interval_ms": 2001}, "at most a third"),
        ({"features": "a", "bootstrap_servers": "not a host:port:x"}, "'not a host:port:x' is not host:port"),
        ({"features": "a", "bootstrap_servers": "k1:9092,k2"}, "'k2' is not host:port"),
        ({"features": "a", "bootstrap_servers": "k1:99999"}, "'k1:99999' is not host:port"),
        ({"features": "a", "delivery_timeout_s": 0.001}, "greater than or equal to 1"),
    ],
)
def test_settings_the_client_or_model_would_refuse_later_are_refused_now(values, message):
    """Settings that used to pass validation and then fail with a traceback (warm-up below K, a heartbeat
    not below the session timeout, a malformed bootstrap list, a delivery timeout too short to connect)."""
    with pytest.raises(ValidationError, match=re.escape(message)):
        ConsumerSettings(**values)


def test_good_bootstrap_lists_are_accepted():
    """host:port lists, IPv6 in brackets and spaces after commas stay accepted."""
    for servers in ("localhost:9092", "k1:9092, k2:9093", "[::1]:9092", "10.0.0.1:9092"):
        assert ConsumerSettings(features="a", bootstrap_servers=servers).bootstrap_servers == servers


def _run(*flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamem", "run", "--bootstrap-servers", "127.0.0.1:1", "--connect-timeout-s", "1",
         *flags],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_a_settings_error_is_one_line_naming_the_flag():
    """Not a pydantic dump: one line per error, naming the flag and the value given."""
    result = _run("--features", "a", "--n-components", "0", "--batch-size", "-3")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "streamem run: --n-components: Input should be greater than or equal to 1 (got 0)",
        "streamem run: --batch-size: Input should be greater than or equal to 1 (got -3)",
    ], result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--warmup", "1"], "streamem run: --warmup (1) must be at least --n-components (3)"),
        (["--heartbeat-interval-ms", "10000", "--session-timeout-ms", "6000"], "--heartbeat-interval-ms"),
        (["--bootstrap-servers", "not a host:port:x"], "--bootstrap-servers: 'not a host:port:x' is not host:port"),
        (["--delivery-timeout-s", "0.001"], "--delivery-timeout-s: Input should be greater than or equal to 1"),
    ],
)
def test_settings_that_used_to_end_in_a_traceback_exit_2_in_one_line(flags, message):
    """--warmup below K, a heartbeat not below the session timeout, a malformed bootstrap list, a tiny
    delivery timeout: exit 2 with one line before anything is created, never a traceback."""
    result = _run("--features", "a", *flags)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


def test_an_http_port_in_use_is_one_line_naming_it():
    """--http-port on a port another process holds: exit 2, one line naming the port (was an OSError traceback)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("--features", "a", "--http-port", str(port))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"streamem run: --http-port {port}: cannot listen" in result.stderr, result.stderr


def test_a_misspelled_environment_variable_is_warned_about():
    """STREAMEM_N_COMPONETS=5 used to be ignored silently: one warning line naming it and the likely setting."""
    result = _run("--features", "a", "--n-components", "0", env={"STREAMEM_N_COMPONETS": "5"})
    assert (
        "streamem run: warning: STREAMEM_N_COMPONETS is not a setting and is ignored "
        "(did you mean STREAMEM_N_COMPONENTS?)" in result.stderr.splitlines()
    ), result.stderr

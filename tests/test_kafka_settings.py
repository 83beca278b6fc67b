"""Consumer settings: flags over environment over config file; the CLI is generated from the model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from connectors.kafka.cli import settings_flags
from connectors.kafka.settings import ConsumerSettings, load_settings


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

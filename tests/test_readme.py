"""Every snippet in README.md runs as written: python blocks in one session, CLI flags parsed by the real parser."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex

import pytest

from streamem.cli import build_parser

README = pathlib.Path(__file__).parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    """The fenced code blocks of README.md in the given language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _streamem_commands() -> list[list[str]]:
    """The arguments of every `streamem ...` / `python -m streamem ...` command in the README's sh blocks."""
    commands = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words = words[1:]
            if words[:3] == ["python", "-m", "streamem"]:
                commands.append(words[3:])
            elif words[:1] == ["streamem"]:
                commands.append(words[1:])
    return commands


@pytest.fixture(scope="module")
def session() -> dict:
    """The README's python blocks run in order in one namespace; returns the namespace and what they printed."""
    blocks = _blocks("python")
    assert len(blocks) >= 2
    namespace: dict = {"__name__": "readme"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    namespace["__printed__"] = printed.getvalue()
    return namespace


def test_every_python_block_runs_and_compare_prints_what_the_readme_says(session):
    """The quick example fits online close to batch EM: the mean gap the README quotes is what compare prints."""
    printed = session["__printed__"]
    gap = float(re.search(r"largest mean gap:\s+([\d.]+)", printed).group(1))
    assert gap < 0.05, printed
    quoted = re.search(r"mean gap of about ([\d.]+)", README.read_text())
    assert quoted, "the README should quote the mean gap compare prints"
    assert float(quoted.group(1)) == pytest.approx(gap, abs=0.005)
    weights = float(re.search(r"largest weight gap:\s+([\d.]+)", printed).group(1))
    log_likelihood = float(re.search(r"log-likelihood gap / rec:\s+([-+\d.]+)", printed).group(1))
    assert weights < 0.02 and abs(log_likelihood) < 0.001, printed  # "weights within 0.02", "within 0.001 nats"


def test_every_cli_command_in_the_readme_parses():
    """Each `streamem ...` command shown in the README is accepted by the real argument parser."""
    commands = _streamem_commands()
    assert {c[0] for c in commands} >= {"fit", "check", "run"}
    parser = build_parser()
    for command in commands:
        try:
            parser.parse_args(command)
        except SystemExit as error:  # argparse's way of refusing
            pytest.fail(f"README command `streamem {shlex.join(command)}` is refused by the parser ({error})")

"""The demo (the README's main job) runs end to end on its own embedded broker."""

from __future__ import annotations

import logging
import re

from streamem_connectors.kafka.demo import run_demo


def test_demo_answers_every_record_and_reports_drift(capsys, caplog):
    """A short demo: every record is answered or dead-lettered, each of the two regime switches is reported once,
    and nothing is logged at ERROR (a client closing mid metadata refresh once was)."""
    assert run_demo(records=15_000, bad_records=7, seed=1, regime_records=0) == 0
    out = capsys.readouterr().out
    summary = re.search(r"([\d,]+) records in, ([\d,]+) assignments, (\d+) dead letters, (\d+) drift events", out)
    assert summary, out
    records, assigned, dead, drifts = (int(g.replace(",", "")) for g in summary.groups())
    assert (records, assigned, dead) == (15_007, 15_000, 7)
    # the stream switches regime at records 5,000 and 10,000: one drift soon after each, no other
    reported = [int(n.replace(",", "")) for n in re.findall(r"drift at input offset \S+ \(~record ([\d,]+)\)", out)]
    assert drifts == len(reported) == 2, reported
    assert 5_000 <= reported[0] < 5_500 and 10_000 <= reported[1] < 10_500, reported
    assert "sample assignments" in out and "sample dead_letter" in out
    drift = next(line for line in out.splitlines() if "sample drift" in line)
    assert '"drift":true' in drift.replace(" ", ""), drift  # the field the sample is there to show
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_demo_shows_a_hidden_markov_model_following_regimes_a_mixture_flickers_through(capsys):
    """The demo's second part: on a stream of persistent, overlapping regimes, --model hmm changes its label
    ten times less often than --model gmm, and announces about one regime_change per true switch."""
    assert run_demo(records=3_000, bad_records=1, seed=2, regime_records=10_000) == 0
    out = capsys.readouterr().out
    found = re.search(
        r"label switches after the warm-up: mixture ([\d,]+), hidden Markov model ([\d,]+) \((\d+) regime_change "
        r"records; the stream switched (\d+) times\)",
        out,
    )
    assert found, out
    mixture, hmm, announced, true = (int(g.replace(",", "")) for g in found.groups())
    assert hmm * 10 < mixture, (hmm, mixture)
    assert abs(announced - true) <= 0.2 * true + 3, (announced, true)

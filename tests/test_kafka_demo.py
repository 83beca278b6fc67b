"""The demo (the README's main job) runs end to end on its own embedded broker."""

from __future__ import annotations

import re

from connectors.kafka.demo import run_demo


def test_demo_answers_every_record_and_reports_drift(capsys):
    """A short demo: every record is answered or dead-lettered, the regime switches are reported."""
    assert run_demo(records=15_000, bad_records=7, seed=1) == 0
    out = capsys.readouterr().out
    summary = re.search(r"([\d,]+) records in, ([\d,]+) assignments, (\d+) dead letters, (\d+) drift events", out)
    assert summary, out
    records, assigned, dead, drifts = (int(g.replace(",", "")) for g in summary.groups())
    assert (records, assigned, dead) == (15_007, 15_000, 7)
    assert drifts >= 1
    assert "sample assignments" in out and "sample dead_letter" in out

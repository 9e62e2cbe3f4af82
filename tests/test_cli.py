"""`sourcetrace demo` (the README's first command) and `info` run end to end."""

import pytest
from typer.testing import CliRunner

import sourcetrace as st
from sourcetrace.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_demo_records_replays_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--queries", "2", "--k", "2"])
    assert result.exit_code == 0, result.output
    assert "without those 2 proponents the margin would change by" in result.output
    assert (out / "report.html").exists() and (out / "trajectory" / "manifest.json").exists()
    scores = st.Scores.load(out / "scores")
    assert scores.shape == (2, 1000) and scores.method == "replay"
    assert 'id="st-root"' in (out / "report.html").read_text()


def test_info_lists_methods_and_benchmarks():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    for name in ("replay", "source", "tracin", "ekfac"):
        assert name in result.output

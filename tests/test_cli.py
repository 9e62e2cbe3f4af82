"""The `sourcetrace` command: the demo end to end (and served), and user errors answered like a tool."""

import socket

import pytest
from typer.testing import CliRunner

import sourcetrace as st
from sourcetrace.cli import app

runner = CliRunner()


def refused(args, *fragments, code=None):
    """Run the command; it must fail with a one-line error, a hint and no traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, TypeError))
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert any(line.startswith("hint: ") for line in lines), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return result


@pytest.mark.slow
def test_demo_records_replays_writes_the_report_and_is_servable(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sourcetrace.views import create_app

    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--queries", "2", "--k", "2"])
    assert result.exit_code == 0, result.output
    assert "without those 2 proponents the margin would change by" in result.output
    assert f"sourcetrace serve {out}" in " ".join(result.output.split())
    assert (out / "report.html").exists() and (out / "trajectory" / "manifest.json").exists()
    scores = st.Scores.load(out / "scores")
    assert scores.shape == (2, 1000) and scores.method == "replay"
    assert 'id="st-root"' in (out / "report.html").read_text()
    with TestClient(create_app(out)) as client:  # what `sourcetrace serve OUT` serves
        view = client.get("/api/view").json()
        assert [q["result"]["top"][0]["index"] for q in view["queries"]] == \
            [scores.top(row=q, k=1)[0].index for q in range(2)]
        assert view["can_attribute"] is False
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(port=port))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = runner.invoke(app, ["serve", str(out), "--port", str(port)])
    assert result.exit_code == 0 and seen == {"port": port}, result.output


def test_info_lists_methods_and_benchmarks():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    for name in ("replay", "source", "tracin", "ekfac"):
        assert name in result.output


def test_info_refuses_arguments():
    result = runner.invoke(app, ["info", "--verbose"])
    assert result.exit_code == 2 and "No such option" in result.output and "Traceback" not in result.output


def test_demo_errors(tmp_path):
    refused(["demo", "nosuchdemo"], "unknown demo 'nosuchdemo'", "available: digits", code=2)
    (tmp_path / "file").write_text("x")
    refused(["demo", "--out", str(tmp_path / "file")], "is a file", "--out")
    refused(["demo", "--out", str(tmp_path / "d"), "--queries", "0"], "queries must be between 1 and 797")
    refused(["demo", "--out", str(tmp_path / "d"), "--queries", "5000"], "queries must be between")
    refused(["demo", "--out", str(tmp_path / "d"), "--k", "0"], "k must be at least 1")


def test_bench_errors(tmp_path):
    refused(["bench", "nosuchbench"], "unknown benchmark 'nosuchbench'", "digits-mlp", code=2)
    (tmp_path / "file").write_text("x")
    refused(["bench", "digits-mlp", "--out", str(tmp_path / "file")], "is a file")
    refused(["bench", "digits-mlp", "--workdir", str(tmp_path / "file")], "--workdir", "is a file")


def test_serve_errors(tmp_path):
    refused(["serve", str(tmp_path / "sourcetrace-demo")], "no folder", "run `sourcetrace demo` first")
    (tmp_path / "file").write_text("x")
    refused(["serve", str(tmp_path / "file")], "is a file, not a folder")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.html").write_text("<html></html>")
    refused(["serve", str(tmp_path / "old")], "holds no view (view.json is missing)",
            "open that in a browser", "save_view")
    import torch

    from sourcetrace.views import save_view

    view = tmp_path / "view"
    save_view(view, st.Scores(torch.eye(2), ["a", "b"], ["q", "r"]), report=False)
    refused(["serve", str(view), "--port", "70000"], "--port 70000 is not a TCP port")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        refused(["serve", str(view), "--port", str(busy.getsockname()[1])], "cannot listen", "--port")
    (view / "view.json").write_text('{"format": "other/9"}')
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    refused(["serve", str(view), "--port", str(free)], "has format 'other/9'")

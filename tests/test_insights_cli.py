"""`sourcetrace whatif`: the saved example, an action predicted and verified, and clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sourcetrace import insights as ins
from sourcetrace.cli import app
from sourcetrace.insights.planted import plant, tabular_data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    x, y, sub = tabular_data(n=700, seed=2)
    path = tmp_path_factory.mktemp("whatif")
    plant(
        x, y, sub, name="small", n_train=300, n_query=120, n_pool=15, n_poison=15, n_slice=20, seed=2
    ).setting.save(path)
    return path


def test_whatif_remove_group_prints_prediction_beside_retraining(folder):
    result = CliRunner().invoke(app, ["whatif", str(folder), "--group", "source=batch-P", "--verify"])
    assert result.exit_code == 0, result.output
    assert "predicted" in result.output and "retrained" in result.output
    saved = json.loads((folder / "whatif" / "remove-15.json").read_text())
    s = ins.Setting.load(folder)
    before = s.margins(s.train())
    w = np.where(s.train_meta["source"] == "batch-P", 0.0, 1.0)
    after = s.margins(s.train(weights=w))  # retrained here, independently of the command
    assert saved["before"] == pytest.approx(before.mean())
    assert saved["actual_after"] == pytest.approx(after.mean())
    assert f"{saved['predicted_after']:.4f}" in result.output and f"{after.mean():.4f}" in result.output


def test_whatif_relabel_and_acquire_predict_without_retraining(folder):
    r = CliRunner().invoke(
        app, ["whatif", str(folder), "--action", "relabel", "--rows", "0,1", "--metric", "loss"]
    )
    assert r.exit_code == 0, r.output
    assert "relabel 2 training rows" in r.output and "–" in r.output  # nothing retrained
    r = CliRunner().invoke(
        app, ["whatif", str(folder), "--action", "acquire", "--rows", "0,1,2", "--slice", "label=2"]
    )
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--group", "nope=1"], "no column 'nope'"),
        (["--rows", "1", "--group", "source=batch-P"], "one of them"),
        (["--action", "delete", "--rows", "1"], "unknown action"),
        (["--rows", "99999"], "--rows must lie"),
    ],
)
def test_whatif_errors_say_what_to_do(folder, args, message):
    result = CliRunner().invoke(app, ["whatif", str(folder), *args])
    assert result.exit_code == 1 and message in result.output


def test_whatif_without_a_setting_points_to_the_example(tmp_path):
    result = CliRunner().invoke(app, ["whatif", str(tmp_path), "--rows", "1"])
    assert result.exit_code == 1 and "--example" in result.output


def test_readme_insights_example_runs(tmp_path, monkeypatch):
    import re

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "insights" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.replace("print(", "(lambda *a: None)("), "README.md", "exec"), namespace)
    assert namespace["worst"] == "batch-P"
    effect = namespace["effect"]
    assert effect.actual_change > 0 and effect.predicted_change > 0

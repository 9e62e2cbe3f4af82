"""The README's Python quick start runs as written."""

import re
from pathlib import Path


def test_quick_start_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    scores = namespace["scores"]
    assert scores.shape == (5, 200)
    assert (tmp_path / "runs/quickstart/scores/scores.json").exists()


def test_trajectory_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, re.S)[1]
    assert "TrajectoryRecorder" in block
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["source"].method.options.preconditioners is not None  # AdamW: the Adam variant
    assert len(list((tmp_path / "runs/trajectory/checkpoints").glob("step-*.safetensors"))) == 4


def test_ground_truth_api_named_in_the_readme_is_reachable():
    import sourcetrace as st

    assert callable(st.ensembles.retrain_subsets) and callable(st.evaluate.lds) and callable(st.evaluate.loo)

"""Attributor: resumable fits, refused workdirs, and a clear sourcetrace error for every bad input."""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import sourcetrace as st
from sourcetrace.errors import (
    EmptyDataError,
    MissingExtraError,
    NonFiniteError,
    ShapeError,
    SourcetraceError,
    UnsupportedModuleError,
    WorkdirMismatchError,
    require,
)
from sourcetrace.methods import gradient

N_TRAIN, D, C = 24, 4, 3


def mlp():
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N_TRAIN + 5, D, dtype=torch.float64, generator=g)
    y = torch.randint(0, C, (N_TRAIN + 5,), generator=g)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


@pytest.fixture
def small_shards(monkeypatch):
    """6 rows per shard for the float64 MLP above: 4 shards for 24 training examples."""
    dim = sum(p.numel() for p in mlp().parameters())
    monkeypatch.setattr(gradient, "SHARD_BYTES", dim * 8 * 6)


def attributor(model, workdir, method="grad-dot", task=None, **kw):
    kw.setdefault("store_dtype", "float64")
    kw.setdefault("batch_size", 3)
    return st.Attributor(model, task or st.ClassificationTask(), method=method, workdir=workdir,
                         progress=False, **kw)


def counted(task, fail_after=None):
    """Wrap the instance's train_loss (its config, hence the manifest, is unchanged): count or fail."""
    calls = []
    loss = task.train_loss

    def train_loss(model, batch):
        if fail_after is not None and len(calls) >= fail_after:
            raise RuntimeError("killed")
        calls.append(len(batch[0]))
        return loss(model, batch)

    task.train_loss = train_loss
    return task, calls


# ---- resume ---------------------------------------------------------------------------------------
def test_fit_interrupted_resumes_with_identical_scores(tmp_path, data, small_shards):
    train, queries = data
    model = mlp()
    task, _ = counted(st.ClassificationTask(), fail_after=5)  # dies in the 3rd shard (2 batches a shard)
    with pytest.raises(RuntimeError, match="killed"):
        attributor(model, tmp_path / "run", task=task).fit(train)
    store = tmp_path / "run" / "train-grads-0"
    assert sorted(p.name for p in store.glob("shard-*")) == ["shard-00000.npy", "shard-00001.npy"]

    task, calls = counted(st.ClassificationTask())
    resumed = attributor(model, tmp_path / "run", task=task).fit(train)
    assert sum(calls) == N_TRAIN - 12  # only the two missing shards were computed
    fresh = attributor(model, tmp_path / "fresh").fit(train)
    assert torch.equal(resumed.score(queries).matrix, fresh.score(queries).matrix)
    assert torch.equal(resumed.self_influence(), fresh.self_influence())


KILLED_FIT = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    import sourcetrace as st
    from sourcetrace.methods import gradient

    folder = sys.argv[1]
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model.load_state_dict(torch.load(folder + "/model.pt"))
    x, y = torch.load(folder + "/data.pt")
    gradient.SHARD_BYTES = int(sys.argv[2])
    task = st.ClassificationTask()
    loss = task.train_loss

    def slow(model, batch):
        time.sleep(0.25)
        return loss(model, batch)

    task.train_loss = slow
    st.Attributor(model, task, workdir=folder + "/run", progress=False, store_dtype="float64",
                  batch_size=3).fit((x, y))
    print("finished")
""")


def test_fit_killed_by_sigkill_resumes(tmp_path, data, small_shards):
    """A real SIGKILL after the first shard lands; the in-process rerun finishes it, same scores."""
    train, queries = data
    model = mlp()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(train, tmp_path / "data.pt")
    (tmp_path / "fit.py").write_text(KILLED_FIT)
    first = tmp_path / "run" / "train-grads-0" / "shard-00000.npy"
    command = [sys.executable, str(tmp_path / "fit.py"), str(tmp_path), str(gradient.SHARD_BYTES)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timed out"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    shards = sorted(p.name for p in first.parent.glob("shard-*.npy"))
    assert "shard-00000.npy" in shards and len(shards) < 4

    task, calls = counted(st.ClassificationTask())
    resumed = attributor(model, tmp_path / "run", task=task).fit(train)
    assert sum(calls) == N_TRAIN - 6 * len(shards)
    fresh = attributor(model, tmp_path / "fresh").fit(train)
    assert torch.equal(resumed.score(queries).matrix, fresh.score(queries).matrix)


# ---- workdir refusal ------------------------------------------------------------------------------
def test_workdir_refuses_other_settings(tmp_path, data):
    train, queries = data
    model, wd = mlp(), tmp_path / "run"
    attributor(model, wd).fit(train)
    attributor(model, wd).fit(train)  # same settings: reused

    def refused(what, **kw):
        m, t = kw.pop("model", model), kw.pop("train", train)
        with pytest.raises(WorkdirMismatchError) as info:
            attributor(m, wd, **kw).fit(t)
        msg = str(info.value)
        assert what in msg and str(wd) in msg and "use a new workdir or pass overwrite=True" in msg, msg
        return msg

    assert "method: was 'grad-dot', now 'grad-cos'" in refused("method", method="grad-cos")
    assert "options.batch_size: was 3, now 5" in refused("options", batch_size=5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    refused("model", model=other)
    x, y = train[0].clone(), train[1]
    x[3, 1] += 1e-3
    refused("data", train=(x, y))
    refused("task", task=st.ClassificationTask(measurement="loss"))

    # overwrite=True replaces the old artifacts with the new run's
    replaced = attributor(model, wd, method="grad-cos", overwrite=True).fit(train)
    assert json.loads((wd / "manifest.json").read_text())["method"] == "grad-cos"
    fresh = attributor(model, tmp_path / "fresh", method="grad-cos").fit(train)
    assert torch.equal(replaced.score(queries).matrix, fresh.score(queries).matrix)
    attributor(model, wd, method="grad-cos").fit(train)  # and is now the workdir's settings
    with pytest.raises(WorkdirMismatchError):
        attributor(model, wd).fit(train)


def test_workdir_of_a_fit_that_failed_on_bad_data_takes_the_fixed_data(tmp_path, data):
    """Nothing was computed, so nothing can be silently reused: the corrected data is accepted."""
    (x, y), queries = data
    with pytest.raises(ShapeError):
        attributor(mlp(), tmp_path / "run").fit((x, y[:, None]))
    model = mlp()
    fixed = attributor(model, tmp_path / "run").fit((x, y))
    fresh = attributor(model, tmp_path / "fresh").fit((x, y))
    assert torch.equal(fixed.score(queries).matrix, fresh.score(queries).matrix)


def test_tracin_checkpoint_file_changed_is_refused(tmp_path, data):
    train, _ = data
    path = tmp_path / "ck.pt"
    torch.save(mlp().state_dict(), path)
    attributor(mlp(), tmp_path / "run", "tracin", checkpoints=[path], learning_rates=[0.1]).fit(train)
    torch.save(mlp().state_dict(), path)  # another model saved under the same name
    with pytest.raises(WorkdirMismatchError, match="checkpoint"):
        attributor(mlp(), tmp_path / "run", "tracin", checkpoints=[path], learning_rates=[0.1]).fit(train)


# ---- bad input ------------------------------------------------------------------------------------
def test_empty_data(data):
    train, queries = data
    attr = attributor(mlp(), None)
    with pytest.raises(EmptyDataError, match="training data is empty"):
        attr.fit([])
    with pytest.raises(EmptyDataError):
        attr.fit((train[0][:0], train[1][:0]))
    attr.fit(train)
    with pytest.raises(EmptyDataError, match="queries is empty"):
        attr.score([])


def test_mismatched_label_shape(data):
    (x, y), _ = data
    with pytest.raises(ShapeError, match=r"labels must have shape \[3\]"):
        attributor(mlp(), None).fit((x, y[:, None]))
    with pytest.raises(ShapeError, match="24 inputs but 23 targets"):
        attributor(mlp(), None).fit((x, y[:-1]))
    with pytest.raises(ShapeError, match="integer class indices"):
        attributor(mlp(), None).fit((x, y.double()))


def test_nan_loss(data):
    (x, y), _ = data
    x = x.clone()
    x[4, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or infinite for 1 of 3"):
        attributor(mlp(), None).fit((x, y))


def test_unsupported_module_without_fallback(data):
    train, queries = data
    model = nn.Sequential(nn.Linear(D, 6), nn.PReLU(6), nn.Linear(6, C)).double()
    with pytest.raises(UnsupportedModuleError, match="fallback=True"):
        attributor(model, None, fallback=False).fit(train)
    # leaving the unsupported module out works without the fallback
    attributor(model, None, fallback=False, modules=["0", "2"]).fit(train).score(queries)


def test_queries_of_another_shape(data):
    train, (qx, qy) = data
    attr = attributor(mlp(), None).fit(train)
    with pytest.raises(ShapeError, match=r"training data's shape.*\(4,\).*\(5,\)"):
        attr.score((torch.randn(5, D + 1, dtype=torch.float64), qy))
    with pytest.raises(ShapeError, match="labels must have shape"):
        attr.score((qx, qy[:, None]))


def test_missing_extra():
    with pytest.raises(MissingExtraError, match=r"pip install 'sourcetrace\[llm\]'"):
        require("sourcetrace_no_such_module", "llm")
    assert require("json", "core") is json


def test_score_before_fit(data):
    attr = attributor(mlp(), None)
    with pytest.raises(SourcetraceError, match=r"call fit\(train_data\) before scoring"):
        attr.score(data[1])
    with pytest.raises(SourcetraceError, match="call fit"):
        attr.self_influence()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        st.Attributor(lambda x: x, st.ClassificationTask())

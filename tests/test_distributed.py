"""Distributed fit and score (gloo processes on 127.0.0.1) give the one-process scores, and resume."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

import sourcetrace as st
from sourcetrace import distributed

N_TRAIN, N_QUERY, BATCH = 37, 4, 5  # 8 batches, the last one short: ranks get unequal slices
METHODS = {"grad-dot": {}, "ekfac": {}, "trak": {"proj_dim": 24}}


def problem():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N_TRAIN + N_QUERY, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_QUERY,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    return model, (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


class DyingTask(st.ClassificationTask):
    """Kills its process at its first sampled label (inside EK-FAC's fit, after the stores are written)."""

    def sampled_loss(self, model, batch, generator=None):
        os._exit(3)

    def config(self):  # the same task as far as the workdir is concerned: only the fault is injected
        return st.ClassificationTask().config()


def wrapped(model, wrap):
    """The model in a DDP wrapper, or in FSDP with each Linear its own nested unit."""
    if wrap == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if wrap == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
                                        device_id=torch.device("cpu"))
    return model


def attribute(folder: Path, methods=METHODS, task=None, wrap=None) -> dict[str, dict[str, torch.Tensor]]:
    model, train, queries = problem()
    model = wrapped(model, wrap)
    out = {}
    for name, options in methods.items():
        attr = st.Attributor(model, task or st.ClassificationTask(), name, folder / name, progress=False,
                             batch_size=BATCH, store_dtype="float64", **options)
        assert type(attr.model) is torch.nn.Sequential  # a wrapper is unwrapped (FSDP: a plain copy)
        attr.fit(train)
        dense, top = attr.score(queries), attr.score(queries, top_k=3)
        out[name] = {"matrix": dense.matrix, "top_values": top.top_values, "top_indices": top.top_indices,
                     "bottom_values": top.bottom_values, "bottom_indices": top.bottom_indices}
    return out


def worker(rank: int, world: int, port: int, folder: str, methods, die: bool, wrap=None) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    torch.set_num_threads(1)
    try:
        task = DyingTask() if die and rank == world - 1 else None
        out = attribute(Path(folder), methods, task, wrap)
        if rank == 0:
            torch.save(out, Path(folder) / "scores.pt")
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, folder: Path, methods=METHODS, die: bool = False, wrap=None) -> dict:
    torch.multiprocessing.spawn(worker, args=(world, free_port(), str(folder), methods, die, wrap),
                                nprocs=world)
    return torch.load(folder / "scores.pt")


def assert_same(got: dict, want: dict) -> None:
    for name in got:
        for key, value in want[name].items():
            if key.endswith("indices"):
                assert torch.equal(got[name][key], value), (name, key)
            else:
                assert got[name][key].dtype == torch.float64
                torch.testing.assert_close(got[name][key], value, rtol=1e-10, atol=1e-10, msg=f"{name} {key}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return attribute(tmp_path_factory.mktemp("one"))


@pytest.mark.slow
def test_two_processes_score_as_one(tmp_path, one_process):
    assert_same(spawn(2, tmp_path), one_process)
    # each rank wrote only its own slice of the store
    assert {p.name for p in (tmp_path / "ekfac").iterdir() if p.is_dir()} == {
        "train-grads-0-rank0of2", "train-grads-0-rank1of2", "curvature-0-rank0of2", "curvature-0-rank1of2"}


@pytest.mark.slow
def test_four_processes_score_as_one(tmp_path, one_process):
    assert_same(spawn(4, tmp_path, {"ekfac": {}, "trak": {"proj_dim": 24}}), one_process)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_a_wrapped_model_scores_as_the_bare_one(tmp_path, one_process, wrap):
    """DDP's module, and FSDP's (nested units, sharded parameters) gathered whole, score as the bare
    model in one process: grad-dot and EK-FAC, float64."""
    assert_same(spawn(2, tmp_path, {"grad-dot": {}, "ekfac": {}}, wrap=wrap), one_process)


def test_fully_shard_is_refused_with_a_clear_error(tmp_path):
    from torch.distributed.fsdp import FSDPModule

    model, _, _ = problem()
    model.__class__ = type("FSDPSequential", (FSDPModule, type(model)), {})  # what fully_shard makes
    with pytest.raises(st.errors.InvalidOptionError, match="fully_shard"):
        st.Attributor(model, st.ClassificationTask(), "grad-dot")
    from sourcetrace.trajectory import GradientCollector

    with pytest.raises(st.errors.InvalidOptionError, match="FSDP-sharded"):
        GradientCollector(tmp_path, model, st.ClassificationTask(), N_TRAIN)
    assert distributed.unwrap(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear


@pytest.mark.slow
def test_a_rank_killed_mid_fit_resumes(tmp_path, one_process):
    methods = {"ekfac": {}}
    with pytest.raises(Exception, match="exit code 3|exited with code 3"):
        spawn(2, tmp_path, methods, die=True)
    shards = sorted((tmp_path / "ekfac").glob("train-grads-0-rank*/shard-*.npy"))
    assert len(shards) == 2  # both ranks had written their stores when rank 1 died
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in shards]
    assert not list((tmp_path / "ekfac").glob("curvature-*/*.safetensors"))  # the fit had not finished
    got = spawn(2, tmp_path, methods)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in shards] == stamps  # stores reused, not redone
    assert_same(got, one_process)


def test_curvatures_that_are_not_sums_are_refused_under_torchrun(tmp_path, monkeypatch):
    """Under several processes every curvature outside distributed.CURVATURES is refused before any pass
    over the data, with the supported ones named; the supported ones pass the check."""
    from sourcetrace.curvature import build_curvature
    from sourcetrace.curvature.base import CURVATURES
    from sourcetrace.errors import InvalidOptionError

    build_curvature("identity")  # registers the built-in curvatures
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    refused = sorted(set(CURVATURES) - set(distributed.CURVATURES))
    assert {"cg", "lissa", "arnoldi", "explicit", "datainf"} <= set(refused)
    for name in refused:
        with pytest.raises(InvalidOptionError, match=f"{name!r} is not fitted across processes.*ekfac"):
            distributed.check_supported(name, dda=False, relatif=False, combination=None)
    for name in distributed.CURVATURES:
        distributed.check_supported(name, dda=False, relatif=False, combination=None)
    model, train, _ = problem()
    attr = st.Attributor(model, st.ClassificationTask(), "influence", tmp_path, progress=False,
                         curvature="cg")
    with pytest.raises(InvalidOptionError, match="'cg' is not fitted across processes"):
        attr.fit(train)
    assert not list(tmp_path.glob("train-grads-*"))  # refused before any gradient was collected


def test_merge_of_slices_is_the_whole(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    cuts = [(0, 4), (4, 9), (9, 11)]
    from sourcetrace.methods.gradient import reduce_blocks

    for k in (None, 2, 5):
        parts = [(lo, reduce_blocks(iter([(0, hi - lo, full[:, lo:hi])]), 3, hi - lo, k)) for lo, hi in cuts]
        merged = distributed.merge_parts(parts, 11, k)
        whole = reduce_blocks(iter([(0, 11, full)]), 3, 11, k)
        for key, value in whole.items():
            assert (value is None and merged[key] is None) or torch.equal(merged[key], value)
    # slices of whole batches, every rank one at least, covering [0, n) in rank order
    for size in (1, 2, 3, 8):
        bounds = []
        for rank in range(size):
            monkeypatch.setattr(distributed, "world", lambda rank=rank, size=size: (rank, size))
            bounds.append(distributed.shard_bounds(37, 5))
        assert bounds[0][0] == 0 and bounds[-1][1] == 37
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(lo % 5 == 0 and hi > lo for lo, hi in bounds)
    monkeypatch.setattr(distributed, "world", lambda: (0, 9))
    with pytest.raises(st.errors.InvalidOptionError, match="fewer than the 9 processes"):
        distributed.shard_bounds(37, 5)

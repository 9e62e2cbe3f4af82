"""GradientStore: sharded, atomic, resumable; its contents are exactly the rows it was given."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sourcetrace.errors import WorkdirMismatchError
from sourcetrace.grads.store import GradientStore

N, DIM, SHARD = 23, 5, 6  # 4 shards, the last one short


@pytest.fixture
def source():
    return torch.randn(N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def counting(source, fail_at=None):
    """rows(lo, hi) that records its calls and raises once it reaches row `fail_at`."""
    calls = []

    def rows(lo, hi):
        if fail_at is not None and lo <= fail_at < hi:
            raise RuntimeError("interrupted")
        calls.append((lo, hi))
        return source[lo:hi]

    return rows, calls


def make(folder, **kw):
    return GradientStore(folder, N, DIM, dtype="float64", shard_size=SHARD, **kw)


def test_fill_shards_atomic_and_exact(tmp_path, source):
    store = make(tmp_path / "s")
    assert store.num_shards == 4 and store.missing() == [0, 1, 2, 3] and not store.complete
    rows, calls = counting(source)
    store.fill(rows, batch_size=4, progress=False)
    assert store.complete and store.missing() == []
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    want = ["manifest.json"] + [f"{kind}-{k:05d}.npy" for kind in ("shard", "sqnorm") for k in range(4)]
    assert names == want  # no temp files left
    assert torch.equal(store.read(), source)
    assert torch.allclose(store.sqnorms(), source.pow(2).sum(1), rtol=1e-12)
    assert torch.equal(store.read(5, 14), source[5:14])
    # batches never cross a shard boundary, and every row was computed once
    assert calls == [(0, 4), (4, 6), (6, 10), (10, 12), (12, 16), (16, 18), (18, 22), (22, 23)]
    seen = [(lo, hi) for lo, hi, _ in store.shards()]
    assert seen == [(0, 6), (6, 12), (12, 18), (18, 23)]
    # a complete store is not recomputed, and opens read-only from its manifest
    store.fill(rows, batch_size=4, progress=False)
    assert len(calls) == 8
    assert torch.equal(GradientStore.open(tmp_path / "s").read(), source)


def test_resume_after_interruption(tmp_path, source):
    store = make(tmp_path / "s")
    rows, calls = counting(source, fail_at=SHARD + 1)  # inside the 2nd shard
    with pytest.raises(RuntimeError, match="interrupted"):
        store.fill(rows, batch_size=SHARD, progress=False)
    assert store.missing() == [1, 2, 3]
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(FileNotFoundError, match="3 shards missing"):
        store.read()

    again = make(tmp_path / "s")  # a fresh process would reopen it like this
    rows, calls = counting(source)
    again.fill(rows, batch_size=SHARD, progress=False)
    assert calls == [(6, 12), (12, 18), (18, 23)]  # only the missing shards
    whole = make(tmp_path / "whole")
    whole.fill(counting(source)[0], batch_size=SHARD, progress=False)
    assert torch.equal(again.read(), whole.read())
    for k in range(4):
        assert np.array_equal(np.load(again._path(k)), np.load(whole._path(k)))


def test_store_refuses_another_layout_or_key(tmp_path, source):
    make(tmp_path / "s", key={"checkpoint": "abc"}).fill(counting(source)[0], batch_size=8, progress=False)
    with pytest.raises(WorkdirMismatchError, match="checkpoint"):
        make(tmp_path / "s", key={"checkpoint": "other"})
    with pytest.raises(WorkdirMismatchError, match="dim"):
        GradientStore(tmp_path / "s", N, DIM + 1, dtype="float64", shard_size=SHARD,
                      key={"checkpoint": "abc"})
    fresh = make(tmp_path / "s", key={"checkpoint": "other"}, overwrite=True)
    assert fresh.missing() == [0, 1, 2, 3]


def test_bad_rows_and_dtype(tmp_path, source):
    store = make(tmp_path / "s")
    with pytest.raises(ValueError, match="expected"):
        store.fill(lambda lo, hi: source[lo:hi, :2], batch_size=4, progress=False)
    with pytest.raises(ValueError, match="store dtype"):
        GradientStore(tmp_path / "t", N, DIM, dtype="int8")


def test_float32_store_rounds_once(tmp_path, source):
    store = GradientStore(tmp_path / "s", N, DIM, shard_size=SHARD)
    store.fill(counting(source)[0], batch_size=4, progress=False)
    got = store.read()
    assert got.dtype == torch.float32 and torch.equal(got, source.float())


def test_throwaway_store_stays_in_memory(tmp_path, source):
    store = GradientStore(tmp_path / "m", N, DIM, dtype="float64", shard_size=SHARD, persist=False)
    rows, _ = counting(source)
    store.fill(rows, batch_size=4, progress=False)
    assert store.complete and torch.equal(store.read(), source)
    assert torch.allclose(store.sqnorms(), source.pow(2).sum(1), rtol=1e-12)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["manifest.json"]  # nothing else written


# ---- scale: half precision, memory maps, a killed fill -------------------------------------------------

@pytest.mark.parametrize("dtype, torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_store_holds_the_rounded_rows(tmp_path, source, dtype, torch_dtype):
    store = GradientStore(tmp_path / "s", N, DIM, dtype=dtype, shard_size=SHARD)
    store.fill(counting(source)[0], batch_size=4, progress=False)
    again = GradientStore.open(tmp_path / "s")
    got = again.read()
    assert got.dtype == torch_dtype and torch.equal(got, source.to(torch_dtype))
    # the norms are those of the rows as stored, so self-influence matches what scoring sees
    assert torch.allclose(again.sqnorms(), source.to(torch_dtype).double().pow(2).sum(1), rtol=1e-12)
    assert store.nbytes == N * DIM * 2


def test_shards_are_memory_maps_one_at_a_time(tmp_path, source):
    make(tmp_path / "s").fill(counting(source)[0], batch_size=4, progress=False)
    store = GradientStore.open(tmp_path / "s")
    stream = store.shards()
    lo, hi, rows = next(stream)
    assert mapped(rows.data_ptr()) == str(store._path(0).resolve())  # in a map of the file
    assert mapped(next(stream)[2].data_ptr()) == str(store._path(1).resolve())
    assert torch.equal(rows, source[lo:hi])
    rows += 1.0  # copy-on-write: the file is never changed by a reader
    assert torch.equal(GradientStore.open(tmp_path / "s").read(0, hi), source[:hi])


def mapped(address: int) -> str | None:
    """The file whose memory mapping holds `address` in this process (Linux /proc/self/maps), if any."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else None
    return None


def _fill_and_die(folder: str) -> None:
    """Child process: fill a store, SIGKILL itself inside the third shard (no cleanup runs)."""
    import os
    import signal

    src = torch.randn(N, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def rows(lo, hi):
        if lo >= 2 * SHARD:
            os.kill(os.getpid(), signal.SIGKILL)
        return src[lo:hi]

    GradientStore(folder, N, DIM, dtype="float64", shard_size=SHARD).fill(rows, batch_size=4, progress=False)


def test_resume_after_a_kill(tmp_path, source):
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=_fill_and_die, args=(str(tmp_path / "s"),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -9  # killed, not finished
    store = make(tmp_path / "s")
    assert store.missing() == [2, 3]
    rows, calls = counting(source)
    store.fill(rows, batch_size=4, progress=False)
    assert {lo // SHARD for lo, _ in calls} == {2, 3}
    assert torch.equal(store.read(), source)
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_scores_match_float32(tmp_path, dtype):
    """Projected gradients kept in 16 bits score like the float32 store, within the rounding of 16 bits."""
    import sourcetrace as st

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    scores = {}
    for d in ("float32", dtype):
        attr = st.Attributor(model, st.ClassificationTask(), "grad-dot", tmp_path / d, progress=False,
                             features="random", proj_dim=16, store_dtype=d)
        scores[d] = attr.fit((x, y)).score((x[:5], y[:5])).matrix
    ref, got = scores["float32"], scores[dtype]
    eps = 2.0**-8 if dtype == "bfloat16" else 2.0**-11  # unit roundoff of the stored rows
    assert (got - ref).abs().max() <= 4 * eps * ref.abs().max()
    assert not torch.equal(got, ref)  # the rows really were rounded


class Lazy(torch.utils.data.Dataset):
    """n examples computed from their index: the data themselves take no memory."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([math.sin(i), math.cos(i), math.sin(3.0 * i), i % 5 / 5.0]), torch.tensor(i % 3)


@pytest.mark.slow
def test_fit_and_top_k_keep_no_python_object_per_example(tmp_path):
    """Python allocations (tracemalloc) of fit + top-k scoring do not grow with the number of examples:
    ids stay a range and the rows' norms stay on disk (before: a list of ids, their int objects, a set to
    check them and the norms in memory, about 50 bytes per example)."""
    import gc
    import tracemalloc

    import sourcetrace as st

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    queries = [Lazy(3)[i] for i in range(3)]
    kept, peak = {}, {}
    for n in (20_000, 60_000):  # ids of 5 digits at both sizes (the JSON fingerprint of a chunk)
        attr = st.Attributor(model, st.ClassificationTask(), "grad-dot", tmp_path / str(n), progress=False,
                             features="random", proj_dim=8, store_dtype="float16", batch_size=1000)
        gc.collect()
        tracemalloc.start()
        try:
            attr.fit(Lazy(n))
            top = attr.score(queries, top_k=5)
            gc.collect()
            kept[n], peak[n] = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert top.train_ids == list(range(n)) and top.top_indices.shape == (3, 5)
    added = 40_000
    assert (kept[60_000] - kept[20_000]) / added < 2, kept  # bytes kept per added example
    assert (peak[60_000] - peak[20_000]) / added < 4, peak  # bytes at the peak per added example

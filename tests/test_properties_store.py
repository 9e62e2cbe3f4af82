"""Property tests of the gradient store's streaming: whatever the shard and batch sizes, in memory or on
disk, interrupted or not, the rows that stream out are the rows that went in."""

from __future__ import annotations

import contextlib
import tempfile

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

from sourcetrace.grads.store import GradientStore

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Interrupted(Exception):
    pass


def source(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@SETTINGS
@given(n=st_.integers(1, 60), dim=st_.integers(1, 7), shard=st_.integers(1, 25), batch=st_.integers(1, 30),
       persist=st_.booleans(), seed=st_.integers(0, 1000), data=st_.data())
def test_rows_stream_out_as_they_went_in(n, dim, shard, batch, persist, seed, data):
    rows = source(n, dim, seed)
    calls: list[tuple[int, int]] = []

    def compute(lo: int, hi: int) -> torch.Tensor:
        calls.append((lo, hi))
        return rows[lo:hi]

    with tempfile.TemporaryDirectory() as tmp:
        store = GradientStore(tmp, n, dim, dtype="float64", shard_size=shard, persist=persist)
        store.fill(compute, batch_size=batch, progress=False)
        # every row computed exactly once, in blocks no larger than the batch, never across a shard edge
        tiles = sorted(calls)
        assert tiles[0][0] == 0 and tiles[-1][1] == n and all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
        assert all(0 < hi - lo <= batch for lo, hi in calls)
        assert all(lo // shard == (hi - 1) // shard for lo, hi in calls)
        streamed = list(store.shards())
        assert [lo for lo, _, _ in streamed] == list(range(0, n, shard))
        assert torch.equal(torch.cat([r for _, _, r in streamed]), rows)
        np.testing.assert_allclose(store.sqnorms().numpy(), (rows * rows).sum(1).numpy(), rtol=1e-12)
        lo = data.draw(st_.integers(0, n))
        hi = data.draw(st_.integers(lo, n))
        assert torch.equal(store.read(lo, hi), rows[lo:hi])
        if persist:  # reopened from disk alone, it streams the same rows
            again = GradientStore.open(tmp)
            assert torch.equal(torch.cat([r for _, _, r in again.shards()]), rows)


@SETTINGS
@given(n=st_.integers(2, 50), dim=st_.integers(1, 5), shard=st_.integers(1, 12), batch=st_.integers(1, 12),
       stop_after=st_.integers(1, 10), seed=st_.integers(0, 1000))
def test_an_interrupted_fill_resumes_to_the_same_rows(n, dim, shard, batch, stop_after, seed):
    rows = source(n, dim, seed)
    calls = {"n": 0}

    def flaky(lo: int, hi: int) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > stop_after:
            raise Interrupted
        return rows[lo:hi]

    recomputed: list[tuple[int, int]] = []

    def steady(lo: int, hi: int) -> torch.Tensor:
        recomputed.append((lo, hi))
        return rows[lo:hi]

    with tempfile.TemporaryDirectory() as tmp:
        first = GradientStore(tmp, n, dim, dtype="float64", shard_size=shard)
        with contextlib.suppress(Interrupted):
            first.fill(flaky, batch_size=batch, progress=False)
        done = [k for k in range(first.num_shards) if k not in first.missing()]
        resumed = GradientStore(tmp, n, dim, dtype="float64", shard_size=shard)  # a new process, same folder
        resumed.fill(steady, batch_size=batch, progress=False)
        # only the missing shards were computed again, and the result is the uninterrupted one
        redone = {lo // shard for lo, _ in recomputed}
        assert not redone & set(done) and redone == set(range(resumed.num_shards)) - set(done)
        assert torch.equal(resumed.read(), rows)
        np.testing.assert_allclose(resumed.sqnorms().numpy(), (rows * rows).sum(1).numpy(), rtol=1e-12)

"""GradientIndex: FAISS over a store gives the exact streaming top-k (flat), and IVF-PQ's scores are exact."""

from __future__ import annotations

import pytest
import torch

import sourcetrace as st
from sourcetrace.errors import InvalidOptionError
from sourcetrace.grads.index import GradientIndex, index_attributor
from sourcetrace.grads.store import GradientStore

pytest.importorskip("faiss")


def brute_top(rows: torch.Tensor, queries: torch.Tensor, k: int):
    """Exact top-k scores -qᵀg by a dense matrix (the independent computation)."""
    full = -(queries.double() @ rows.double().T)
    return full.topk(k, dim=1), full.topk(k, dim=1, largest=False)


@pytest.fixture
def store(tmp_path):
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(3000, 16, generator=gen)
    s = GradientStore(tmp_path / "s", 3000, 16, shard_size=700)
    s.fill(lambda lo, hi: rows[lo:hi], batch_size=256, progress=False)
    return s, rows


def test_flat_index_is_the_exact_top_k(store, tmp_path):
    s, rows = store
    queries = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    index = GradientIndex(s, folder=tmp_path / "idx", progress=False)
    assert index.kind == "flat"
    got = index.scores(queries, 10, train_ids=list(range(3000)), query_ids=list(range(5)))
    (tv, ti), (bv, bi) = brute_top(rows, queries, 10)
    assert torch.equal(got.top_indices, ti) and torch.equal(got.bottom_indices, bi)
    torch.testing.assert_close(got.top_values, tv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.bottom_values, bv, rtol=1e-5, atol=1e-5)
    assert [a.index for a in got.top(0, k=3)] == ti[0, :3].tolist()
    again = GradientIndex(s, folder=tmp_path / "idx", progress=False)  # loaded, not rebuilt
    assert torch.equal(again.search(queries, 4)[1], index.search(queries, 4)[1])


def test_ivfpq_returns_exact_scores_of_good_candidates(store):
    s, rows = store
    queries = torch.randn(20, 16, generator=torch.Generator().manual_seed(3))
    index = GradientIndex(s, kind="ivfpq", nlist=16, nprobe=16, m=8, progress=False)
    values, found = index.search(-queries, 10)
    exact = -(queries.double() @ rows.double().T)
    # every returned value is the exact score of the returned row
    torch.testing.assert_close(values, exact.gather(1, found), rtol=1e-5, atol=1e-5)
    (_, ti), _ = brute_top(rows, queries, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, ti)) / ti.numel()
    assert recall >= 0.9  # every cluster probed, fine codes, 10x candidates rescored


def test_attributor_index_matches_streaming_top_k(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 6, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    for method, options in (("grad-dot", {"features": "random", "proj_dim": 32}), ("grad-cos", {}),
                            ("ekfac", {})):
        attr = st.Attributor(model, st.ClassificationTask(), method, tmp_path / method, progress=False,
                             **options).fit((x, y))
        want = attr.score((x[:4], y[:4]), top_k=5)
        got = index_attributor(attr, kind="flat", progress=False).score((x[:4], y[:4]), k=5)
        assert torch.equal(got.top_indices, want.top_indices), method
        assert torch.equal(got.bottom_indices, want.bottom_indices), method
        torch.testing.assert_close(got.top_values, want.top_values.double(), rtol=1e-4, atol=1e-5)
    trak = st.Attributor(model, st.ClassificationTask(), "trak", tmp_path / "trak", progress=False,
                         proj_dim=16).fit((x, y))
    with pytest.raises(InvalidOptionError, match="inner-product index"):
        index_attributor(trak)


def test_ivfflat_returns_exact_scores_and_the_top_k_when_every_cluster_is_searched(store):
    s, rows = store
    queries = torch.randn(20, 16, generator=torch.Generator().manual_seed(4))
    (_, ti), _ = brute_top(rows, queries, 10)
    exact = -(queries.double() @ rows.double().T)
    full = GradientIndex(s, kind="ivfflat", nlist=8, nprobe=8, progress=False)
    values, found = full.search(-queries, 10)
    torch.testing.assert_close(values, exact.gather(1, found), rtol=1e-5, atol=1e-5)
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(found, ti))  # every cluster: exact
    some = GradientIndex(s, kind="ivfflat", nlist=8, nprobe=1, progress=False)
    _, part = some.search(-queries, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(part, ti)) / ti.numel()
    assert recall < 1.0  # one cluster of eight: an approximation, which the benchmark measures

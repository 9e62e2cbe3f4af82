"""Property tests of Scores: extremes equal a full sort, streamed top-k equals dense, groups are sums,
and every kind of id survives save/load."""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_
from hypothesis.extra.numpy import arrays
from torch import nn

import sourcetrace as st
from sourcetrace import Scores

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
finite = st_.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=64)


@st_.composite
def matrices(draw, max_rows=5, max_cols=12):
    rows, cols = draw(st_.integers(1, max_rows)), draw(st_.integers(1, max_cols))
    return draw(arrays(np.float64, (rows, cols), elements=finite))


ids_scalar = st_.one_of(st_.integers(-10**6, 10**6), st_.text(max_size=6))
ids_any = st_.recursive(ids_scalar, lambda inner: st_.tuples(inner, inner) | st_.tuples(inner), max_leaves=4)


@FAST
@given(matrices(), st_.integers(1, 15))
def test_top_and_bottom_equal_a_full_sort(m, k):
    scores = Scores(torch.from_numpy(m), [f"t{i}" for i in range(m.shape[1])], list(range(m.shape[0])))
    for r in range(m.shape[0]):
        row = m[r]
        want = min(k, row.size)
        for got, descending in ((scores.top(row=r, k=k), True), (scores.bottom(row=r, k=k), False)):
            ordered = sorted(row.tolist(), reverse=descending)[:want]
            assert [a.score for a in got] == ordered  # the k extremes, in order
            assert len({a.index for a in got}) == want  # distinct examples
            for a in got:  # each is what it says: its id, its position and its score agree
                assert a.train_id == f"t{a.index}" and row[a.index] == a.score


@FAST
@given(matrices(), st_.lists(st_.sampled_from(["a", "b", ("c", 1), 7]), min_size=12, max_size=12))
def test_group_by_sums_each_groups_columns(m, labels):
    labels = labels[: m.shape[1]]
    train_ids = [("doc", i) for i in range(m.shape[1])]
    scores = Scores(torch.from_numpy(m), train_ids, [f"q{r}" for r in range(m.shape[0])])
    for given_as in (labels, dict(zip(train_ids, labels))):
        grouped = scores.group_by(given_as)
        assert sorted(grouped.train_ids, key=str) == sorted(set(labels), key=str)
        for j, group in enumerate(grouped.train_ids):
            members = [i for i, lab in enumerate(labels) if lab == group]
            want = m[:, members].sum(1)
            np.testing.assert_allclose(grouped.matrix[:, j].numpy(), want, rtol=1e-12, atol=1e-9)
            assert grouped.metadata["group_sizes"][j] == len(members)


@FAST
@given(st_.data())
def test_save_load_round_trip_with_every_id_type(data):
    n_train = data.draw(st_.integers(1, 6))
    n_query = data.draw(st_.integers(1, 3))
    train_ids = data.draw(st_.lists(ids_any, min_size=n_train, max_size=n_train, unique=True))
    query_ids = data.draw(st_.lists(ids_any, min_size=n_query, max_size=n_query, unique=True))
    m = torch.from_numpy(data.draw(arrays(np.float64, (n_query, n_train), elements=finite)))
    dense = Scores(m, train_ids, query_ids, "grad-dot", {"note": "x"}, self_influence=m[0].abs().clone())
    k = data.draw(st_.integers(1, n_train))
    top = torch.topk(m, k, dim=1)
    bottom = torch.topk(m, k, dim=1, largest=False)
    kept = Scores(None, train_ids, query_ids, "grad-dot", top_values=top.values, top_indices=top.indices,
                  bottom_values=bottom.values, bottom_indices=bottom.indices)
    with tempfile.TemporaryDirectory() as tmp:
        for scores in (dense, kept):
            back = Scores.load(scores.save(f"{tmp}/s"))
            assert back.train_ids == train_ids and back.query_ids == query_ids
            assert [type(i) for i in back.train_ids] == [type(i) for i in train_ids]
            for name in ("matrix", "self_influence", "top_values", "top_indices", "bottom_values",
                         "bottom_indices"):
                a, b = getattr(scores, name), getattr(back, name)
                assert (a is None and b is None) or torch.equal(a, b)
            for qid in query_ids:
                assert back.top(query_id=qid, k=k) == scores.top(query_id=qid, k=k)
                assert back.bottom(query_id=qid, k=k) == scores.bottom(query_id=qid, k=k)


def _problem(seed: int, n_train: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n_train + 3,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st_.integers(0, 10**6), st_.integers(2, 30), st_.integers(1, 8), st_.integers(1, 35),
       st_.sampled_from(["grad-dot", "grad-cos"]))
def test_streamed_top_k_equals_the_dense_extremes(seed, n_train, batch_size, k, method):
    """Through the public Attributor: scoring with top_k keeps exactly the dense matrix's extremes."""
    model, train, queries = _problem(seed, n_train)
    attr = st.Attributor(model, st.ClassificationTask(), method, progress=False, batch_size=batch_size)
    attr.fit(train)
    dense = attr.score(queries)
    kept = attr.score(queries, top_k=k)
    assert not kept.is_dense and kept.shape == dense.shape
    k = min(k, n_train)
    for r in range(dense.shape[0]):
        for streamed, full in ((kept.top(row=r, k=k), dense.top(row=r, k=k)),
                               (kept.bottom(row=r, k=k), dense.bottom(row=r, k=k))):
            np.testing.assert_allclose([a.score for a in streamed], [a.score for a in full], rtol=1e-10,
                                       atol=1e-12)
            for a in streamed:  # ties may pick other members, but each kept score is the dense one
                assert abs(float(dense.matrix[r, a.index]) - a.score) <= 1e-10 * (1 + abs(a.score))

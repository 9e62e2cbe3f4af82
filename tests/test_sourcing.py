"""Sourcing metrics against brute-force definitions."""

import itertools

import numpy as np
import pytest

from sourcetrace.errors import EmptyDataError, ShapeError
from sourcetrace.evaluate.sourcing import entity_top1, mrr, recall_at_k, sourcing_auc, sourcing_report


def _data(seed=0, n_query=6, n_train=15, ties=False):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_query, n_train))
    if ties:
        scores = np.round(scores)  # many exact ties
    sources = [sorted(rng.choice(n_train, size=rng.integers(1, 4), replace=False).tolist())
               for _ in range(n_query)]
    cands = [sorted(set(s) | set(rng.choice(n_train, size=4, replace=False).tolist())) for s in sources]
    return scores, sources, cands


def _brute_auc(row, src):
    pos = [row[i] for i in src]
    neg = [row[j] for j in range(len(row)) if j not in src]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])


def _orderings(row, rng, n=400):
    """Random tie-breaking orders (descending score), to average a metric over ties."""
    for _ in range(n):
        yield np.lexsort((rng.random(len(row)), -row))


@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_pairwise_count(ties):
    scores, sources, _ = _data(ties=ties)
    expected = np.mean([_brute_auc(r, s) for r, s in zip(scores, sources)])
    assert sourcing_auc(scores, sources) == pytest.approx(expected)


@pytest.mark.parametrize("ties", [False, True])
def test_recall_and_mrr_match_tie_averaged_brute_force(ties):
    scores, sources, _ = _data(ties=ties)
    rng = np.random.default_rng(1)
    rec = {k: [] for k in (1, 3, 5)}
    rr = []
    for row, src in zip(scores, sources):
        r_k = {k: [] for k in rec}
        r_rr = []
        for order in _orderings(row, rng) if ties else [np.argsort(-row)]:
            for k in rec:
                r_k[k].append(len(set(order[:k].tolist()) & set(src)) / len(src))
            first = min(list(order).index(i) for i in src)
            r_rr.append(first + 1)
        for k in rec:
            rec[k].append(np.mean(r_k[k]))
        rr.append(1 / np.mean(r_rr))  # MRR's rank is the tie-averaged rank
    tol = 0.05 if ties else 1e-12
    for k in rec:
        assert recall_at_k(scores, sources, k) == pytest.approx(np.mean(rec[k]), abs=tol)
    assert mrr(scores, sources) == pytest.approx(np.mean(rr), abs=tol)


def test_entity_top1_brute_force_and_ties():
    scores, sources, cands = _data()
    expected = np.mean([float(max(c, key=lambda j: row[j]) in s)
                        for row, s, c in zip(scores, sources, cands)])
    assert entity_top1(scores, sources, cands) == pytest.approx(expected)
    tied = np.zeros((1, 5))  # all tied: the chance of picking a source among the candidates
    assert entity_top1(tied, [[1]], [[0, 1, 2, 3]]) == pytest.approx(0.25)


def test_hand_computed_values():
    s = np.array([[0.9, 0.1, 0.5, 0.7]])
    assert mrr(s, [[2]]) == pytest.approx(1 / 3)
    assert sourcing_auc(s, [[2]]) == pytest.approx(1 / 3)
    assert recall_at_k(s, [[2, 0]], 2) == pytest.approx(0.5)
    assert sourcing_report(s, [[0]], [[0, 1]])["entity_top1"] == 1.0
    constant = np.zeros((1, 4))
    assert sourcing_auc(constant, [[1]]) == 0.5
    assert mrr(constant, [[1]]) == pytest.approx(1 / 2.5)


def test_errors():
    s = np.zeros((2, 3))
    with pytest.raises(ShapeError):
        mrr(s, [[0]])
    with pytest.raises(EmptyDataError):
        mrr(s, [[0], []])
    with pytest.raises(ShapeError):
        sourcing_auc(s, [[0], [3]])
    with pytest.raises(ShapeError):
        entity_top1(s, [[0], [1]], [[0], [2]])

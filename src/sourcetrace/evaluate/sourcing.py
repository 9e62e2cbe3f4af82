"""Sourcing metrics: does a method rank a query's known source documents first?

Each query has a set of known sources (indices into the training set). Under the project's sign convention
a source should score high. Metrics are means over queries; ties are counted half (AUC, MRR) or shared
(entity top-1), so a constant score earns chance, never a perfect mark.

- `sourcing_auc`: probability that a random source outscores a random non-source.
- `recall_at_k`: fraction of a query's sources among its k highest scores (ties at the k-th place shared).
- `mrr`: mean reciprocal rank of the best-ranked source.
- `entity_top1`: among a candidate subset (e.g. the documents naming the query's entity), whether the top
  scored is a source; AUC saturates on lexical matches, this does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import EmptyDataError, NonFiniteError, ShapeError
from .lds import score_matrix


def _check(scores: Any, sources: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
    matrix = np.asarray(score_matrix(scores), dtype=np.float64)
    if matrix.ndim != 2:
        raise ShapeError(f"scores must be [n_query, n_train]; got shape {list(matrix.shape)}")
    if len(sources) != matrix.shape[0]:
        raise ShapeError(f"{len(sources)} source lists for {matrix.shape[0]} queries; give one per query")
    if not np.all(np.isfinite(matrix)):
        raise NonFiniteError("scores contain NaN or infinite values")
    out = []
    for q, s in enumerate(sources):
        idx = np.unique(np.asarray(list(s), dtype=np.int64))
        if idx.size == 0:
            raise EmptyDataError(f"query {q} has no sources; every query needs at least one")
        if idx.min() < 0 or idx.max() >= matrix.shape[1]:
            raise ShapeError(f"query {q} has a source index outside 0..{matrix.shape[1] - 1}")
        out.append(idx)
    return matrix, out


def _mask(n: int, idx: np.ndarray) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[idx] = True
    return m


def sourcing_auc(scores: Any, sources: Sequence[Sequence[int]], per_query: bool = False) -> Any:
    """Mean over queries of P(score(source) > score(non-source)), ties counted ½."""
    matrix, srcs = _check(scores, sources)
    vals = []
    for row, idx in zip(matrix, srcs):
        pos = _mask(row.size, idx)
        if pos.all():
            raise ShapeError("a query whose sources are the whole training set has no AUC")
        neg = np.sort(row[~pos])
        p = row[pos]
        below = np.searchsorted(neg, p, side="left")
        ties = np.searchsorted(neg, p, side="right") - below
        vals.append(float((below + 0.5 * ties).sum() / (p.size * neg.size)))
    return np.array(vals) if per_query else float(np.mean(vals))


def recall_at_k(scores: Any, sources: Sequence[Sequence[int]], k: int, per_query: bool = False) -> Any:
    """Mean over queries of the fraction of sources in the top k (a tie at the cut is shared evenly)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    matrix, srcs = _check(scores, sources)
    vals = []
    for row, idx in zip(matrix, srcs):
        k_ = min(k, row.size)
        cut = np.sort(row)[::-1][k_ - 1]
        above = row > cut
        tied = row == cut
        share = (k_ - above.sum()) / tied.sum()  # places left at the cut, shared by the tied items
        pos = _mask(row.size, idx)
        vals.append(float(((pos & above).sum() + share * (pos & tied).sum()) / idx.size))
    return np.array(vals) if per_query else float(np.mean(vals))


def mrr(scores: Any, sources: Sequence[Sequence[int]], per_query: bool = False) -> Any:
    """Mean reciprocal rank of the best source: rank = 1 + #non-sources above it + ½ #non-sources tied."""
    matrix, srcs = _check(scores, sources)
    vals = []
    for row, idx in zip(matrix, srcs):
        pos = _mask(row.size, idx)
        best = row[pos].max()
        rank = 1 + (row[~pos] > best).sum() + 0.5 * (row[~pos] == best).sum()
        vals.append(1.0 / rank)
    return np.array(vals) if per_query else float(np.mean(vals))


def entity_top1(scores: Any, sources: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                per_query: bool = False) -> Any:
    """Mean over queries of whether the top-scored of `candidates[q]` is a source (ties shared)."""
    matrix, srcs = _check(scores, sources)
    if len(candidates) != matrix.shape[0]:
        raise ShapeError(f"{len(candidates)} candidate lists for {matrix.shape[0]} queries")
    vals = []
    for q, (row, idx) in enumerate(zip(matrix, srcs)):
        cand = np.unique(np.asarray(list(candidates[q]), dtype=np.int64))
        if not np.isin(idx, cand).any():
            raise ShapeError(f"query {q}: none of its sources is among its candidates")
        sub = row[cand]
        top = sub == sub.max()
        vals.append(float(np.isin(cand[top], idx).sum() / top.sum()))
    return np.array(vals) if per_query else float(np.mean(vals))


def sourcing_report(scores: Any, sources: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]] | None
                    = None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """All sourcing metrics at once: auc, recall@k for each k, mrr, and entity_top1 if `candidates`."""
    out = {"auc": sourcing_auc(scores, sources)}
    out.update({f"recall@{k}": recall_at_k(scores, sources, k) for k in ks})
    out["mrr"] = mrr(scores, sources)
    if candidates is not None:
        out["entity_top1"] = entity_top1(scores, sources, candidates)
    return out


__all__ = ["entity_top1", "mrr", "recall_at_k", "sourcing_auc", "sourcing_report"]

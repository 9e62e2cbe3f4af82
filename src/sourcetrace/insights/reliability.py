"""Reliability: can this attribution be trusted? Agreement of several score matrices for the same queries
(other methods, checkpoints, seeds or bootstrap resamples of the training data) and the bootstrap stability
of their consensus top-k, per query and per training row; a list is flagged unstable below a threshold.

- top-k Jaccard: |top_k(A) ∩ top_k(B)| / |top_k(A) ∪ top_k(B)|, mean over pairs.
- rank correlation: Spearman over the union of both top-k lists (the ranks that a reader sees), mean over
  pairs.
- stability: resample the runs with replacement, take the top-k of their mean, and count how often each item
  of the full consensus top-k reappears; the mean of those frequencies.
- per training row: Spearman correlation of its column (its scores over the queries) between runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from ..errors import InvalidOptionError, ShapeError
from ..scores import Scores

UNSTABLE_BELOW = 0.8  # default flag threshold on bootstrap stability (fixed, not tuned)


@dataclass(frozen=True, eq=False)
class Reliability:
    """Per-query agreement and stability, per-training-row agreement, and the unstable flags."""

    jaccard: np.ndarray  # [n_query]
    rank_correlation: np.ndarray  # [n_query]
    stability: np.ndarray  # [n_query]
    train_agreement: np.ndarray  # [n_train]
    k: int
    threshold: float

    @property
    def unstable(self) -> np.ndarray:
        return self.stability < self.threshold

    def badge(self, query: int) -> str:
        """'stable', 'check' or 'unstable' for a query's list."""
        s = float(self.stability[query])
        return "unstable" if s < self.threshold else ("check" if s < (1 + self.threshold) / 2 else "stable")


def topk_jaccard(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per-row Jaccard overlap of the top-k columns of two score matrices."""
    ta, tb = _topk(a, k), _topk(b, k)
    return np.array([len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(ta, tb)])


def topk_rank_correlation(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per-row Spearman correlation of two score rows over the union of their top-k columns."""
    ta, tb = _topk(a, k), _topk(b, k)
    out = np.full(len(a), np.nan)
    for q, (x, y) in enumerate(zip(ta, tb)):
        cols = sorted(set(x) | set(y))
        ra, rb = rankdata(a[q, cols]), rankdata(b[q, cols])
        if ra.std() > 0 and rb.std() > 0:
            out[q] = float(np.corrcoef(ra, rb)[0, 1])
    return out


def reliability(
    runs: Sequence[Scores | np.ndarray],
    k: int = 10,
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
    threshold: float = UNSTABLE_BELOW,
) -> Reliability:
    """Agreement and bootstrap stability of ≥ 2 score matrices of the same queries and training rows."""
    mats = [
        np.asarray(getattr(r, "matrix", r) if not isinstance(r, np.ndarray) else r, dtype=np.float64)
        for r in runs
    ]
    if len(mats) < 2:
        raise InvalidOptionError(
            "reliability compares runs: give at least 2 score matrices (methods, "
            "checkpoints, seeds or bootstrap resamples)"
        )
    if any(m.shape != mats[0].shape or m.ndim != 2 for m in mats):
        raise ShapeError(
            f"runs have shapes {[m.shape for m in mats]}; they must score the same queries "
            "against the same training rows"
        )
    k = min(int(k), mats[0].shape[1])
    if k < 1:
        raise InvalidOptionError("k must be at least 1")
    stack = np.stack(mats)  # [R, Q, N]
    pairs = list(itertools.combinations(range(len(mats)), 2))
    jac = np.mean([topk_jaccard(mats[i], mats[j], k) for i, j in pairs], axis=0)
    rhos = np.array([topk_rank_correlation(mats[i], mats[j], k) for i, j in pairs])
    rho = np.where(
        (~np.isnan(rhos)).any(0), np.nansum(rhos, 0) / np.maximum((~np.isnan(rhos)).sum(0), 1), np.nan
    )
    consensus = _topk(stack.mean(0), k)
    rng = np.random.default_rng(seed)
    hits = np.zeros(len(consensus))
    for _ in range(int(n_bootstrap)):
        pick = rng.integers(0, len(mats), len(mats))
        boot = _topk(stack[pick].mean(0), k)
        hits += np.array([len(set(c) & set(b)) / k for c, b in zip(consensus, boot)])
    ranks = rankdata(stack, axis=1)  # rank each training row's column over the queries
    corr = np.array([_columnwise_corr(ranks[i], ranks[j]) for i, j in pairs])
    defined = (~np.isnan(corr)).sum(0)
    per_train = np.where(defined > 0, np.nansum(corr, 0) / np.maximum(defined, 1), np.nan)  # NaN: 1 query
    return Reliability(jac, rho, hits / int(n_bootstrap), per_train, k, float(threshold))


def _topk(m: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-m, axis=1, kind="stable")[:, :k]


def _columnwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return np.where(denom > 0, (a * b).sum(0) / np.where(denom > 0, denom, 1.0), np.nan)

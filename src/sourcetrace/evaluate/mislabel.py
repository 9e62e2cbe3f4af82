"""Mislabel detection: how well a per-row suspicion score (higher = more likely mislabeled) finds the rows
whose labels were flipped.

- `auc`: ROC AUC, P(score of a flipped row > score of a clean row), ties counted ½.
- `precision_at_k`: share of flipped rows among the k most suspicious (k defaults to the number flipped).
- `average_precision`: area under the precision-recall curve (steps at each distinct score).
- `quanda_score`: quanda's MislabelingDetectionMetric: rank rows by the score, descending (stable), take the
  cumulative share of flipped rows found, and its trapezoid area divided by the number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from ..errors import EmptyDataError, NonFiniteError, ShapeError


@dataclass(frozen=True)
class MislabelResult:
    auc: float
    precision_at_k: float
    k: int
    average_precision: float
    quanda_score: float


def _inputs(scores: Any, flipped: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = (
        scores.detach().cpu().double().numpy()
        if hasattr(scores, "detach")
        else np.asarray(scores, np.float64)
    )
    if s.ndim != 1:
        raise ShapeError(f"give one suspicion score per training row; got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise NonFiniteError("suspicion scores contain NaN or infinite values")
    pos = np.zeros(len(s), dtype=bool)
    idx = np.asarray(list(flipped), dtype=np.int64)
    if idx.size == 0 or idx.size == len(s):
        raise EmptyDataError("mislabel metrics need some flipped rows and some clean rows")
    if idx.min() < 0 or idx.max() >= len(s):
        raise ShapeError(f"flipped row indices must lie in 0..{len(s) - 1}")
    pos[idx] = True
    return s, pos


def auc(scores: Any, flipped: Sequence[int] | np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U from average ranks)."""
    s, pos = _inputs(scores, flipped)
    r = rankdata(s)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def precision_at_k(scores: Any, flipped: Sequence[int] | np.ndarray, k: int | None = None) -> float:
    s, pos = _inputs(scores, flipped)
    k = int(pos.sum()) if k is None else int(k)
    if not 1 <= k <= len(s):
        raise ShapeError(f"k must lie in 1..{len(s)}")
    return float(pos[np.argsort(-s, kind="stable")[:k]].mean())


def average_precision(scores: Any, flipped: Sequence[int] | np.ndarray) -> float:
    """Σ_thresholds (R_t − R_{t−1}) · P_t, thresholds at each distinct score, highest first."""
    s, pos = _inputs(scores, flipped)
    order = np.argsort(-s, kind="stable")
    s_sorted, p_sorted = s[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]  # last position of each distinct score
    tp = np.cumsum(p_sorted)[last]
    precision = tp / (last + 1)
    recall = tp / pos.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def quanda_score(scores: Any, flipped: Sequence[int] | np.ndarray) -> float:
    """quanda's mislabeling-detection score (see the module docstring)."""
    s, pos = _inputs(scores, flipped)
    found = pos[np.argsort(-s, kind="stable")].astype(np.float64)
    curve = np.cumsum(found) / pos.sum()
    return float(np.trapezoid(curve) / len(s))


def mislabel_detection(
    scores: Any, flipped: Sequence[int] | np.ndarray, k: int | None = None
) -> MislabelResult:
    """All four figures for one suspicion score."""
    kk = len(set(int(i) for i in flipped)) if k is None else int(k)
    return MislabelResult(
        auc(scores, flipped),
        precision_at_k(scores, flipped, kk),
        kk,
        average_precision(scores, flipped),
        quanda_score(scores, flipped),
    )

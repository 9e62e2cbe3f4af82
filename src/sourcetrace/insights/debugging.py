"""Data debugging: which training rows look mislabeled, and which are outliers.

Signals, each "higher = more suspicious", one value per training row:
- self-influence: the row's influence on its own loss (`Attributor.self_influence()`); a mislabeled row is
  fitted against its neighbours, so its gradient is large and unusual.
- tracin: self-influence summed over training checkpoints (an `Attributor(method="tracin")`).
- heldout: minus the row's mean score on clean held-out queries: a row that lowers their margins.
- combined: the mean of the signals' percentile ranks, so that no signal's scale dominates.
Outliers: mean distance to the k nearest other training rows in feature space.
The result is a `Scores` with one row per signal, so `top(signal, k)` lists the most suspicious rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from ..errors import EmptyDataError, ShapeError
from ..scores import Scores


def heldout_harm(scores: Scores) -> np.ndarray:
    """Minus the mean score of each training row over held-out queries (high = harms held-out margins)."""
    if scores.matrix is None:
        raise ShapeError("heldout_harm needs dense scores; score the held-out queries without top_k")
    return -scores.matrix.double().mean(0).numpy()


def percentile_ranks(values: Any) -> np.ndarray:
    """Ranks scaled to (0, 1], ties averaged."""
    v = np.asarray(values, dtype=np.float64)
    return rankdata(v) / len(v)


def suspicion(
    signals: Mapping[str, Any],
    train_ids: Sequence[Any],
    *,
    combine: Sequence[str] | None = None,
    method: str = "debugging",
) -> Scores:
    """Scores [n_signals + 1, n_train]: each signal and their `combined` mean percentile rank.

    `signals` maps a name ("self-influence", "tracin", "heldout", ...) to one value per training row;
    `combine` names the signals averaged into `combined` (default: all of them).
    """
    if not signals:
        raise EmptyDataError("no signals given; pass e.g. {'self-influence': attr.self_influence()}")
    names = list(signals)
    rows = []
    for name in names:
        v = signals[name]
        v = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float64)
        if v.shape != (len(train_ids),):
            raise ShapeError(
                f"signal {name!r} has shape {v.shape}; give one value per training row ({len(train_ids)})"
            )
        rows.append(v)
    picked = names if combine is None else list(combine)
    unknown = [c for c in picked if c not in names]
    if unknown:
        raise ShapeError(f"cannot combine {unknown}: no such signal (have {names})")
    combined = np.mean([percentile_ranks(rows[names.index(c)]) for c in picked], axis=0)
    matrix = torch.from_numpy(np.stack(rows + [combined]))
    return Scores(
        matrix, list(train_ids), names + ["combined"], method, {"kind": "suspicion", "combined_of": picked}
    )


def outliers(features: Any, k: int = 10) -> np.ndarray:
    """Mean Euclidean distance of each row to its k nearest other rows (high = an outlier)."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    if x.ndim != 2 or len(x) < 2:
        raise ShapeError(f"features must be a matrix [n ≥ 2, d]; got {tuple(x.shape)}")
    k = min(int(k), len(x) - 1)
    out = np.empty(len(x))
    for start in range(0, len(x), 1024):
        d = torch.cdist(x[start : start + 1024], x)
        d[torch.arange(d.shape[0]), torch.arange(start, start + d.shape[0])] = float("inf")
        out[start : start + d.shape[0]] = d.topk(k, dim=1, largest=False).values.mean(1).numpy()
    return out

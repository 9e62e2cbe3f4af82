"""How much of the measurement a unit of attribution score is worth, fitted on retrained models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..ensembles import SubsetRetraining
from ..errors import EmptyDataError, ShapeError
from .lds import aligned_matrix


@dataclass(frozen=True)
class Calibration:
    """measurement(S) ≈ b_q + scale · Σ_{i∈S} score(q, i) over the retrained subsets S.

    scale: one slope pooled over the queries (use it with `Scores.removal_effect`); per_query: each query's
    own slope; r2: the share of the measurements' variance across subsets that the pooled line explains.
    """

    scale: float
    per_query: np.ndarray
    r2: float

    def __str__(self) -> str:
        return f"scale {self.scale:.4g} (R² {self.r2:.3f})"


def calibrate(scores: Any, ground_truth: SubsetRetraining, *, train_ids: Sequence[Any] | None = None,
              query_ids: Sequence[Any] | None = None) -> Calibration:
    """Fit the scale that turns summed scores into changes of the measurement (least squares, one intercept
    per query) on subset retraining, e.g. `ensembles.retrain_subsets(...)`; ids as in `evaluate.lds`."""
    matrix = aligned_matrix(scores, ground_truth, train_ids, query_ids)
    masks = np.asarray(ground_truth.masks, dtype=np.float64)
    actual = np.asarray(ground_truth.measurements, dtype=np.float64)
    if matrix.shape != (actual.shape[1], masks.shape[1]):
        raise ShapeError(f"scores have shape {list(matrix.shape)}, expected [n_query, n_train] = "
                         f"{[actual.shape[1], masks.shape[1]]} to match the ground truth")
    if masks.shape[0] < 2:
        raise EmptyDataError("calibration needs at least 2 retrained subsets")
    predicted = masks @ matrix.T  # [M, n_query]
    p = predicted - predicted.mean(0)
    a = actual - actual.mean(0)
    pp = (p * p).sum(0)
    per_query = np.where(pp > 0, (p * a).sum(0) / np.where(pp > 0, pp, 1.0), np.nan)
    scale = float((p * a).sum() / (p * p).sum()) if (p * p).sum() > 0 else float("nan")
    residual = a - scale * p
    total = float((a * a).sum())
    r2 = 1.0 - float((residual * residual).sum()) / total if total > 0 else float("nan")
    return Calibration(scale=scale, per_query=per_query, r2=r2)

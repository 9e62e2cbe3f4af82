"""Leave-one-out correlation: do scores order training examples like removing them really does?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..ensembles import LeaveOneOut
from ..errors import EmptyDataError, InvalidOptionError, NonFiniteError, ShapeError
from .lds import aligned_matrix, columnwise_correlation, warn_and_mean


@dataclass(frozen=True, eq=False)  # arrays inside: == would be ambiguous
class LOOResult:
    """Mean correlation over queries; `per_query` is NaN where the correlation is undefined."""

    mean: float
    per_query: np.ndarray

    def __str__(self) -> str:
        return f"{self.mean:.3f}"


def loo(scores: Any, ground_truth: LeaveOneOut, *, method: str = "spearman",
        train_ids: Sequence[Any] | None = None, query_ids: Sequence[Any] | None = None) -> LOOResult:
    """Per query, correlate `scores[:, indices]` with the actual effect of removal, `full - removed`.

    Removing a proponent lowers the query's measurement, so under the project's sign convention (positive
    score = proponent) a good method correlates positively. `train_ids` (every training example, in the
    order `indices` refers to) and `query_ids` match a `Scores` to the ground truth by id, as in `lds`.
    """
    if method not in ("spearman", "pearson"):
        raise InvalidOptionError(f"unknown correlation method {method!r}; use 'spearman' or 'pearson'")
    matrix = aligned_matrix(scores, ground_truth, train_ids, query_ids)
    indices = np.asarray(ground_truth.indices, dtype=np.int64)
    effect = np.asarray(ground_truth.full, dtype=np.float64)[None, :] - np.asarray(ground_truth.removed)
    if effect.ndim != 2 or effect.shape[0] != indices.size:
        raise ShapeError(
            f"ground truth removed {np.shape(ground_truth.removed)} should be [len(indices), "
            f"n_query] = [{indices.size}, {np.shape(ground_truth.full)[-1]}]"
        )
    if indices.size < 2:
        raise EmptyDataError(
            f"ground truth leaves out {indices.size} example(s); a correlation needs at least 2"
        )
    expected = (effect.shape[1], int(ground_truth.n_train))
    if matrix.shape != expected:
        raise ShapeError(
            f"scores have shape {list(matrix.shape)}, expected [n_query, n_train] = "
            f"{list(expected)} to match the ground truth's queries and training set"
        )
    if not np.all(np.isfinite(effect)):
        raise NonFiniteError("ground truth measurements contain NaN or infinite values")

    per_query = columnwise_correlation(matrix[:, indices].T, effect, method)
    return LOOResult(mean=warn_and_mean(per_query, "over the left-out examples"), per_query=per_query)

"""Linear datamodeling score (LDS): do summed scores rank subset-trained models like retraining does?

For each query, the predicted effect of a training subset is the sum of that query's scores over the
subset's members; LDS is the Spearman correlation, over the retrained subsets, between this prediction and
the measurement of the model really trained on the subset, averaged over queries.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from ..ensembles import SubsetRetraining
from ..errors import EmptyDataError, InvalidOptionError, NonFiniteError, ShapeError


@dataclass(frozen=True, eq=False)  # arrays inside: == would be ambiguous
class LDSResult:
    """Mean LDS over queries with a bootstrap confidence interval; `per_query` is NaN where undefined."""

    mean: float
    ci_low: float
    ci_high: float
    per_query: np.ndarray

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def lds(
    scores: Any,
    ground_truth: SubsetRetraining,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    train_ids: Sequence[Any] | None = None,
    query_ids: Sequence[Any] | None = None,
) -> LDSResult:
    """LDS of `scores` [n_query, n_train] (a `Scores`, tensor or array) against subset retraining.

    The confidence interval is a percentile bootstrap over queries (resampled `n_bootstrap` times from
    `seed`), so it reflects how much the mean depends on which queries were picked. `train_ids` and
    `query_ids` name the ground truth's columns (its masks' and its measurements'); with them, a `Scores`
    is matched to the ground truth by id, whatever its order.
    """
    if int(n_bootstrap) < 1:
        raise InvalidOptionError(f"n_bootstrap must be at least 1 (got {n_bootstrap})")
    if not 0.0 < float(confidence) < 1.0:
        raise InvalidOptionError(f"confidence must be strictly between 0 and 1 (got {confidence})")
    matrix = aligned_matrix(scores, ground_truth, train_ids, query_ids)
    masks = np.asarray(ground_truth.masks, dtype=bool)
    actual = np.asarray(ground_truth.measurements, dtype=np.float64)
    if masks.ndim != 2 or actual.ndim != 2 or masks.shape[0] != actual.shape[0]:
        raise ShapeError(
            f"ground truth masks {masks.shape} and measurements {actual.shape} should be "
            "[n_subsets, n_train] and [n_subsets, n_query]"
        )
    if masks.shape[0] < 2:
        raise EmptyDataError(
            f"ground truth has {masks.shape[0]} subsets; LDS needs at least 2 (100 is usual)"
        )
    expected = (actual.shape[1], masks.shape[1])
    if matrix.shape != expected:
        raise ShapeError(
            f"scores have shape {list(matrix.shape)}, expected [n_query, n_train] = "
            f"{list(expected)} to match the ground truth's queries and training set"
        )
    if not np.all(np.isfinite(actual)):
        raise NonFiniteError("ground truth measurements contain NaN or infinite values")

    predicted = masks.astype(np.float64) @ matrix.T  # [M, n_query]: summed scores of each subset's members
    per_query = columnwise_correlation(predicted, actual, "spearman")
    mean = warn_and_mean(per_query, "over the subsets")
    valid = per_query[~np.isnan(per_query)]
    if valid.size == 0:
        return LDSResult(mean=mean, ci_low=float("nan"), ci_high=float("nan"), per_query=per_query)
    low, high = _bootstrap_ci(valid, int(n_bootstrap), float(confidence), seed)
    return LDSResult(mean=mean, ci_low=low, ci_high=high, per_query=per_query)


def score_matrix(scores: Any) -> np.ndarray:
    """The [n_query, n_train] float64 array behind a `Scores` object, a torch tensor or an array."""
    matrix = getattr(scores, "matrix", scores)
    if hasattr(matrix, "detach"):  # torch tensor; going through double also handles bfloat16
        matrix = matrix.detach().cpu().double().numpy()
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ShapeError(f"scores have shape {list(matrix.shape)}; expected a matrix [n_query, n_train]")
    if matrix.size == 0:
        raise EmptyDataError(f"scores have shape {list(matrix.shape)}: no queries or no training examples")
    if not np.all(np.isfinite(matrix)):
        raise NonFiniteError("scores contain NaN or infinite values; check the method that produced them")
    return matrix


def aligned_matrix(scores: Any, ground_truth: Any, train_ids: Sequence[Any] | None = None,
                   query_ids: Sequence[Any] | None = None) -> np.ndarray:
    """`score_matrix(scores)` with rows and columns put in the ground truth's order of ids.

    The ids are the arguments, or the ground truth's own `train_ids` / `query_ids` when it has them;
    without ids the matrix is taken in the order it comes.
    """
    matrix = score_matrix(scores)
    for axis, given, attr in ((1, train_ids, "train_ids"), (0, query_ids, "query_ids")):
        want = given if given is not None else getattr(ground_truth, attr, None)
        if want is None:
            continue
        have = getattr(scores, attr, None)
        if have is None:
            raise ShapeError(f"the ground truth names its {attr} but the scores are a plain matrix; pass a "
                             "sourcetrace.Scores so they can be matched by id")
        where = {i: k for k, i in enumerate(have)}
        want = list(want)
        missing = [i for i in want if i not in where]
        extra = len(have) - (len(want) - len(missing))
        if missing or extra:
            raise ShapeError(f"the scores' {attr} do not match the ground truth's: "
                             f"{len(missing)} ground-truth ids have no scores (e.g. {missing[:3]!r}) and "
                             f"{extra} scored ids are not in the ground truth; score the same examples")
        matrix = np.take(matrix, [where[i] for i in want], axis=axis)
    return matrix


def columnwise_correlation(a: np.ndarray, b: np.ndarray, method: str) -> np.ndarray:
    """Pearson or Spearman correlation of column j of `a` with column j of `b`; NaN where one is constant."""
    if method == "spearman":  # Spearman = Pearson of ranks, ties get their average rank
        a, b = rankdata(a, axis=0), rankdata(b, axis=0)
    elif method != "pearson":
        raise InvalidOptionError(f"unknown correlation method {method!r}; use 'spearman' or 'pearson'")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    out = np.full(a.shape[1], np.nan)
    ok = denom > 0
    out[ok] = (a[:, ok] * b[:, ok]).sum(axis=0) / denom[ok]
    return np.clip(out, -1.0, 1.0)


def warn_and_mean(per_query: np.ndarray, over: str) -> float:
    """Mean of the defined correlations, warning about the queries left out."""
    undefined = int(np.isnan(per_query).sum())
    if undefined:
        warnings.warn(
            f"{undefined} of {per_query.size} queries have constant predicted or actual values {over}; "
            "their correlation is undefined, reported as NaN and left out of the mean",
            RuntimeWarning,
            stacklevel=3,
        )
    if undefined == per_query.size:
        return float("nan")
    return float(np.nanmean(per_query))


def _bootstrap_ci(values: np.ndarray, n_bootstrap: int, confidence: float, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(n_bootstrap)
    chunk = max(1, 2_000_000 // n)  # bound memory: resample at most ~2M query indices at a time
    for start in range(0, n_bootstrap, chunk):
        stop = min(start + chunk, n_bootstrap)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)

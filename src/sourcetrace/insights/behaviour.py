"""Behaviours: a set of queries that show something (errors on a slice, a class confusion, a gap between two
slices) and a metric of their measurements (margins) that says how bad it is; training groups are ranked by
how much removing them is predicted to improve that metric.

Metrics are functions of the queries' margins m (log-odds of the true class; `ClassificationTask`):
margin = mean m, loss = mean softplus(−m) (the cross-entropy, exactly), accuracy = mean sigmoid(m/τ) (a smooth
accuracy proxy; `error` reports the hard error rate, mean [m < 0]), gap = metric(slice B) − metric(slice A).
A predicted change is the metric re-evaluated at m + Δm, so it is exact in Δm and first order only in how
Δm is predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import EmptyDataError, InvalidOptionError, ShapeError
from ..scores import Scores
from .groups import group_removal

METRICS = ("margin", "loss", "accuracy", "gap")
HIGHER_IS_BETTER = {"margin": True, "loss": False, "accuracy": True}


@dataclass(frozen=True)
class Behaviour:
    """Queries (positions) that show a behaviour and the metric of it.

    For `metric="gap"`, `queries` is slice A (the one that fares worse), `versus` slice B, and `of` the
    per-slice metric compared (accuracy by default); a gap is better when smaller.
    """

    name: str
    queries: tuple[int, ...]
    metric: str = "margin"
    versus: tuple[int, ...] = ()
    of: str = "accuracy"
    temperature: float = 1.0
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InvalidOptionError(f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if not self.queries:
            raise EmptyDataError(
                f"behaviour {self.name!r} has no queries; give the positions of the queries that show it"
            )
        if self.metric == "gap" and (not self.versus or self.of not in HIGHER_IS_BETTER):
            raise InvalidOptionError(
                f"a gap needs `versus` (the other slice's queries) and `of` in {', '.join(HIGHER_IS_BETTER)}"
            )
        if self.temperature <= 0:
            raise InvalidOptionError("temperature must be positive")

    @classmethod
    def errors_on(cls, name: str, slice_mask: Any, margins: Any, metric: str = "margin") -> Behaviour:
        """The misclassified queries (margin < 0) inside a slice (a boolean mask over queries)."""
        mask, m = np.asarray(slice_mask, dtype=bool), np.asarray(margins, dtype=np.float64)
        picked = tuple(int(i) for i in np.flatnonzero(mask & (m < 0)))
        return cls(name, picked, metric, description=f"{len(picked)} errors in a slice of {int(mask.sum())}")

    @classmethod
    def confusion(
        cls,
        name: str,
        true_class: int,
        predicted_class: int,
        y_query: Any,
        predicted: Any,
        metric: str = "margin",
    ) -> Behaviour:
        """Queries of `true_class` predicted as `predicted_class`."""
        y, p = np.asarray(y_query), np.asarray(predicted)
        picked = tuple(int(i) for i in np.flatnonzero((y == true_class) & (p == predicted_class)))
        return cls(name, picked, metric, description=f"{true_class} predicted as {predicted_class}")

    @classmethod
    def gap_between(cls, name: str, worse_slice: Any, other_slice: Any, of: str = "accuracy") -> Behaviour:
        """The difference of `of` (accuracy, margin or loss) between two slices (boolean masks)."""
        a = tuple(int(i) for i in np.flatnonzero(np.asarray(worse_slice, dtype=bool)))
        b = tuple(int(i) for i in np.flatnonzero(np.asarray(other_slice, dtype=bool)))
        return cls(name, a, "gap", versus=b, of=of, description=f"{of} gap, {len(a)} vs {len(b)} queries")

    @property
    def higher_is_better(self) -> bool:
        return False if self.metric == "gap" else HIGHER_IS_BETTER[self.metric]

    def value(self, margins: Any) -> float:
        """The metric at these query margins (all queries' margins, indexed by position)."""
        m = np.asarray(margins, dtype=np.float64)
        self._check(m)
        if self.metric == "gap":
            sign = 1.0 if HIGHER_IS_BETTER[self.of] else -1.0
            return sign * (self._of(self.of, m[list(self.versus)]) - self._of(self.of, m[list(self.queries)]))
        return self._of(self.metric, m[list(self.queries)])

    def error(self, margins: Any) -> float:
        """Hard error rate on the behaviour's queries (slice A for a gap)."""
        m = np.asarray(margins, dtype=np.float64)
        return float((m[list(self.queries)] < 0).mean())

    def improvement(self, before: float, after: float) -> float:
        """after − before, signed so that positive means better."""
        return (after - before) if self.higher_is_better else (before - after)

    def _of(self, metric: str, m: np.ndarray) -> float:
        if metric == "margin":
            return float(m.mean())
        if metric == "loss":
            return float(np.logaddexp(0.0, -m).mean())
        return float((1.0 / (1.0 + np.exp(-m / self.temperature))).mean())

    def _check(self, m: np.ndarray) -> None:
        top = max(self.queries + self.versus)
        if m.ndim != 1 or top >= len(m):
            raise ShapeError(
                f"behaviour {self.name!r} refers to query {top}; give the margins of all "
                f"queries ({len(m)} given)"
            )


@dataclass(frozen=True)
class GroupRanking:
    """Training groups ranked by the predicted improvement of a behaviour's metric when each is removed."""

    behaviour: Behaviour
    groups: list[Any]
    sizes: list[int]
    before: float
    predicted_after: np.ndarray  # metric after removing each group, aligned with `groups`
    mass: np.ndarray  # the behaviour-weighted score mass of each group (positive: the group supports it)

    @property
    def predicted_improvement(self) -> np.ndarray:
        return np.array([self.behaviour.improvement(self.before, a) for a in self.predicted_after])

    def rank_of(self, group: Any) -> int:
        """1-based rank of a group (1 = the most responsible)."""
        order = [self.groups[i] for i in np.argsort(-self.predicted_improvement, kind="stable")]
        return 1 + [str(g) for g in order].index(str(group))

    def table(self, top: int | None = None) -> list[dict[str, Any]]:
        """Rows, most responsible first: group, size, mass, predicted metric after removal, improvement."""
        gain = self.predicted_improvement
        order = np.argsort(-gain, kind="stable")[:top]
        return [
            {
                "group": self.groups[i],
                "size": self.sizes[i],
                "mass": float(self.mass[i]),
                "before": self.before,
                "predicted_after": float(self.predicted_after[i]),
                "predicted_improvement": float(gain[i]),
            }
            for i in order
        ]


def responsible_groups(
    scores: Scores, groups: Any, behaviour: Behaviour, margins: Any, scale: float | None = None
) -> GroupRanking:
    """Rank training groups by the predicted improvement of `behaviour` if each group were removed.

    `scores` [n_query, n_train] must measure the queries' margins; `margins` are their current values;
    `scale` turns summed scores into margin changes (see `Scores.removal_effect`).
    """
    m = np.asarray(margins, dtype=np.float64)
    if m.shape != (scores.shape[0],):
        raise ShapeError(f"{m.shape} margins for {scores.shape[0]} queries; give one margin per query")
    removal = group_removal(scores, groups, scale)
    delta = removal.matrix.numpy()  # type: ignore[union-attr]  # [n_query, n_groups]
    before = behaviour.value(m)
    after = np.array([behaviour.value(m + delta[:, j]) for j in range(delta.shape[1])])
    weights = np.zeros(len(m))
    weights[list(behaviour.queries)] = 1.0 / len(behaviour.queries)
    if behaviour.metric == "gap":
        weights[list(behaviour.versus)] -= 1.0 / len(behaviour.versus)
    mass = weights @ removal.matrix.numpy() / -removal.metadata["removal_scale"]  # type: ignore[union-attr]
    sizes = [int(s) for s in removal.metadata["group_sizes"]]
    return GroupRanking(behaviour, list(removal.train_ids), sizes, before, after, mass)

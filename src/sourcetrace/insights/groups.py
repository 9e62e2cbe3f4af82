"""Group attribution: score mass per group of training examples, and the predicted effect of removing a group.

Groups come from a label, a source, a metadata slice or clusters of training features (`feature_clusters`).
A group's mass for a query is the sum of its members' scores (`Scores.group_by`); its removal effect is that
sum times the method's removal scale (`Scores.removal_effect`), checked against retraining without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import EmptyDataError, InvalidOptionError, ScoresError, ShapeError
from ..scores import Scores


def feature_clusters(features: Any, n_clusters: int, *, seed: int = 0) -> np.ndarray:
    """k-means cluster ids (0..n_clusters−1) of training features [n, d], seeded k-means++ (scipy)."""
    from scipy.cluster.vq import kmeans2

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ShapeError(f"features must be a non-empty matrix [n, d]; got shape {x.shape}")
    if not 1 <= int(n_clusters) <= len(x):
        raise InvalidOptionError(f"n_clusters must lie in 1..{len(x)} (got {n_clusters})")
    scale = x.std(0)
    z = (x - x.mean(0)) / np.where(scale > 0, scale, 1.0)
    _, labels = kmeans2(z, int(n_clusters), minit="++", seed=np.random.default_rng(seed))
    return labels.astype(np.int64)


def group_mass(scores: Scores, groups: Any) -> Scores:
    """Summed scores per group and query: a Scores whose columns are the groups (sizes in metadata)."""
    return scores.group_by(list(groups))


def group_removal(scores: Scores, groups: Any, scale: float | None = None) -> Scores:
    """Predicted change of each query's measurement if each group were removed and the model retrained:
    −scale · (group mass); a Scores [n_query, n_groups] marked `"kind": "group removal"`."""
    grouped = scores.group_by(list(groups))
    scale = _scale(scores, scale)
    assert grouped.matrix is not None  # group_by returns dense scores
    return Scores(
        -scale * grouped.matrix.double(),
        grouped.train_ids,
        grouped.query_ids,
        scores.method,
        {**grouped.metadata, "kind": "group removal", "removal_scale": scale},
    )


def members(groups: Any, group: Any, train_ids: Sequence[Any]) -> list[Any]:
    """Training ids whose group is `group`."""
    labels = list(groups)
    if len(labels) != len(train_ids):
        raise ShapeError(f"{len(labels)} group labels for {len(train_ids)} training examples")
    out = [i for i, g in zip(train_ids, labels) if g == group or str(g) == str(group)]
    if not out:
        raise EmptyDataError(f"no training example is in group {group!r}")
    return out


def _scale(scores: Scores, scale: float | None) -> float:
    if scale is None:
        scale = scores.metadata.get("removal_scale")
    if scale is None:
        raise ScoresError(
            "these scores rank examples but are not effect sizes; pass scale= (for example "
            "evaluate.calibrate(scores, ground_truth).scale, or 1/n_train for exact influence "
            "of a model trained to convergence)"
        )
    return float(scale)

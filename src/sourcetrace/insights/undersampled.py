"""Undersampled data: queries whose support in the training data is thin, clustered and described.

Three signs of thin support, each turned into a percentile rank (high = thin) and averaged:
- low positive mass: the sum of the query's positive scores (how much training data pushes it up);
- few proponents: how many training rows have a score above `share` × the query's largest score;
- far from the training data: mean distance to the k nearest training rows in feature space.
The thinnest `fraction` of queries is flagged, clustered (k-means) and each cluster described: its size,
its queries' labels, its centre and the nearest training rows ("collect more like these").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InvalidOptionError, ShapeError
from ..scores import Scores
from .debugging import percentile_ranks
from .groups import feature_clusters

FRACTION = 0.1  # default share of queries flagged (the benchmark tunes its own on its tuning split)


@dataclass(frozen=True, eq=False)
class Support:
    """Per-query signs of support and the combined thinness (high = thin)."""

    positive_mass: np.ndarray
    proponents: np.ndarray
    distance: np.ndarray
    thinness: np.ndarray


@dataclass(frozen=True)
class Region:
    """A cluster of thinly supported queries."""

    queries: list[int]
    labels: dict[str, int]
    centre: list[float]
    nearest_train: list[int]

    def describe(self) -> str:
        labels = ", ".join(f"{k}: {v}" for k, v in self.labels.items())
        return f"{len(self.queries)} thinly supported queries (labels {labels}); collect more like these"


def support(
    scores: Scores, query_features: Any, train_features: Any, *, k: int = 10, share: float = 0.1
) -> Support:
    """The three signs of support for every query, and their combination."""
    if scores.matrix is None:
        raise ShapeError("support needs dense scores; score without top_k")
    if not 0 < share < 1:
        raise InvalidOptionError("share must lie strictly between 0 and 1")
    s = scores.matrix.double().numpy()
    qf, tf = np.asarray(query_features, np.float64), np.asarray(train_features, np.float64)
    if qf.shape[0] != s.shape[0] or tf.shape[0] != s.shape[1] or qf.shape[1] != tf.shape[1]:
        raise ShapeError(f"features {qf.shape} / {tf.shape} do not match scores {s.shape}")
    mass = np.clip(s, 0, None).sum(1)
    top = s.max(1, keepdims=True)
    prop = (s > share * np.where(top > 0, top, np.inf)).sum(1).astype(np.float64)
    d = torch.cdist(torch.from_numpy(qf), torch.from_numpy(tf))
    dist = d.topk(min(k, tf.shape[0]), dim=1, largest=False).values.mean(1).numpy()
    thin = (percentile_ranks(-mass) + percentile_ranks(-prop) + percentile_ranks(dist)) / 3
    return Support(mass, prop, dist, thin)


def flag(thinness: Any, fraction: float = FRACTION) -> np.ndarray:
    """Positions of the thinnest `fraction` of queries."""
    t = np.asarray(thinness, np.float64)
    if not 0 < fraction <= 1:
        raise InvalidOptionError("fraction must lie in (0, 1]")
    n = max(1, int(round(fraction * len(t))))
    return np.sort(np.argsort(-t, kind="stable")[:n])


def regions(
    flagged: Any,
    query_features: Any,
    train_features: Any,
    query_labels: Any,
    n_clusters: int = 3,
    *,
    seed: int = 0,
    nearest: int = 5,
) -> list[Region]:
    """Cluster the flagged queries in feature space and describe each cluster, largest first."""
    idx = np.asarray(flagged, dtype=np.int64)
    qf, tf = np.asarray(query_features, np.float64), np.asarray(train_features, np.float64)
    labels = np.asarray(query_labels)
    n_clusters = max(1, min(int(n_clusters), len(idx)))
    ids = feature_clusters(qf[idx], n_clusters, seed=seed) if n_clusters > 1 else np.zeros(len(idx), int)
    out = []
    for c in np.unique(ids):
        members = idx[ids == c]
        centre = qf[members].mean(0)
        near = np.argsort(((tf - centre) ** 2).sum(1), kind="stable")[:nearest]
        counts = Counter(str(v) for v in labels[members])
        out.append(
            Region(
                [int(i) for i in members], dict(counts.most_common()), centre.tolist(), [int(i) for i in near]
            )
        )
    return sorted(out, key=lambda r: -len(r.queries))

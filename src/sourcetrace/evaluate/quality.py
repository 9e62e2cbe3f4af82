"""Sample quality of generative models: the Fréchet distance between two sets of feature vectors (FID-style).

FID (Heusel et al. 2017) is this distance on Inception features; on small images any classifier's
penultimate features serve (the diffusion-digits benchmark uses a digits classifier's).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import EmptyDataError, NonFiniteError, ShapeError


def frechet_distance(a: Any, b: Any) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½), Gaussians fit to the rows of `a` [N, D] and `b` [M, D].

    Computed in float64 from symmetric eigendecompositions, Tr (Σ_a Σ_b)^½ = Σ √λ(Σ_a^½ Σ_b Σ_a^½), so it
    needs no general matrix square root and gives no complex parts.
    """
    x, y = _features(a, "a"), _features(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ShapeError(f"a has {x.shape[1]} features per row and b {y.shape[1]}; embed both with the same "
                         "feature extractor")
    mu = x.mean(0) - y.mean(0)
    sa, sb = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ sb @ root_a)
    cross = float(np.sqrt(np.clip(middle, 0, None)).sum())
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * cross)


def _features(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ShapeError(f"{name} must be feature rows [N, D]; got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise EmptyDataError(f"{name} has {arr.shape[0]} rows; a covariance needs at least 2 (use many more)")
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError(f"{name} holds NaN or infinite features; check the feature extractor")
    return arr

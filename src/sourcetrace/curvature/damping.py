"""Damping that works untuned: λ relative to the scale of the curvature.

Influence scores use `(C + λI)⁻¹`. An absolute λ is meaningless across models (it must be read against the
scale of C's spectrum): dattri's CG with λ = 0 scores LDS 0.04 on a digits MLP and 0.79 with λ = 1e-2
(research notes). Every preconditioner takes the same two options: `damping=<float>`, λ itself (added to
the curvature of the *mean* training loss), or `damping_factor`, λ = factor × the preconditioner's scale,
which is the mean eigenvalue tr(C)/dim of C (or of each block of it) for every parameter-space curvature and
tr(C)/n (a ridge per training example) for the feature-space Gram matrices (`gram.py`). Explicit curvatures
know tr(C) exactly; iterative ones estimate it with Hutchinson's estimator `E[zᵀCz] = tr(C)` over
Rademacher probes z (Hutchinson 1990), one batched product.

Why 20 for the explicit and iterative curvatures and not kronfluence's 0.1: the exact GGN of digits-mlp
(9610 parameters, mean eigenvalue 2.2e-3) gave LDS 0.28 / 0.37 / 0.42 / 0.50 / 0.60 / 0.70 / 0.755 / 0.735
/ 0.65 / 0.55 at λ = 1e-5 / 1e-4 / 3e-4 / 1e-3 / 3e-3 / 1e-2 / 3e-2 / 0.1 / 0.3 / 1, so 0.1 × mean
(λ = 2.2e-4) scores 0.41 while 13-45 × mean sits on the plateau. A GGN's spectrum is spread over many
decades with most eigenvalues near zero, so its mean is far below its informative eigenvalues; λ in the
plateau damps the near-null directions without flattening the top ones. 20 is the plateau's middle.
These factors were chosen on digits-mlp, which is then also reported (benchmarks/digits-mlp.md says so).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from ..errors import InvalidOptionError

DEFAULT_FACTOR = 20.0


def check_damping(damping: float | None, factor: float | None) -> None:
    """Refuse a negative or non-finite damping or factor (when the preconditioner is built)."""
    if damping is not None and (not isinstance(damping, (int, float)) or not math.isfinite(damping)
                                or damping < 0):
        raise InvalidOptionError(f"damping must be a finite number >= 0 (got {damping!r}); pass damping=None "
                                 "for the default rule")
    if factor is not None and (not isinstance(factor, (int, float)) or not math.isfinite(factor)
                               or factor <= 0):
        raise InvalidOptionError(f"damping_factor must be a positive number (got {factor!r})")


def resolve_damping(damping: float | None, mean_eigenvalue: float | None, factor: float | None = None
                    ) -> float:
    """The damping to use: `damping` when given, else `factor · mean_eigenvalue` (the default rule)."""
    check_damping(damping, factor)
    if damping is not None:
        return float(damping)
    factor = DEFAULT_FACTOR if factor is None else float(factor)
    if mean_eigenvalue is None or not math.isfinite(mean_eigenvalue) or mean_eigenvalue <= 0:
        warnings.warn(f"the curvature's mean eigenvalue is {mean_eigenvalue}; C is (numerically) zero, so "
                      "every damping gives the same ranking: using damping=1", stacklevel=3)
        return 1.0
    return factor * float(mean_eigenvalue)


def hutchinson_trace(product: Callable[[torch.Tensor], torch.Tensor], dim: int, probes: int = 32,
                     seed: int = 0, dtype: torch.dtype = torch.float64) -> float:
    """Estimate tr(C) from `product(V) = V Cᵀ` on Rademacher rows V [probes, dim] (Hutchinson 1990)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (probes, dim), generator=gen).to(dtype) * 2 - 1
    return float((product(z).to(torch.float64) * z.to(torch.float64)).sum(1).mean())

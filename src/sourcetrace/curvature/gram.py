"""Curvature in feature space from the stored rows: C = 1/n Σ_i R_i φ_i φ_iᵀ, inverted by Cholesky.

`gauss-newton` weighs row i by R_i = ∂²L_i/∂f_i² when the rows are gradients of an output f (TRAK, Park
et al. 2023: the Gauss-Newton matrix of the linearised model in projected space); on loss gradients R = 1
(the empirical Fisher). `covariance` never weighs (TRAK's ΦᵀΦ; LoGra's raw preconditioner, Choe et al.
2024). Kronecker features are inverted block by block (one block per projected weight, as LoGra); other
features as one block. Default damping per block: λ = damping_factor · tr(C)/n, a ridge per training
example that stays the same at every projection width (projections keep norms) and never leaves C + λI
singular when the features outnumber the examples.
"""

from __future__ import annotations

import torch

from .. import distributed
from .base import CurvatureContext, Preconditioner, register_curvature
from .damping import resolve_damping

MAX_BLOCK = 20_000


class FeatureGram(Preconditioner):
    FEATURES = ("identity", "random", "kronecker", "structured")
    weighted = True

    def __init__(self, damping: float | None = None, damping_factor: float = 1.0):
        super().__init__(damping, damping_factor)

    def fit(self, ctx: CurvatureContext) -> None:
        store = ctx.store
        whole = {"": slice(0, store.dim)}
        self.slices = list((ctx.features.slices if ctx.feature_kind() == "kronecker" else whole).values())
        wide = max(sl.stop - sl.start for sl in self.slices)
        if wide > MAX_BLOCK:
            from ..errors import InvalidOptionError

            raise InvalidOptionError(f"a {wide}-wide feature block is too wide for an explicit inverse; "
                                     "project the features (features='random' or 'kronecker') or use cg")
        weights = ctx.row_weights if self.weighted else None
        grams = [torch.zeros(sl.stop - sl.start, sl.stop - sl.start, dtype=torch.float64)
                 for sl in self.slices]
        for lo, hi, rows in store.shards():
            rows = rows.double()
            weighted = rows if weights is None else rows * weights[lo:hi, None].double()
            for gram, sl in zip(grams, self.slices):
                gram.addmm_(weighted[:, sl].T, rows[:, sl])
        n = distributed.all_reduce_sum(store.n)  # sums over every process's rows under torchrun
        for gram in grams:
            distributed.all_reduce_sum(gram)
        self.lams, self.factors = [], []
        for gram in grams:
            gram /= n
            lam = resolve_damping(self.damping, float(gram.diagonal().sum()) / n, self.damping_factor)
            gram.diagonal().add_(lam)
            self.lams.append(lam)
            self.factors.append(torch.linalg.cholesky(gram))

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(vectors, dtype=torch.float64)
        for factor, sl in zip(self.factors, self.slices):
            out[:, sl] = torch.cholesky_solve(vectors[:, sl].double().T, factor).T
        return out.to(vectors.dtype)


@register_curvature("gauss-newton")
class GaussNewton(FeatureGram):
    """1/n Σ R_i φ_i φ_iᵀ + λI in feature space (TRAK's curvature)."""


@register_curvature("covariance")
class Covariance(FeatureGram):
    """1/n Σ φ_i φ_iᵀ + λI in feature space (LoGra's raw preconditioner; TRAK's unweighted ΦᵀΦ)."""

    weighted = False

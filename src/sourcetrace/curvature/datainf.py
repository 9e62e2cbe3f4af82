"""DataInf (Kwon et al., ICLR 2024, arXiv 2310.00902): a closed-form inverse per block, no iterations.

Per block l (one parameter tensor, e.g. a LoRA matrix, or one projected weight), with g_i the stored
training rows, DataInf swaps inversion and averaging, (1/n Σ_i g_i g_iᵀ + λI)⁻¹ ≈ 1/n Σ_i (g_i g_iᵀ + λI)⁻¹,
and each rank-one inverse has a Sherman–Morrison closed form:

    (G_l + λ_l I)⁻¹ v ≈ 1/(nλ_l) Σ_i (v - (g_iᵀv)/(λ_l + ‖g_i‖²) g_i)          (paper, eq. 5)

Cost O(n·d_l) per vector and no d×d matrix. The error grows with d_l, so it suits narrow blocks (LoRA).
Default damping per block: λ_l = 0.1 · mean_i ‖g_{l,i}‖² / d_l, i.e. 0.1 × the mean eigenvalue of G_l, the
rule of the DataInf code (`lambda_const_param=10`: λ = mean ‖g‖²/(10·d)). The rows are streamed from the
method's store by `apply`.
"""

from __future__ import annotations

import torch

from ..grads.features import IdentityFeatures
from .base import CurvatureContext, Preconditioner, register_curvature
from .damping import resolve_damping


@register_curvature("datainf")
class DataInf(Preconditioner):
    """DataInf's per-block closed form over the stored training rows."""

    FEATURES = ("identity", "random", "kronecker", "structured")

    def __init__(self, damping: float | None = None, damping_factor: float = 0.1):
        super().__init__(damping, damping_factor)

    def fit(self, ctx: CurvatureContext) -> None:
        self.store = ctx.store
        features = ctx.features or IdentityFeatures(ctx.capture)
        self.slices = list(features.slices.values())
        n = self.store.n
        sq = torch.zeros(n, len(self.slices), dtype=torch.float64)
        for lo, hi, g in self.store.shards():
            g = g.double()
            sq[lo:hi] = torch.stack([g[:, sl].pow(2).sum(1) for sl in self.slices], 1)
        self.sq_norms = sq  # ‖g_{l,i}‖², [n, blocks]
        # a block with no gradient at all (LoRA's A while B is still zero) contributes nothing: any λ will do
        self.lambdas = torch.tensor([
            resolve_damping(self.damping, float(sq[:, b].mean()) / (sl.stop - sl.start), self.damping_factor)
            if self.damping is not None or sq[:, b].any() else 1.0
            for b, sl in enumerate(self.slices)], dtype=torch.float64)
        self.n = n

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """1/(nλ_l) Σ_i (v - (g_iᵀv)/(λ_l + ‖g_i‖²) g_i) for each block l of each row v."""
        v = vectors.double()
        lam = self.lambdas
        acc = torch.zeros_like(v)  # Σ_i coef_i g_i per block
        for lo, hi, g in self.store.shards():
            g = g.double()
            for b, sl in enumerate(self.slices):
                coef = (v[:, sl] @ g[:, sl].T) / (lam[b] + self.sq_norms[lo:hi, b])  # [m, hi-lo]
                acc[:, sl] += coef @ g[:, sl]
        out = torch.empty_like(v)
        for b, sl in enumerate(self.slices):
            out[:, sl] = (v[:, sl] - acc[:, sl] / self.n) / lam[b]
        return out.to(vectors.dtype)

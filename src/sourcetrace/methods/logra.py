"""LoGra (Choe et al. 2024, arXiv 2405.13954) = Kronecker projection × per-layer damped inverse covariance.

Each hooked layer's weight gradient is projected as P_0ᵀ G P_1 from the layer's inputs and output
gradients (`grads.projection.KroneckerProjection`), so the per-example gradient is never formed. The
preconditioner is LogIX's "raw" one: per layer, the projected-gradient covariance F_l = 1/n Σ_i φ_i φ_iᵀ,
damped by λ_l = damping_factor · tr(F_l)/n (`curvature.gram`), and score(q, i) = -Σ_l ψ_l(q)ᵀ (F_l + λ_l
I)⁻¹ φ_l(i). `curvature="ekfac"` fits EK-FAC in the projected space instead (see `trak_ekfac`).

Defaults measured on digits-mlp (LDS, mean of 3 projection seeds): rank 16 / 32 / 64 → 0.68 / 0.72 / 0.74
with factor 1 (0.5 and 2 lower at both 16 and 32); rank 64 costs 8× the time of 32 (4096² covariances).
Parameters outside hooked layers (LayerNorm, biases of unhooked layers, position embeddings looked up once
per batch) are left out, with a warning that names them; select layers with `modules=[...]`.
"""

from __future__ import annotations

from . import register
from .gradient import GradientMethod

DEFAULT_RANK = 32

register("logra", GradientMethod, features="kronecker", curvature="covariance", rank=DEFAULT_RANK,
         damping_factor=1.0)

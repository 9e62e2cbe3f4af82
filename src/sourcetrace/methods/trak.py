"""TRAK (Park et al. 2023, arXiv 2303.14186) = random projection × Gauss-Newton in feature space × ensemble.

Per model c, φ_i = P_c ∇f_i is the randomly projected gradient of the training example's output function f
(the margin for classification) and Φ the matrix of these rows. With L = log(1 + e^{-f}) (cross-entropy
in the margin), ∇L_i = -Q_i ∇f_i, Q_i = 1 - p_i, and ∂²L_i/∂f_i² = R_i = p_i(1 - p_i). In our sign
convention score(q, i) = -∇m(q)ᵀ (ΦᵀRΦ + λI)⁻¹ ∇L_i, ensembled over C checkpoints or models:

    score(q, i) = Q̄_i · (1/C) Σ_c (P_c∇m_c(q))ᵀ (Φ_cᵀR_cΦ_c + λ_c I)⁻¹ φ_{c,i}

with Q̄ the mean of Q over models (TRAK's eq. 12, traker's `finalize_scores`; `out_to_loss="per-model"`
keeps Q_c inside the sum). `curvature="covariance"` uses TRAK's unweighted ΦᵀΦ instead; any other
preconditioner that works on random features composes too (e.g. `curvature="cg"`: the model's GGN seen
through the projection, PᵀCP). Each model gets its own projection (as traker), so projection noise
averages out. For tasks other than classification f = -L, so Q = R = 1 (empirical Fisher).

Damping: traker's default λ = 0 inverts a singular ΦᵀΦ as soon as proj_dim exceeds the number of training
examples (LDS 0.03 on digits-mlp at proj_dim 2048), and its best λ moves with proj_dim. Here λ =
damping_factor · tr(ΦᵀRΦ)/n, a ridge per training example (`curvature.gram`): scale-free, never singular,
and the same at every proj_dim. The factor 3 was chosen on digits-mlp (Gauss-Newton, mean Q, 5 checkpoints:
LDS 0.878 / 0.882 / 0.887 at k = 512 / 1024 / 2048, best of factors 1, 2, 3, 5 at each k), which is also
where it is reported. `damping=<float>` sets λ on the mean-loss scale (ΦᵀRΦ/n + λI).
"""

from __future__ import annotations

from . import register
from .gradient import GradientMethod

DEFAULT_DAMPING_FACTOR = 3.0

register("trak", GradientMethod, features="random", curvature="gauss-newton", combination="ensemble",
         damping_factor=DEFAULT_DAMPING_FACTOR)

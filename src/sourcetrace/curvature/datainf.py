"""DataInf (Kwon et al., ICLR 2024, arXiv 2310.00902): a closed-form inverse per layer, no iterations.

Per block l (one parameter tensor, e.g. a LoRA matrix), with g_i the per-example training-loss gradients,
DataInf swaps inversion and averaging, (1/n Σ_i g_i g_iᵀ + λI)⁻¹ ≈ 1/n Σ_i (g_i g_iᵀ + λI)⁻¹, and each
rank-one inverse has a Sherman–Morrison closed form:

    (G_l + λ_l I)⁻¹ v ≈ 1/(nλ_l) Σ_i (v - (g_iᵀv)/(λ_l + ‖g_i‖²) g_i)          (paper, eq. 5)

Cost O(n·d_l) per vector and no d×d matrix. The error grows with d_l, so it suits narrow blocks (LoRA).
Default damping per block: λ_l = 0.1 · mean_i ‖g_{l,i}‖² / d_l, i.e. 0.1 × the mean eigenvalue of G_l, the
rule of the DataInf code (`lambda_const_param=10`: λ = mean ‖g‖²/(10·d)) and sourcetrace's damping rule.
`damping=<float>` sets one λ for every block.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..data import state_fingerprint
from ..grads.store import GradientStore
from ..tasks import collate
from .base import Curvature, CurvatureContext, register_curvature
from .damping import resolve_damping

SHARD_BYTES = 64 * 2**20


@register_curvature("datainf")
class DataInf(Curvature):
    """DataInf's per-block closed form; the training gradients are kept in a store and streamed by `apply`."""

    def __init__(self, damping: float | None = None, damping_factor: float = 0.1, **options: Any):
        super().__init__(damping, **options)
        self.damping_factor = damping_factor
        self.store: GradientStore | None = None

    def fit(self, ctx: CurvatureContext) -> None:
        layout = ctx.layout()
        dim = layout[-1][2].stop if layout else 0
        n = len(ctx.train)
        if ctx.store is not None and ctx.store.dim == dim:  # the method's own gradients: nothing to redo
            self.store = ctx.store
            self._fit_from_store(layout, n)
            return
        dtype = "float64" if next(iter(ctx.capture.params.values())).dtype == torch.float64 else "float32"
        folder: str | Path
        if ctx.folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sourcetrace-datainf-")
            folder = self._tmp.name
        else:
            folder = ctx.folder / "datainf-grads"
        key = {"checkpoint": state_fingerprint(ctx.model.state_dict()), "params": list(ctx.capture.params)}
        shard = max(1, min(8192, SHARD_BYTES // max(1, dim * (8 if dtype == "float64" else 4))))
        self.store = GradientStore(folder, n, dim, dtype=dtype, shard_size=shard, key=key, overwrite=True)
        device = next(ctx.model.parameters()).device

        def rows(lo: int, hi: int) -> torch.Tensor:
            batch = collate(ctx.task, [ctx.train[i] for i in range(lo, hi)])
            batch = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)
            return ctx.capture.flat(ctx.task.train_loss, batch)

        self.store.fill(rows, batch_size=ctx.batch_size, progress=ctx.progress, desc="datainf gradients")
        self._fit_from_store(layout, n)

    def _fit_from_store(self, layout: list, n: int) -> None:
        assert self.store is not None
        self.slices = [sl for _, _, sl in layout]
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
        if self.store is None:
            raise RuntimeError("fit the DataInf curvature before applying it")
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

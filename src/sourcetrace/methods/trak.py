"""TRAK (Park et al. 2023, arXiv 2303.14186): projected output gradients with a Gauss-Newton preconditioner.

Per model c, φ_i = P ∇f_i is the randomly projected gradient of the training example's output function f
(the margin for classification) and Φ the matrix of these rows. With L = log(1 + e^{-f}) (cross-entropy
in the margin), ∇L_i = -Q_i ∇f_i, Q_i = 1 - p_i, and ∂²L_i/∂f_i² = R_i = p_i(1 - p_i). In our sign
convention score(q, i) = -∇m(q)ᵀ (ΦᵀRΦ + λI)⁻¹ ∇L_i, ensembled over C checkpoints or models:

    score(q, i) = Q̄_i · (1/C) Σ_c (P_c∇m_c(q))ᵀ (Φ_cᵀR_cΦ_c + λ_c I)⁻¹ φ_{c,i}

with Q̄ the mean of Q over models (TRAK's eq. 12, traker's `finalize_scores`; `out_to_loss="per-model"`
keeps Q_c inside the sum). ΦᵀRΦ is the Gauss-Newton matrix of the linearised model in projected space;
`curvature="unweighted"` uses TRAK's ΦᵀΦ instead. Each model gets its own projection (as traker), so
projection noise averages out. For tasks other than classification f = -L, so Q = R = 1 (empirical Fisher).

Damping: traker's default λ = 0 inverts a singular ΦᵀΦ as soon as proj_dim exceeds the number of training
examples (LDS 0.03 on digits-mlp at proj_dim 2048), and its best λ moves with proj_dim (10 at 512, 100 at
2048). Here λ = damping_factor · tr(ΦᵀRΦ)/n = damping_factor · mean_i R_i‖φ_i‖², a ridge per training
example: scale-free, never singular, and the same at every proj_dim since projections keep norms. The factor
3 was measured on digits-mlp (Gauss-Newton, mean Q, 5 checkpoints: LDS 0.878 / 0.882 / 0.887 at k = 512 /
1024 / 2048, best of factors 1, 2, 3, 5 at each k). `damping=<float>` sets λ itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..curvature.damping import resolve_damping
from ..data import Examples
from ..errors import InvalidOptionError
from ..grads import GradientCapture
from ..grads.projection import KINDS, RandomProjection
from ..grads.store import GradientStore
from ..tasks import ClassificationTask, collate
from . import register
from .base import Context
from .gradient import GradientOptions, GradientSimilarity, _device, _to

PROJECTION_CACHE = 512 * 2**20
DEFAULT_DAMPING_FACTOR = 3.0  # measured on digits-mlp at proj_dim 512, 1024 and 2048 (module docstring)


@dataclass(frozen=True)
class TRAKOptions(GradientOptions):
    """proj_dim: width k of the random projection (skipped when the gradient is no wider). projection:
    'gaussian', 'rademacher' or 'none'. seed: of the projections. damping: λ; None = damping_factor ×
    mean_i R_i‖φ_i‖². curvature: 'gauss-newton' (ΦᵀRΦ) or 'unweighted' (ΦᵀΦ, as traker). out_to_loss:
    'mean' (Q averaged over models, as TRAK) or 'per-model'. checkpoints: models to ensemble (checkpoints
    of one run or independently trained models).
    """

    proj_dim: int = 2048
    projection: str = "gaussian"
    seed: int = 0
    damping: float | None = None
    damping_factor: float = DEFAULT_DAMPING_FACTOR
    out_to_loss: str = "mean"
    curvature: str = "gauss-newton"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proj_dim < 1:
            raise InvalidOptionError("proj_dim must be at least 1")
        if self.projection not in (*KINDS, "none"):
            raise InvalidOptionError(f"projection must be one of {', '.join((*KINDS, 'none'))}; "
                                     f"got {self.projection!r}")
        if self.out_to_loss not in ("mean", "per-model"):
            raise InvalidOptionError("out_to_loss must be 'mean' or 'per-model'")
        if self.curvature not in ("gauss-newton", "unweighted"):
            raise InvalidOptionError("curvature must be 'gauss-newton' or 'unweighted'")
        if not math.isfinite(self.damping_factor) or self.damping_factor <= 0:
            raise InvalidOptionError("damping_factor must be a positive number")
        if self.learning_rates is not None:
            raise InvalidOptionError("trak weighs its models equally; leave learning_rates out "
                                     "(they are TracIn's)")


@register("trak")
class TRAK(GradientSimilarity):
    """TRAK: random projection × Gauss-Newton in projected space × out-to-loss weights × model ensemble."""

    Options = TRAKOptions
    options: TRAKOptions
    cheap_self_influence = False  # n solves of size k: computed on demand by Attributor.self_influence()

    def __init__(self, name: str, options: TRAKOptions):
        super().__init__(name, options)
        self._projections: dict[tuple[int, int], RandomProjection] = {}
        self.factors: list[torch.Tensor] = []  # Cholesky factors of Φ_cᵀR_cΦ_c + λ_c I
        self.out_to_loss: list[torch.Tensor] = []
        self.dampings: list[float] = []

    def multi_checkpoint(self, name: str) -> bool:
        return True  # an ensemble over checkpoints or independently trained models

    def _states(self) -> list[tuple[dict[str, torch.Tensor] | None, float]]:
        states = super()._states()
        return [(state, 1.0 / len(states)) for state, _ in states]

    # ---- features ------------------------------------------------------------------------------------
    def _projection(self, dim: int, c: int) -> RandomProjection | None:
        """The projection of model c: an independent one per model (as traker), so that projection noise
        averages out over the ensemble. All are kept for scoring while they fit in PROJECTION_CACHE bytes."""
        o = self.options
        if o.projection == "none" or o.proj_dim >= dim:
            return None
        if (dim, c) not in self._projections:
            if len(self._projections) * dim * o.proj_dim * 4 > PROJECTION_CACHE:
                self._projections.clear()
            seed = o.seed if c == 0 else o.seed + 10_000 * c
            self._projections[dim, c] = RandomProjection(dim, o.proj_dim, o.projection, seed)
        return self._projections[dim, c]

    def feature_dim(self, c: int, capture: GradientCapture) -> int:
        return capture.dim if self._projection(capture.dim, c) is None else self.options.proj_dim

    def _output(self, task: Any) -> Any:
        """f of TRAK: the margin for classification, else minus the training loss."""
        if isinstance(task, ClassificationTask):
            return ClassificationTask("margin", task.input_key, task.target_key).measurement
        return lambda model, batch: -task.train_loss(model, batch)

    def _rows(self, c: int, capture: GradientCapture, fn: Any, batch: Any) -> torch.Tensor:
        grads = capture.flat(fn, batch)
        proj = self._projection(capture.dim, c)
        return grads if proj is None else proj(grads)

    def train_rows(self, ctx: Context, c: int, capture: GradientCapture, batch: Any) -> torch.Tensor:
        return self._rows(c, capture, self._output(ctx.task), batch)

    def query_rows(self, ctx: Context, c: int, capture: GradientCapture, batch: Any) -> torch.Tensor:
        return self._rows(c, capture, ctx.task.measurement, batch)

    # ---- curvature: (ΦᵀRΦ + λI)⁻¹ from the stored rows; out-to-loss weights from a forward pass ----------
    def fit_curvature(self, ctx: Context, c: int, model: nn.Module, capture: GradientCapture,
                      train: Examples, store: GradientStore) -> None:
        out = self._out_to_loss(ctx, model, train)
        # Gauss-Newton weights: ∂²L/∂f² = p(1 - p) = Q(1 - Q) for the logistic loss in the margin
        weights = out * (1 - out) if self.options.curvature == "gauss-newton" and isinstance(
            ctx.task, ClassificationTask) else torch.ones_like(out)
        dtype = torch.float64 if store.dtype == "float64" else torch.float32  # the store's precision
        gram = torch.zeros(store.dim, store.dim, dtype=dtype)
        for lo, hi, rows in store.shards():
            rows = rows.to(dtype)
            gram.addmm_(rows.T * weights[lo:hi].to(dtype), rows)
        gram = gram.double()
        # λ per training example: tr(ΦᵀRΦ)/n = mean_i R_i‖φ_i‖², the same for every k (JL keeps norms)
        lam = resolve_damping(self.options.damping, float(gram.diagonal().sum()) / store.n,
                              self.options.damping_factor)
        gram.diagonal().add_(lam)
        self.factors[c:] = [torch.linalg.cholesky(gram)]
        self.dampings[c:] = [lam]
        self.out_to_loss[c:] = [out]

    def _out_to_loss(self, ctx: Context, model: nn.Module, train: Examples) -> torch.Tensor:
        """Q_i = -∂L_i/∂f_i: 1 - p_i = σ(-margin_i) for classification (stable for confident examples)."""
        if not isinstance(ctx.task, ClassificationTask):
            return torch.ones(len(train), dtype=torch.float64)
        margin = self._output(ctx.task)
        out = []
        with torch.no_grad():
            for _, items in train.batches(self.options.batch_size):
                batch = _to(collate(ctx.task, items), _device(model))
                out.append(torch.sigmoid(-margin(model, batch).double()).cpu())
        return torch.cat(out)

    def precondition(self, c: int, rows: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(rows.double().T, self.factors[c]).T.to(rows.dtype)

    def _weights(self) -> list[torch.Tensor]:
        if self.options.out_to_loss == "mean":
            return [torch.stack(self.out_to_loss).mean(0)] * len(self.out_to_loss)
        return self.out_to_loss

    # ---- scoring: score = Σ_c w_c Q_i (q_c M_c) φ_{c,i} ------------------------------------------------
    def _blocks(self, feats: list[torch.Tensor], only: int | None = None
                ) -> Iterator[tuple[int, int, torch.Tensor]]:
        if only is not None:
            raise InvalidOptionError(f"method {self.name!r}: per-checkpoint scores are not available for "
                                     "this method")
        return self._trak_blocks(feats)

    def _trak_blocks(self, feats: list[torch.Tensor]) -> Iterator[tuple[int, int, torch.Tensor]]:
        weights = self._weights()
        for parts in zip(*(s.shards() for s in self.stores)):
            lo, hi = parts[0][0], parts[0][1]
            total = None
            for q, w, out, (_, _, g) in zip(feats, self.weights, weights, parts):
                block = w * (q @ g.to(q.dtype).T) * out[lo:hi].to(q.dtype)
                total = block if total is None else total + block
            assert total is not None
            yield lo, hi, total

    def self_influence(self, ctx: Context) -> torch.Tensor | None:
        """Σ_c w_c ∇L_iᵀ M_c ∇L_i = Σ_c w_c Q_i² φ_iᵀ M_c φ_i."""
        total = torch.zeros(len(self.train_ids), dtype=torch.float64)
        for c, (store, w, out) in enumerate(zip(self.stores, self.weights, self._weights())):
            for lo, hi, g in store.shards():
                g = g.double()
                total[lo:hi] += w * out[lo:hi] ** 2 * (self.precondition(c, g) * g).sum(1)
        return total if self.stores[0].dtype == "float64" else total.float()

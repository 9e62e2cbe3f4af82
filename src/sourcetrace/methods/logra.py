"""LoGra (Choe et al. 2024, arXiv 2405.13954): Kronecker-projected gradients with a damped inverse covariance.

Each hooked layer's weight gradient is projected as P_0ᵀ G P_1 from the layer's inputs and output
gradients (`grads.projection.KroneckerProjection`), so the per-example gradient is never formed. The
preconditioner is LogIX's "raw" one: per layer, the projected-gradient covariance F_l = 1/n Σ_i φ_i φ_iᵀ,
damped by λ_l = damping_factor · tr(F_l)/n = damping_factor · mean_i ‖φ_{l,i}‖² / n, a ridge per training
example (as TRAK's default here), and score(q, i) = -Σ_l ψ_l(q)ᵀ (F_l + λ_l I)⁻¹ φ_l(i).

Defaults measured on digits-mlp (LDS, mean of 3 projection seeds): rank 16 / 32 / 64 → 0.68 / 0.72 / 0.74
with factor 1 (0.5 and 2 lower at both 16 and 32); the older rule 0.1 × mean eigenvalue gave 0.66 / 0.66,
and its best factor moved with the rank. Rank 64 costs 8× the time of 32 (4096² covariances).

Parameters outside hooked layers (LayerNorm, biases of unhooked layers, position embeddings looked up once
per batch) are left out, with a warning that names them; select layers with `modules=[...]`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..curvature.damping import resolve_damping
from ..data import Examples
from ..errors import InvalidOptionError, UnsupportedModuleError
from ..grads import GradientCapture
from ..grads.projection import KINDS, KroneckerProjection
from ..grads.store import GradientStore
from ..tasks import collate
from . import register
from .base import Context
from .gradient import GradientOptions, GradientSimilarity, _device, _to

DEFAULT_RANK = 32


@dataclass(frozen=True)
class LoGraOptions(GradientOptions):
    """rank: projection width per side of each layer (a layer gives rank² features; a side no wider than
    the rank is kept whole). projection: 'gaussian' or 'rademacher'. seed: of the projections. damping: λ for
    every layer; None = damping_factor × mean_i ‖φ_{l,i}‖² / n for each layer l.
    """

    rank: int = DEFAULT_RANK
    projection: str = "gaussian"
    seed: int = 0
    damping: float | None = None
    damping_factor: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise InvalidOptionError("rank must be at least 1")
        if self.projection not in KINDS:
            raise InvalidOptionError(f"projection must be one of {', '.join(KINDS)}; got {self.projection!r}")
        if not math.isfinite(self.damping_factor) or self.damping_factor <= 0:
            raise InvalidOptionError("damping_factor must be a positive number")


@register("logra")
class LoGra(GradientSimilarity):
    """Kronecker-projected gradients × per-layer damped inverse covariance."""

    Options = LoGraOptions
    options: LoGraOptions

    def __init__(self, name: str, options: LoGraOptions):
        super().__init__(name, options)
        self.exclude: set[str] = set()
        self._kron: tuple[int, KroneckerProjection] | None = None
        self.inverses: list[list[torch.Tensor]] = []

    def projection(self, capture: GradientCapture) -> KroneckerProjection:
        """The Kronecker projection of this capture's layers (rebuilt identically from the seed)."""
        if self._kron is None or self._kron[0] != id(capture):
            o = self.options
            kron = KroneckerProjection(capture, o.rank, o.projection, o.seed, self.exclude)
            self._kron = (id(capture), kron)
        return self._kron[1]

    def fit(self, ctx: Context, train: Examples) -> None:
        self._probe(ctx, train)
        super().fit(ctx, train)

    def _probe(self, ctx: Context, train: Examples) -> None:
        """Leave out layers that run on inputs without a batch axis (e.g. GPT-2's position embedding)."""
        capture = GradientCapture(ctx.model, self.options.modules, fallback=True)
        items = [train[i] for i in range(min(2, len(train)))]
        io, values = capture.layer_io(ctx.task.train_loss, _to(collate(ctx.task, items), _device(ctx.model)))
        b = values.shape[0]
        self.exclude = {capture.owner[(name, local)] for name, calls in io.items() for a, g in calls
                        if a.shape[0] != b or g.shape[0] != b
                        for local, _ in capture.layers[name].named_parameters(recurse=False)
                        if (name, local) in capture.owner}
        kron = KroneckerProjection(capture, self.options.rank, self.options.projection, self.options.seed,
                                   self.exclude)
        if not kron.blocks:
            raise UnsupportedModuleError("logra found no Linear, Conv1D, Conv2d or Embedding layer to "
                                         f"project among modules={self.options.modules!r}; use trak")
        if kron.left_out:
            warnings.warn(f"logra leaves out {len(kron.left_out)} parameters outside supported layers "
                          f"(e.g. {kron.left_out[:3]}); pass modules=[...] to choose layers", stacklevel=4)

    def feature_dim(self, c: int, capture: GradientCapture) -> int:
        return self.projection(capture).dim

    def train_rows(self, ctx: Context, c: int, capture: GradientCapture, batch: Any) -> torch.Tensor:
        return self.projection(capture)(ctx.task.train_loss, batch)

    def query_rows(self, ctx: Context, c: int, capture: GradientCapture, batch: Any) -> torch.Tensor:
        return self.projection(capture)(ctx.task.measurement, batch)

    def fit_curvature(self, ctx: Context, c: int, model: nn.Module, capture: GradientCapture,
                      train: Examples, store: GradientStore) -> None:
        self.slices = list(self.projection(capture).slices.values())
        covs = [torch.zeros(sl.stop - sl.start, sl.stop - sl.start, dtype=torch.float64)
                for sl in self.slices]
        for _, _, rows in store.shards():
            rows = rows.double()
            for cov, sl in zip(covs, self.slices):
                cov.addmm_(rows[:, sl].T, rows[:, sl])
        inverses = []
        for cov in covs:
            cov /= store.n
            # a ridge per training example: λ_l = factor · mean_i ‖φ_{l,i}‖² / n, the same at every rank
            lam = resolve_damping(self.options.damping, float(cov.diagonal().sum()) / store.n,
                                  self.options.damping_factor)
            cov.diagonal().add_(lam)
            inverses.append(torch.cholesky_inverse(torch.linalg.cholesky(cov)))
        self.inverses[c:] = [inverses]

    def precondition(self, c: int, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rows, dtype=torch.float64)
        for inv, sl in zip(self.inverses[c], self.slices):
            out[:, sl] = rows[:, sl].double() @ inv
        return out.to(rows.dtype)

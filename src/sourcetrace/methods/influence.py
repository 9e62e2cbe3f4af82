"""Influence functions: `score(q, i) = -∇m(q)ᵀ (C + λI)⁻¹ ∇L(i)` with C a curvature of the mean training loss.

The gradient collection, store and scoring are those of grad-dot; only the query side is preconditioned,
by a curvature from `sourcetrace.curvature` (explicit, cg, lissa, arnoldi, kfac, ekfac, diagonal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..curvature import build_curvature
from ..curvature.base import Curvature, CurvatureContext
from ..data import Examples
from ..errors import InvalidOptionError
from ..grads import GradientCapture
from ..grads.store import GradientStore
from . import register
from .base import Context
from .gradient import GradientOptions, GradientSimilarity

CURVATURE_METHODS = ("explicit", "cg", "lissa", "arnoldi", "kfac", "ekfac", "diagonal", "datainf")


@dataclass(frozen=True)
class InfluenceOptions(GradientOptions):
    """curvature: which approximation of the curvature (default ekfac, which works at every scale).
    damping: λ added to the curvature; None applies the curvature's documented default rule.
    curvature_options: options of that curvature (e.g. {"rank": 50} for arnoldi).
    query_rank: keep only the top `query_rank` singular directions of each weight's preconditioned query
    gradient (as a matrix [rows, rest]); an approximation that keeps query features small (as kronfluence's
    query low-rank), None keeps them exact.
    """

    curvature: str = "ekfac"
    damping: float | None = None
    curvature_options: dict[str, Any] = field(default_factory=dict)
    query_rank: int | None = None


@register("influence", *CURVATURE_METHODS)
class Influence(GradientSimilarity):
    """Influence functions; `method="ekfac"` is short for `method="influence", curvature="ekfac"`."""

    Options = InfluenceOptions
    options: InfluenceOptions
    cheap_self_influence = False

    def __init__(self, name: str, options: InfluenceOptions):
        if name != "influence":
            if options.curvature not in ("ekfac", name):  # a curvature given beside a curvature name
                raise InvalidOptionError(f"method {name!r} is influence with curvature={name!r}; "
                                         f"use method='influence' to choose curvature={options.curvature!r}")
            options = dataclasses.replace(options, curvature=name)
        if options.curvature not in CURVATURE_METHODS:
            raise InvalidOptionError(f"curvature must be one of {', '.join(CURVATURE_METHODS)}; "
                                     f"got {options.curvature!r}")
        super().__init__(name, options)
        self.curvatures: list[Curvature] = []

    def fit_curvature(self, ctx: Context, c: int, model: nn.Module, capture: GradientCapture,
                      train: Examples, store: GradientStore) -> None:
        o = self.options
        curv = build_curvature(o.curvature, damping=o.damping, **o.curvature_options)
        cctx = CurvatureContext(model, ctx.task, capture, train, batch_size=o.batch_size,
                                folder=ctx.workdir / f"curvature-{c}", progress=ctx.progress, store=store)
        curv.fit(cctx)
        self.curvatures[c:] = [curv]

    def precondition(self, c: int, rows: torch.Tensor) -> torch.Tensor:
        return self.curvatures[c].apply(rows).to(rows.dtype)

    def query_features(self, ctx: Context, queries: Examples) -> list[torch.Tensor]:
        feats = super().query_features(ctx, queries)
        rank = self.options.query_rank
        return feats if rank is None else [low_rank(q, self.shapes, rank) for q in feats]


def low_rank(rows: torch.Tensor, shapes: dict[str, tuple[int, ...]], rank: int) -> torch.Tensor:
    """Each row with every weight's block (as a [shape[0], rest] matrix) cut to its top `rank` SVD terms."""
    if rank < 1:
        raise InvalidOptionError("query_rank must be at least 1")
    out, start = rows.clone(), 0
    for shape in shapes.values():
        size = int(torch.Size(shape).numel())
        if len(shape) >= 2 and min(shape[0], size // shape[0]) > rank:
            block = rows[:, start:start + size].reshape(rows.shape[0], shape[0], -1)
            u, s, vh = torch.linalg.svd(block, full_matrices=False)
            out[:, start:start + size] = ((u[..., :rank] * s[:, None, :rank]) @ vh[:, :rank]).reshape(
                rows.shape[0], -1)
        start += size
    return out

"""FeatureMap: what a per-example gradient becomes before it is stored and scored.

A feature map is bound to a `GradientCapture` at one checkpoint and maps `fn(model, batch)` to rows
[B, dim]; `slices` names the blocks of a row (a parameter, or a projected weight) for per-module scores and
block-wise preconditioners; `back` maps feature rows to parameter rows (the transpose), where it exists.

- `identity`: the flat gradient itself (`GradientCapture.flat`);
- `random`: a seeded dense projection (TRAK), one independent projection per checkpoint;
- `kronecker`: LoGra's per-layer P_0ᵀ G P_1 from layer inputs and output gradients (never forms G);
- `structured`: `kronecker`, then a dense random projection of those rows to `proj_dim` (one block). TRAK's
  projection for large models: its dense matrix is Σ k_0·k_1 × proj_dim, small enough to keep, where
  the parameters × proj_dim matrix of `random` would be regenerated for every batch.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import UnsupportedModuleError
from .capture import GradientCapture
from .projection import KINDS, KroneckerProjection, RandomProjection

FEATURE_MAPS = ("identity", "random", "kronecker", "structured")
PROJECTION_CACHE = 512 * 2**20  # bytes of random projections kept between fit and score


class IdentityFeatures:
    """The flat per-example gradient; a block per parameter."""

    feature_kind = "identity"

    def __init__(self, capture: GradientCapture):
        self.capture, self.dim = capture, capture.dim
        self.slices, start = {}, 0
        for name, shape in capture.shapes.items():
            size = int(torch.Size(shape).numel())
            self.slices[name] = slice(start, start + size)
            start += size

    def __call__(self, fn: Any, batch: Any) -> torch.Tensor:
        return self.capture.flat(fn, batch)

    def back(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


class RandomFeatures:
    """x P: the flat gradient randomly projected to k columns (one block)."""

    feature_kind = "random"

    def __init__(self, capture: GradientCapture, projection: RandomProjection):
        self.capture, self.projection, self.dim = capture, projection, projection.k
        self.slices = {"": slice(0, projection.k)}

    def __call__(self, fn: Any, batch: Any) -> torch.Tensor:
        return self.projection(self.capture.flat(fn, batch))

    def back(self, rows: torch.Tensor) -> torch.Tensor:
        """v Pᵀ: feature rows [m, k] as parameter rows [m, dim]."""
        return rows @ self.projection.matrix(dtype=rows.dtype, device=rows.device).T


class StructuredFeatures:
    """(kronecker rows) P: LoGra's projected gradient, randomly projected to k columns (one block)."""

    feature_kind = "structured"

    def __init__(self, kron: KroneckerProjection, projection: RandomProjection):
        self.kron, self.projection, self.dim = kron, projection, projection.k
        self.capture, self.slices = kron.capture, {"": slice(0, projection.k)}

    def __call__(self, fn: Any, batch: Any) -> torch.Tensor:
        return self.projection(self.kron(fn, batch))


class FeatureMap:
    """Which features to store: `kind` in FEATURE_MAPS, with the projection's width, kind and seed."""

    def __init__(self, kind: str = "identity", proj_dim: int = 2048, projection: str = "gaussian",
                 rank: int = 32, seed: int = 0):
        self.kind, self.proj_dim, self.projection = kind, proj_dim, projection
        self.rank, self.seed = rank, seed
        self.exclude: set[str] = set()
        self._random: dict[tuple[int, int], RandomProjection] = {}

    def prepare(self, model: torch.nn.Module, modules: Any, fn: Any, batch: Any) -> None:
        """Kronecker: leave out layers run on inputs without a batch axis (GPT-2's position embedding)."""
        if self.kind not in ("kronecker", "structured"):
            return
        capture = GradientCapture(model, modules, fallback=True)
        io, values = capture.layer_io(fn, batch)
        b = values.shape[0]
        self.exclude = {capture.owner[(name, local)] for name, calls in io.items() for a, g in calls
                        if a.shape[0] != b or g.shape[0] != b
                        for local, _ in capture.layers[name].named_parameters(recurse=False)
                        if (name, local) in capture.owner}
        kron = self._kronecker(capture)
        if not kron.blocks:
            raise UnsupportedModuleError("kronecker features found no Linear, Conv1D, Conv2d or Embedding "
                                         f"layer among modules={modules!r}; use features='random'")
        if kron.left_out:
            warnings.warn(f"kronecker features leave out {len(kron.left_out)} parameters outside supported "
                          f"layers (e.g. {kron.left_out[:3]}); pass modules=[...] to choose layers",
                          stacklevel=5)

    def bind(self, capture: GradientCapture, checkpoint: int) -> Any:
        """The features of this capture at checkpoint `checkpoint` (random: one projection per checkpoint)."""
        if self.kind == "kronecker":
            return self._kronecker(capture)
        if self.kind == "structured":
            kron = self._kronecker(capture)
            return StructuredFeatures(kron, self._projection(kron.dim, checkpoint))
        if self.kind == "identity" or self.projection == "none" or self.proj_dim >= capture.dim:
            return IdentityFeatures(capture)
        return RandomFeatures(capture, self._projection(capture.dim, checkpoint))

    def _kronecker(self, capture: GradientCapture) -> KroneckerProjection:
        return KroneckerProjection(capture, self.rank, self.projection, self.seed, self.exclude)

    def _projection(self, dim: int, checkpoint: int) -> RandomProjection:
        """The dense projection of `dim` coordinates at a checkpoint (one independent one per checkpoint)."""
        key = (dim, checkpoint)
        if key not in self._random:
            if len(self._random) * dim * self.proj_dim * 4 > PROJECTION_CACHE:
                self._random.clear()
            seed = self.seed if checkpoint == 0 else self.seed + 10_000 * checkpoint
            self._random[key] = RandomProjection(dim, self.proj_dim, self.projection, seed)
        return self._random[key]


__all__ = ["FEATURE_MAPS", "KINDS", "FeatureMap", "IdentityFeatures", "RandomFeatures",
           "StructuredFeatures"]

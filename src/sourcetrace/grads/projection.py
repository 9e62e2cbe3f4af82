"""Random projections of per-example gradients, generated from a seed and never stored whole.

`RandomProjection` maps rows x [B, dim] to x P [B, k], with P [dim, k] of i.i.d. Gaussian or Rademacher
entries scaled by 1/√k, so E[(xP)·(yP)] = x·y (Johnson–Lindenstrauss; TRAK, Park et al. 2023). P is made
in blocks of rows, each from its own generator seeded by (seed, block): train and query sides, processes and
devices agree, and any slice of coordinates can be projected on its own (`offset`).

`KroneckerProjection` is LoGra's (Choe et al. 2024, arXiv 2405.13954): the gradient of a layer
y = W a is G = Σ_t g_tᵀ a_t, so (P_g ⊗ P_a)ᵀ vec(G) = Σ_t (g_t P_g)ᵀ (a_t P_a). Inputs and output
gradients from `GradientCapture.layer_io` are projected separately and the per-example gradient is never
formed: memory per example is k_g·k_a instead of out·in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidOptionError, ShapeError
from .capture import GradientCapture, is_conv1d

KINDS = ("gaussian", "rademacher")


def _seed(*parts: Any) -> int:
    """A 63-bit generator seed from any parts (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def random_matrix(rows: int, cols: int, kind: str, seed: int) -> torch.Tensor:
    """[rows, cols] float32 on CPU with entries of mean 0 and variance 1 (Gaussian or ±1)."""
    if kind not in KINDS:
        raise InvalidOptionError(f"projection kind must be one of {KINDS}; got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=gen)
    return torch.randint(0, 2, (rows, cols), generator=gen).float().mul_(2).sub_(1)


class RandomProjection:
    """x [B, dim] -> x P [B, k]; P [dim, k] = R/√k with R i.i.d. N(0, 1) or ±1, made block by block.

    Rows [b·block_rows, (b+1)·block_rows) of P come from seed (seed, b). Blocks are regenerated on demand;
    up to `cache_bytes` of them are kept (so a model of any size projects in bounded memory, and a small one
    does not pay for regeneration on every batch).
    """

    def __init__(self, dim: int, k: int, kind: str = "gaussian", seed: int = 0,
                 block_rows: int | None = None, cache_bytes: int = 256 * 2**20):
        if dim < 1 or k < 1:
            raise InvalidOptionError(f"a projection needs dim >= 1 and k >= 1; got dim={dim}, k={k}")
        if kind not in KINDS:
            raise InvalidOptionError(f"projection kind must be one of {KINDS}; got {kind!r}")
        self.dim, self.k, self.kind, self.seed = int(dim), int(k), kind, int(seed)
        self.block_rows = int(block_rows) if block_rows else max(1, 2**22 // self.k)  # 16 MiB in float32
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._cached = 0

    def _block(self, b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (b, dtype, torch.device(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        lo = b * self.block_rows
        rows = min(self.block_rows, self.dim - lo)
        block = random_matrix(rows, self.k, self.kind, _seed("dense", self.seed, self.kind, self.k,
                                                             self.block_rows, b))
        block = block.mul_(self.k ** -0.5).to(dtype=dtype, device=device)
        size = block.numel() * block.element_size()
        if self._cached + size <= self.cache_bytes:
            self._cache[key] = block
            self._cached += size
        return block

    def matrix(self, lo: int = 0, hi: int | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows [lo, hi) of P (for tests and small problems; `__call__` never needs it whole)."""
        hi = self.dim if hi is None else hi
        return torch.cat([self._rows(a, b, dtype, torch.device(device)) for a, b in self._spans(lo, hi)])

    def _spans(self, lo: int, hi: int) -> list[tuple[int, int]]:
        out, start = [], lo
        while start < hi:
            stop = min(hi, (start // self.block_rows + 1) * self.block_rows)
            out.append((start, stop))
            start = stop
        return out

    def _rows(self, lo: int, hi: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        b = lo // self.block_rows
        base = b * self.block_rows
        return self._block(b, dtype, device)[lo - base: hi - base]

    def __call__(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x [B, w] holds coordinates [offset, offset + w) of the vectors: their part of x P, [B, k]."""
        if x.dim() != 2:
            raise ShapeError(f"project rows [B, width]; got shape {tuple(x.shape)}")
        if offset < 0 or offset + x.shape[1] > self.dim:
            raise ShapeError(f"coordinates [{offset}, {offset + x.shape[1]}) outside the projection's "
                             f"input dimension {self.dim}")
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        out = torch.zeros(x.shape[0], self.k, dtype=dtype, device=x.device)
        for lo, hi in self._spans(offset, offset + x.shape[1]):
            out.addmm_(x[:, lo - offset: hi - offset].to(dtype), self._rows(lo, hi, dtype, x.device))
        return out


# ---- LoGra: Kronecker projection from layer inputs and output gradients --------------------------------

@dataclass
class _Side:
    """One axis of a weight matrix: its size, whether a bias row is folded in, its projection [rows, k]."""

    size: int
    bias: bool = False
    k: int = 0
    matrix: torch.Tensor | None = None  # None: identity (the axis is no wider than the rank)

    @property
    def rows(self) -> int:
        return self.size + int(self.bias)


@dataclass
class _Block:
    """A projected weight: parameter name, its two axes, and the layers (with orientation) that use it."""

    weight: str
    axes: tuple[_Side, _Side]
    layers: list[tuple[str, str | None, bool]] = field(default_factory=list)  # layer, bias, a on axis 0

    @property
    def dim(self) -> int:
        return self.axes[0].k * self.axes[1].k


def _layer_axes(module: nn.Module) -> tuple[int, int, int] | None:
    """(rows, cols, axis of the input side) of the layer's weight seen as a matrix; None if unsupported."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, 1
    if is_conv1d(module):  # transformers' Conv1D keeps W as [in, out]: y = x W + b
        w = cast(torch.Tensor, module.weight)
        return w.shape[0], w.shape[1], 0
    if isinstance(module, nn.Conv2d):
        return module.weight.shape[0], int(module.weight[0].numel()), 1
    if isinstance(module, nn.Embedding):  # the input side is the one-hot token id
        return module.num_embeddings, module.embedding_dim, 0
    return None


class KroneckerProjection:
    """LoGra's projected gradients of every hooked layer's weight (bias folded in), [B, Σ k_0·k_1].

    Each weight, seen as a matrix [n_0, n_1] in its own layout (Conv2d flattened to [out, in·kh·kw]),
    gets one projection per axis, P_i [n_i (+1 for a folded bias), k_i] with k_i = min(rank, n_i (+1)):
    an axis no wider than the rank is kept whole (identity). The projected row of an example is
    vec(P_0ᵀ [W | b]-gradient P_1), row-major. A weight shared by several layers (tied embeddings) sums
    their contributions, as its true gradient does. Parameters outside hooked layers (LayerNorm, position
    embeddings looked up once per batch) are left out and listed in `left_out`.
    """

    feature_kind = "kronecker"  # which feature map it is (`grads.features`)

    def __init__(self, capture: GradientCapture, rank: int = 32, kind: str = "gaussian", seed: int = 0,
                 exclude: set[str] | frozenset[str] = frozenset()):
        if rank < 1:
            raise InvalidOptionError(f"rank must be at least 1; got {rank}")
        self.capture, self.rank, self.kind, self.seed = capture, int(rank), kind, int(seed)
        blocks: dict[str, _Block] = {}
        covered: set[str] = set()
        for lname, module in capture.layers.items():
            weight = capture.owner.get((lname, "weight"))
            axes = _layer_axes(module)
            if weight is None or axes is None or weight in capture.fallback_names or weight in exclude:
                continue
            n0, n1, a_axis = axes
            bias = capture.owner.get((lname, "bias"))
            if bias is not None and (bias in capture.fallback_names or bias in exclude):
                bias = None
            block = blocks.setdefault(weight, _Block(weight, (_Side(n0), _Side(n1))))
            if (block.axes[0].size, block.axes[1].size) != (n0, n1):
                continue  # the same tensor seen with another shape: leave this use to left_out
            if bias is not None:
                block.axes[a_axis].bias = True
                covered.add(bias)
            block.layers.append((lname, bias, a_axis == 0))
            covered.add(weight)
        self.blocks = list(blocks.values())
        for block in self.blocks:
            for i, side in enumerate(block.axes):
                side.k = side.rows if side.rows <= self.rank else self.rank
                if side.rows > self.rank:
                    key = _seed("kron", seed, kind, block.weight, i, side.rows, side.k)
                    side.matrix = random_matrix(side.rows, side.k, kind, key).mul_(side.k ** -0.5)
        self.left_out = [n for n in capture.params if n not in covered]
        self.dim = sum(b.dim for b in self.blocks)
        self.slices: dict[str, slice] = {}
        start = 0
        for b in self.blocks:
            self.slices[b.weight] = slice(start, start + b.dim)
            start += b.dim

    def side_matrix(self, weight: str, axis: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """P_axis of a projected weight [rows, k] (the identity where the axis is kept whole)."""
        side = next(b for b in self.blocks if b.weight == weight).axes[axis]
        return torch.eye(side.rows, dtype=dtype) if side.matrix is None else side.matrix.to(dtype)

    def layer_rows(self, block: _Block, layer: str, bias: str | None, a_first: bool, a: torch.Tensor,
                   g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of `layer`: projected inputs [B, T, k_a] (bias input folded in) and projected output
        gradients [B, T, k_g], in the output gradients' precision."""
        module = self.capture.layers[layer]
        a_rows, g_rows = _tokens(module, a, g)
        a_side, g_side = (block.axes[0], block.axes[1]) if a_first else (block.axes[1], block.axes[0])
        pa = _project_inputs(module, a_rows, a_side, bias is not None, g_rows.dtype)
        return pa, _project(g_rows, g_side)

    def __call__(self, fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any) -> torch.Tensor:
        """Projected per-example gradients of `fn(model, batch)` [B, dim], from one forward/backward."""
        io, values = self.capture.layer_io(fn, batch)
        b = values.shape[0]
        parts = []
        for block in self.blocks:
            total = torch.zeros(b, block.axes[0].k, block.axes[1].k, dtype=values.dtype, device=values.device)
            for lname, bias, a_first in block.layers:
                for a, g in io[lname]:
                    if a.shape[0] != b or g.shape[0] != b:
                        raise ShapeError(
                            f"layer {lname!r} ran on inputs without a batch axis (shape {tuple(a.shape)}); "
                            "its per-example gradient cannot be projected: leave it out with modules=[...]")
                    pa, pg = self.layer_rows(block, lname, bias, a_first, a, g)
                    total += torch.einsum("btu,btv->buv", pa, pg) if a_first else \
                        torch.einsum("btu,btv->buv", pg, pa)
            parts.append(total.reshape(b, -1))
        if not parts:
            return torch.zeros(b, 0, dtype=values.dtype, device=values.device)
        return torch.cat(parts, dim=1)


def _tokens(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, T, n_in] (token ids [B, T] for an embedding) and output gradients [B, T, n_out]."""
    b = a.shape[0]
    if isinstance(module, nn.Conv2d):
        # never a string here: hookable() sends string padding to the fallback
        padding = cast("tuple[int, ...]", module.padding)
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride)  # [B, C_in·kh·kw, L]
        return cols.transpose(1, 2), g.reshape(b, g.shape[1], -1).transpose(1, 2)
    if isinstance(module, nn.Embedding):
        return a.reshape(b, -1), g.reshape(b, -1, g.shape[-1])
    return a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])


def _project(x: torch.Tensor, side: _Side) -> torch.Tensor:
    if side.matrix is None:
        return x if not side.bias else torch.cat([x, torch.zeros_like(x[..., :1])], -1)
    return x @ side.matrix[: x.shape[-1]].to(dtype=x.dtype, device=x.device)


def _project_inputs(module: nn.Module, a: torch.Tensor, side: _Side, with_bias: bool, dtype: torch.dtype
                    ) -> torch.Tensor:
    """a_t P_a with the constant-1 bias input folded in (one-hot rows of P_a for an embedding)."""
    if isinstance(module, nn.Embedding):
        ids = a.long()
        if side.matrix is None:
            out = F.one_hot(ids, side.rows).to(dtype)
        else:
            out = side.matrix.to(dtype=dtype, device=ids.device)[ids]
        if module.padding_idx is not None:
            out = out * (ids != module.padding_idx)[..., None].to(dtype)
        return out
    a = a.to(dtype)
    if side.matrix is None:
        if not side.bias:
            return a
        ones = torch.ones_like(a[..., :1]) if with_bias else torch.zeros_like(a[..., :1])
        return torch.cat([a, ones], -1)
    p = side.matrix.to(dtype=dtype, device=a.device)
    out = a @ p[: side.size]
    return out + p[side.size] if with_bias else out


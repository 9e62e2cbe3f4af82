"""The exact curvature of the mean training loss, formed column block by column block, for small models.

C (the Gauss-Newton matrix by default, or the Hessian) is built from batched curvature-vector products on
blocks of unit vectors (`CurvatureOperator`, torch.func), so no per-example Jacobian of the whole model is
ever held, then eigendecomposed once in float64: `(C + λI)⁻¹ = U (Σ + λ)⁻¹ Uᵀ` for any λ at the cost of
two matrix products (Koh & Liang 2017 form the Hessian; the GGN is Martens 2010's positive semi-definite
stand-in). Memory is two dim × dim float64 matrices (the matrix is overwritten by LAPACK's MRRR solver).
With `ctx.folder`, the eigendecomposition is cached there, keyed by the parameters, data and kind.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..artifacts import load_tensors, save_tensors
from ..data import state_fingerprint
from ..errors import InvalidOptionError
from .base import CurvatureContext, Preconditioner, register_curvature
from .damping import resolve_damping
from .iterative import KINDS, CurvatureOperator

MAX_DIM = 30_000


@register_curvature("explicit")
class ExplicitCurvature(Preconditioner):
    """Exact Hessian or GGN, eigendecomposed in float64.

    Options: kind ("ggn" | "hessian"); clip (negative eigenvalues of the Hessian, from a non-convex point,
    are set to 0 so that C + λI stays positive definite; default True); block (unit vectors per batched
    product, 256); chunk / batch_size (see `CurvatureOperator`); max_dim (refuse larger models, 30000);
    damping / damping_factor (see `damping.py`).
    """

    def __init__(self, damping: float | None = None, damping_factor: float | None = None, kind: str = "ggn",
                 clip: bool = True, block: int = 256, max_dim: int = MAX_DIM, chunk: int = 32,
                 batch_size: int | None = None):
        super().__init__(damping, damping_factor)
        if kind not in KINDS:
            raise InvalidOptionError(f"kind must be one of {KINDS} (got {kind!r})")
        self.kind, self.clip, self.block, self.max_dim = kind, bool(clip), int(block), int(max_dim)
        self.chunk, self.batch_size = chunk, batch_size

    def fit(self, ctx: CurvatureContext) -> None:
        import scipy.linalg

        dim = int(ctx.capture.dim)
        if dim > self.max_dim:
            gib = 2 * dim * dim * 8 / 2**30
            raise InvalidOptionError(
                f"the explicit curvature of {dim} parameters needs two {dim}×{dim} float64 matrices "
                f"({gib:.1f} GiB) and an O(dim³) eigendecomposition; the limit is max_dim={self.max_dim}. "
                "Use curvature='cg', 'arnoldi' or 'ekfac', or restrict the parameters with modules=[...]")
        op = CurvatureOperator(ctx, self.kind, self.chunk, self.batch_size)
        self.device = op.device
        cache = None if ctx.folder is None else Path(ctx.folder) / f"explicit-{self.kind}.safetensors"
        params = {n: p.detach() for n, p in ctx.capture.params.items()}  # what the cache depends on
        key = [self.kind, state_fingerprint(params), ctx.train.fingerprint()]
        cached = load_tensors(cache, key)
        if cached is not None:
            self._finish(cached["eigenvalues"], cached["eigenvectors_t"].T, float(cached["trace"]))
            return
        matrix = np.empty((dim, dim), dtype=np.float64)
        for lo in range(0, dim, self.block):
            hi = min(lo + self.block, dim)
            unit = torch.zeros(hi - lo, dim, dtype=torch.float64, device=op.device)
            unit[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
            matrix[lo:hi] = op(unit).cpu().numpy()
        for lo in range(0, dim, self.block):  # symmetrise in place, block by block (no dim × dim copy)
            hi = min(lo + self.block, dim)
            sym = (matrix[lo:hi, :] + matrix[:, lo:hi].T) / 2
            matrix[lo:hi, :] = sym
            matrix[:, lo:hi] = sym.T
        self.trace = float(np.trace(matrix))
        # matrix.T is the same symmetric matrix in Fortran order: LAPACK works in place, with no copy
        values, vectors = scipy.linalg.eigh(matrix.T, overwrite_a=True, check_finite=False, driver="evr")
        del matrix
        values_t, vectors_t = torch.from_numpy(values), torch.from_numpy(vectors)
        if cache is not None:  # eigenvectors row-major as stored
            save_tensors(cache, {"eigenvalues": values_t, "eigenvectors_t": vectors_t.T,
                                 "trace": torch.tensor(self.trace, dtype=torch.float64)}, key)
        self._finish(values_t, vectors_t, self.trace)

    def _finish(self, values: torch.Tensor, vectors: torch.Tensor, trace: float) -> None:
        if self.clip:
            values = values.clamp_min(0.0)
        self.eigenvalues, self.eigenvectors = values, vectors  # columns are eigenvectors
        self.trace = trace
        self.mean_eigenvalue = trace / vectors.shape[0]
        self.lam = resolve_damping(self.damping, self.mean_eigenvalue, self.damping_factor)

    def with_damping(self, damping: float) -> ExplicitCurvature:
        """The same fitted curvature with another damping (no refit)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.lam = resolve_damping(damping, self.mean_eigenvalue)
        return other

    def matrix(self) -> torch.Tensor:
        """C itself, rebuilt from the eigendecomposition (dim × dim float64; for tests and small models)."""
        u = self.eigenvectors
        return (u * self.eigenvalues) @ u.T

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        shifted = self.eigenvalues + self.lam
        if float(shifted.abs().min()) <= 1e-12 * max(float(shifted.abs().max()), 1e-300):
            raise InvalidOptionError("C + λI is singular; pass a positive damping (or clip=True)")
        return self.apply_fn(vectors, lambda eig: 1.0 / (eig + self.lam))

    def apply_fn(self, vectors: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """f(C) v per row, for an elementwise function f of the eigenvalues (SOURCE's segment flows)."""
        u = self.eigenvectors
        out = ((vectors.double().cpu() @ u) * fn(self.eigenvalues)) @ u.T
        return out.to(device=vectors.device, dtype=vectors.dtype)

    def fit_average(self, contexts: Sequence[CurvatureContext], scale: dict[str, torch.Tensor] | None = None
                    ) -> None:
        """C averaged over several models (SOURCE's segment average), or with `scale` s ({parameter:
        tensor}) diag(s) C diag(s); eigendecomposed once, `scales` holding s flat per parameter."""
        total = None
        for ctx in contexts:
            one = copy.copy(self)  # the same options, fitted on one model
            one.fit(ctx)
            total = one.matrix() if total is None else total + one.matrix()
        assert total is not None
        total = total / len(contexts)
        self.scales = None
        if scale is not None:
            names = [n for n, _, _ in contexts[0].layout()]
            self.scales = {n: scale[n].detach().double().reshape(-1).cpu() for n in names}
            flat = torch.cat(list(self.scales.values()))
            total = flat[:, None] * total * flat[None, :]
        values, vectors = torch.linalg.eigh(total)
        self._finish(values, vectors, float(values.sum()))

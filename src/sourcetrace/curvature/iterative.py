"""Inverse curvature-vector products without forming the curvature: CG, LiSSA and Arnoldi (Lanczos).

All three need only products `C v` with the curvature C of the *mean* training loss, computed here with
torch.func over the training batches (streamed; kept in memory when small):

- Hessian: `H v = d/dε ∇L(θ + εv)`, forward-over-reverse (`jvp` of `grad`) (Pearlmutter 1994);
- Gauss-Newton: `G v = Jᵀ H_out J v` with J the Jacobian of the model outputs and H_out the Hessian of the
  loss in the outputs (`jvp`, then the output-space Hessian, then `vjp`) (Schraudolph 2002; Martens 2010).

Products for many vectors are batched with `vmap`. The solvers:

- `cg`: conjugate gradients on `(C + λI) x = v`, all query rows at once (Koh & Liang 2017, Martens 2010);
- `lissa`: the stochastic Neumann recursion `x ← v + (I - (C_b + λI)/s) x` on mini-batches, result `x/s`
  (Agarwal, Bullins & Hazan 2017), with s and the depth set from the top eigenvalue so that it converges;
- `arnoldi`: top-k eigenpairs of C by Lanczos with full reorthogonalisation, non-positive Ritz values
  dropped (Schioppa et al. 2022), then `(C + λI)⁻¹ ≈ U (Σ + λ)⁻¹ Uᵀ` plus a rule for the rest.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import InvalidOptionError, NonFiniteError
from ..grads.capture import call_with, evaluating
from ..tasks import OutputTask, has_outputs
from .base import CurvatureContext, Preconditioner, register_curvature
from .damping import hutchinson_trace, resolve_damping

KINDS = ("ggn", "hessian")
CACHE_BYTES = 256 * 2**20  # training batches up to this size stay in memory between passes


class CurvatureOperator:
    """`V ↦ V C` for rows V [k, dim] in the flat layout, C the Hessian or GGN of the mean training loss.

    `chunk`: vectors per vmapped call; `batch_size`: examples per product (default: the context's, at least
    512: per-call overhead of torch.func dominates small batches). Memory grows with chunk × batch_size.
    """

    def __init__(self, ctx: CurvatureContext, kind: str = "ggn", chunk: int = 32,
                 batch_size: int | None = None):
        if kind not in KINDS:
            raise InvalidOptionError(f"kind must be one of {KINDS} (got {kind!r})")
        self.model, self.task = ctx.model, ctx.task
        self.output_task: OutputTask | None = ctx.task if has_outputs(ctx.task) else None
        if kind == "ggn":
            self._ggn_task()  # refuse a task without outputs now rather than at the first product
        batch_size = max(ctx.batch_size, 512) if batch_size is None else int(batch_size)
        self.ctx = dataclasses.replace(ctx, batch_size=batch_size)
        self.kind, self.chunk = kind, int(chunk)
        self.params = {n: p.detach() for n, p in ctx.capture.params.items()}
        self.layout = ctx.layout()
        self.dim = int(ctx.capture.dim)
        self.n = len(ctx.train)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self._cache: list[tuple[int, Any, Any]] | None = None

    def _ggn_task(self) -> OutputTask:
        """The task, which the Gauss-Newton products need to have outputs and loss_from_outputs."""
        if self.output_task is None:
            raise InvalidOptionError(
                f"kind='ggn' needs the task to have outputs(model, batch) and loss_from_outputs(outputs, "
                f"batch); {type(self.task).__name__} has not: add them, or use kind='hessian'")
        return self.output_task

    # ---- data ----------------------------------------------------------------------------------------
    def batches(self) -> list[tuple[int, Any, Any]] | Iterator[tuple[int, Any, Any]]:
        """(batch size, batch, what products reuse) over the training data; kept when the data is small."""
        if self._cache is not None:
            return self._cache
        return self._first_pass()

    def _first_pass(self) -> Iterator[tuple[int, Any, Any]]:
        kept: list[tuple[int, Any, Any]] | None = []
        size = 0
        for batch in self.ctx.batches():
            leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
            b = int(leaves[0].shape[0])
            size += sum(t.numel() * t.element_size() for t in leaves)
            with evaluating(self.model):
                item = (b, batch, self._prepare(batch))
            if kept is not None:
                kept = kept + [item] if size <= CACHE_BYTES else None
            yield item
        if kept is not None:
            self._cache = kept

    def _prepare(self, batch: Any) -> Any:
        """For the GGN: the model outputs and the loss Hessian in the outputs, per example [B, K, K].

        The loss is a sum of per-example terms, so its Hessian in the outputs is block diagonal: K
        products with the unit vector e_c set for every example at once give all B blocks. Skipped (None)
        when the outputs are wide (an LM's vocabulary); the products then go through the loss each time.
        """
        if self.kind != "ggn":
            return None
        task = self._ggn_task()
        with torch.no_grad():
            out = call_with(self.model, self.params, task.outputs, batch)
        b, k = out.shape[0], out[0].numel()
        if k > 64:
            return None

        def out_loss(o: torch.Tensor) -> torch.Tensor:
            return task.loss_from_outputs(o, batch).sum()

        units = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, b, k).reshape(
            k, *out.shape)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            cols = vmap(lambda e: jvp(grad(out_loss), (out,), (e,))[1])(units)  # [K, B, ...]
        return cols.reshape(k, b, k).permute(1, 2, 0).contiguous()  # [B, K (row), K (column)]

    # ---- products ------------------------------------------------------------------------------------
    def _unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: v[sl].reshape(shape) for n, shape, sl in self.layout}

    def _flat(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([d[n].reshape(-1) for n, _, _ in self.layout])

    def batch_product(self, vectors: torch.Tensor, batch: Any, hout: Any = None) -> torch.Tensor:
        """Rows of `vectors` [k, dim] times the curvature of the mean loss over this one batch."""
        with evaluating(self.model):  # products also run after fitting (CG, LiSSA), maybe in train mode
            return self._batch_product(vectors, batch, hout)

    def _batch_product(self, vectors: torch.Tensor, batch: Any, hout: Any) -> torch.Tensor:
        model, task, params = self.model, self.task, self.params
        v = vectors.to(self.dtype)
        if self.kind == "hessian":
            def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
                return call_with(model, p, task.train_loss, batch).mean()

            def one(x: torch.Tensor) -> torch.Tensor:
                return self._flat(jvp(grad(loss), (params,), (self._unflat(x),))[1])
        else:
            out_task = self._ggn_task()

            def outputs(p: dict[str, torch.Tensor]) -> torch.Tensor:
                return call_with(model, p, out_task.outputs, batch)

            # torch annotates vjp's result as a union that covers has_aux=True; without aux it is a pair
            out, pullback = cast("tuple[torch.Tensor, Callable[..., Any]]", vjp(outputs, params))
            out = out.detach()
            b = out.shape[0]

            def out_loss(o: torch.Tensor) -> torch.Tensor:
                return out_task.loss_from_outputs(o, batch).mean()

            def one(x: torch.Tensor) -> torch.Tensor:
                jv = jvp(outputs, (params,), (self._unflat(x),))[1]  # J v
                if hout is None:
                    hjv = jvp(grad(out_loss), (out,), (jv,))[1]  # H_out J v
                else:
                    hjv = (hout @ jv.reshape(b, -1, 1)).reshape(jv.shape) / b
                return self._flat(pullback(hjv)[0])  # Jᵀ H_out J v

        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            # detached: parameters outside the selection still require grad, and nothing differentiates
            # this; attention's fused kernels have no forward-mode derivative, its math form has
            return vmap(one, chunk_size=self.chunk, randomness="same")(v).detach()

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """Rows of `vectors` [k, dim] times C (mean over all training batches), in float64."""
        out = torch.zeros(vectors.shape, dtype=torch.float64, device=vectors.device)
        for b, batch, hout in self.batches():
            out += self.batch_product(vectors, batch, hout).to(torch.float64) * (b / self.n)
        if not torch.isfinite(out).all():
            raise NonFiniteError("the curvature-vector product is NaN or infinite; check the model and data "
                                 "(e.g. a diverged checkpoint)")
        return out

def lanczos(op: CurvatureOperator, steps: int, seed: int = 0, tol: float = 1e-10
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values [m] (ascending) and vectors [m, dim] of C from `steps` Lanczos steps, float64.

    Full reorthogonalisation (twice, Gram-Schmidt) keeps the basis orthogonal; on breakdown (an invariant
    subspace found, e.g. repeated eigenvalues or a null space) it restarts from a fresh random vector
    orthogonal to the basis, so `steps = dim` recovers the whole spectrum.
    """
    dim = op.dim
    steps = min(int(steps), dim)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.zeros(steps, dim, dtype=torch.float64)
    alpha = torch.zeros(steps, dtype=torch.float64)
    beta = torch.zeros(steps, dtype=torch.float64)  # beta[j] couples basis j and j+1
    q = torch.randn(dim, generator=gen, dtype=torch.float64)
    q /= q.norm()
    scale = 0.0
    m = 0
    for j in range(steps):
        basis[j] = q
        w = op(q[None].to(op.device))[0].cpu()
        alpha[j] = w @ q
        w = w - alpha[j] * q - (beta[j - 1] * basis[j - 1] if j > 0 else 0)
        for _ in range(2):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        scale = max(scale, float(alpha[j].abs()), float(w.norm()))
        m = j + 1
        if j + 1 == steps:
            break
        b = float(w.norm())
        if b > tol * max(scale, 1e-300):
            beta[j] = b
            q = w / b
            continue
        beta[j] = 0.0  # invariant subspace: restart orthogonal to what is found
        for _ in range(3):
            q = torch.randn(dim, generator=gen, dtype=torch.float64)
            for _ in range(2):
                q -= basis[: j + 1].T @ (basis[: j + 1] @ q)
            if q.norm() > 1e-8:
                break
        q /= q.norm()
    tri = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    theta, s = torch.linalg.eigh(tri)
    return theta, s.T @ basis[:m]


class ProjectedOperator:
    """`V ↦ ((V Pᵀ) C) P`: the model's curvature seen in a random feature space (rows x ↦ x P)."""

    def __init__(self, op: CurvatureOperator, features: Any):
        self.op, self.features = op, features
        self.dim, self.device, self.n = features.dim, op.device, op.n

    def _project(self, rows: torch.Tensor) -> torch.Tensor:
        return self.features.projection(rows).to(torch.float64)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        return self._project(self.op(self.features.back(vectors.double())))

    def batches(self) -> Any:
        return self.op.batches()

    def batch_product(self, vectors: torch.Tensor, batch: Any, hout: Any = None) -> torch.Tensor:
        return self._project(self.op.batch_product(self.features.back(vectors.double()), batch, hout))


class Iterative(Preconditioner):
    """Shared fit of CG, LiSSA and Arnoldi: the curvature operator (in feature space for random features)
    and the damping (rule or override)."""

    FEATURES = ("identity", "random")

    def __init__(self, damping: float | None = None, damping_factor: float | None = None, kind: str = "ggn",
                 chunk: int = 32, batch_size: int | None = None, probes: int = 32):
        super().__init__(damping, damping_factor)
        if kind not in KINDS:
            raise InvalidOptionError(f"kind must be one of {KINDS} (got {kind!r})")
        self.kind, self.chunk, self.probes, self.batch_size = kind, chunk, probes, batch_size

    def _operator(self, ctx: CurvatureContext) -> Any:
        op = CurvatureOperator(ctx, self.kind, self.chunk, self.batch_size)
        return op if ctx.feature_kind() == "identity" else ProjectedOperator(op, ctx.features)

    def _trace(self, ctx: CurvatureContext) -> float:
        """tr(C) by Hutchinson's estimator over `probes` Rademacher vectors."""
        return hutchinson_trace(self.op, self.op.dim, probes=self.probes, seed=ctx.seed)

    def _fit_operator(self, ctx: CurvatureContext) -> None:
        self.op = self._operator(ctx)
        self.mean_eigenvalue = None if self.damping is not None else self._trace(ctx) / self.op.dim
        self.lam = resolve_damping(self.damping, self.mean_eigenvalue, self.damping_factor)


@register_curvature("cg")
class ConjugateGradient(Iterative):
    """`(C + λI)⁻¹ v` by conjugate gradients, every query row at once (one batched product per step).

    Options: kind ("ggn" | "hessian"), tol (relative residual ‖r‖/‖v‖ at which a row stops, 1e-5),
    max_iter (500), damping / damping_factor (see `damping.py`).
    """

    def __init__(self, damping: float | None = None, tol: float = 1e-5, max_iter: int = 500, **common: Any):
        super().__init__(damping, **common)
        if tol <= 0 or max_iter < 1:
            raise InvalidOptionError("cg needs tol > 0 and max_iter >= 1")
        self.tol, self.max_iter = float(tol), int(max_iter)

    def fit(self, ctx: CurvatureContext) -> None:
        self._fit_operator(ctx)
        if self.lam == 0 and self.kind == "ggn":
            warnings.warn("cg with damping=0 on a rank-deficient GGN may not converge", stacklevel=2)

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        v = vectors.to(torch.float64)
        x = torch.zeros_like(v)
        r = v.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        target = self.tol * v.norm(dim=1)
        active = rs.sqrt() > target
        self.iterations = 0
        for _ in range(self.max_iter):
            if not active.any():
                break
            idx = active.nonzero().squeeze(1)
            ap = self.op(p[idx]) + self.lam * p[idx]
            curv = (p[idx] * ap).sum(1)
            bad = curv <= 0
            if bad.any():  # C + λI is not positive definite along p: stop those rows
                warnings.warn("cg met non-positive curvature (an indefinite Hessian); use kind='ggn' or a "
                              "larger damping", stacklevel=2)
                active[idx[bad]] = False
                keep = ~bad
                idx, ap, curv = idx[keep], ap[keep], curv[keep]
            a = rs[idx] / curv
            x[idx] += a[:, None] * p[idx]
            r[idx] -= a[:, None] * ap
            new = (r[idx] * r[idx]).sum(1)
            p[idx] = r[idx] + (new / rs[idx])[:, None] * p[idx]
            rs[idx] = new
            active[idx] = new.sqrt() > target[idx]
            self.iterations += 1
        if active.any():
            warnings.warn(f"cg did not reach tol={self.tol} for {int(active.sum())} rows in {self.max_iter} "
                          "iterations; raise max_iter or the damping", stacklevel=2)
        return x.to(vectors.dtype)


@register_curvature("lissa")
class LiSSA(Iterative):
    """`(C + λI)⁻¹ v` by the LiSSA recursion `x ← v + (I - (C_b + λI)/s) x`, `x/s` at the end.

    C_b is the curvature of one training mini-batch (batches drawn in a shuffled cycle). Defaults that
    converge: scale s = 1.05 (λ_max + λ) with λ_max from a short Lanczos run (the recursion contracts when
    s exceeds the top eigenvalue); depth = ⌈ln(1/tol) · s/λ⌉ (the slowest direction contracts by 1 - λ/s
    per step), capped at max_depth. Options: kind, scale, depth, tol (1e-3), max_depth (5000), damping.
    """

    def __init__(self, damping: float | None = None, scale: float | None = None, depth: int | None = None,
                 tol: float = 1e-3, max_depth: int = 5000, **common: Any):
        super().__init__(damping, **common)
        self.scale, self.depth, self.tol, self.max_depth = scale, depth, float(tol), int(max_depth)

    def fit(self, ctx: CurvatureContext) -> None:
        self._fit_operator(ctx)
        if self.scale is None:
            top = float(lanczos(self.op, 30, seed=ctx.seed)[0][-1])
            self.s = 1.05 * (max(top, 0.0) + self.lam)
        else:
            self.s = float(self.scale)
        if self.depth is None:
            if self.lam <= 0:
                raise InvalidOptionError("lissa needs a positive damping to converge (got 0)")
            need = math.ceil(math.log(1 / self.tol) * self.s / self.lam)
            if need > self.max_depth:
                warnings.warn(f"lissa needs about {need} steps to reach tol={self.tol} at damping "
                              f"{self.lam:.3g}; stopping at max_depth={self.max_depth} (truncated)",
                              stacklevel=2)
            self.steps = min(need, self.max_depth)
        else:
            self.steps = int(self.depth)
        self.seed = ctx.seed

    def _cycle(self) -> Iterator[Any]:
        """Mini-batches in a shuffled cycle, the same sequence on every call: a row's result does not
        depend on the rows it is solved with."""
        batches = list(self.op.batches())
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            for i in torch.randperm(len(batches), generator=gen).tolist():
                yield batches[i][1:]

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        v = vectors.to(torch.float64)
        x = v.clone()
        if len(list(self.op.batches())) == 1:  # one batch: the deterministic Richardson iteration
            first = next(iter(self.op.batches()))[1:]
            cycle: Iterator[Any] = iter(lambda: first, None)
        else:
            cycle = self._cycle()
        for _ in range(self.steps):
            cx = self.op.batch_product(x, *next(cycle)).to(torch.float64)
            x = v + x - (cx + self.lam * x) / self.s
            if not torch.isfinite(x).all():
                raise NonFiniteError("lissa diverged; pass a larger scale (it must exceed the top "
                                     "eigenvalue of the curvature plus the damping)")
        return (x / self.s).to(vectors.dtype)


@register_curvature("arnoldi")
class Arnoldi(Iterative):
    """`(C + λI)⁻¹` on the top eigenpairs of C found by Lanczos (Arnoldi for a symmetric C).

    Ritz values ≤ `min_eigenvalue` × the largest are dropped (spurious or negative curvature). On the
    rest of the space, `residual` says what to assume: "zero" (default; eigenvalue 0, i.e. 1/λ: exact when
    the rank covers C's support; digits-mlp rank 100: LDS 0.759), "drop" (no contribution, as Schioppa et
    al. 2022 and captum/dattri; 0.740) or "mean" (the mean remaining eigenvalue, from the trace).
    Options: kind, rank (100), iterations (2 × rank), residual, min_eigenvalue (1e-10), damping.
    """

    def __init__(self, damping: float | None = None, rank: int = 100, iterations: int | None = None,
                 residual: str = "zero", min_eigenvalue: float = 1e-10, **common: Any):
        super().__init__(damping, **common)
        if rank < 1:
            raise InvalidOptionError("rank must be at least 1")
        if residual not in ("drop", "zero", "mean"):
            raise InvalidOptionError("residual must be 'drop', 'zero' or 'mean'")
        self.rank, self.iterations, self.residual = int(rank), iterations, residual
        self.min_eigenvalue = float(min_eigenvalue)

    def fit(self, ctx: CurvatureContext) -> None:
        self.op = self._operator(ctx)
        steps = self.iterations if self.iterations is not None else 2 * self.rank
        theta, vecs = lanczos(self.op, max(steps, self.rank), seed=ctx.seed)
        top = float(theta.max()) if theta.numel() else 0.0
        keep = theta > self.min_eigenvalue * max(top, 0.0)
        keep &= torch.arange(len(theta)) >= len(theta) - self.rank  # the top `rank` (ascending order)
        self.dropped = int((theta <= self.min_eigenvalue * max(top, 0.0)).sum())
        self.eigenvalues, self.eigenvectors = theta[keep], vecs[keep]
        need_trace = self.damping is None or self.residual == "mean"
        trace = self._trace(ctx) if need_trace else None
        self.mean_eigenvalue = None if trace is None else trace / self.op.dim
        self.lam = resolve_damping(self.damping, self.mean_eigenvalue, self.damping_factor)
        rest = self.op.dim - len(self.eigenvalues)
        if self.residual == "mean" and rest > 0 and trace is not None:
            self.rest_eigenvalue = max((trace - float(self.eigenvalues.sum())) / rest, 0.0)
        else:
            self.rest_eigenvalue = 0.0

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        v = vectors.to(torch.float64).cpu()
        u = self.eigenvectors
        coef = v @ u.T
        out = (coef / (self.eigenvalues + self.lam)) @ u
        if self.residual != "drop":
            if self.lam + self.rest_eigenvalue <= 0:
                raise InvalidOptionError("residual='zero' needs a positive damping")
            out += (v - coef @ u) / (self.rest_eigenvalue + self.lam)
        return out.to(device=vectors.device, dtype=vectors.dtype)

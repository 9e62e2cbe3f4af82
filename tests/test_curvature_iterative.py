"""CG, LiSSA and Arnoldi against the explicit curvature on a small MLP in float64."""

import pytest
import torch
from torch import nn

from sourcetrace import ClassificationTask
from sourcetrace.curvature.base import CURVATURES, CurvatureContext
from sourcetrace.curvature.damping import DEFAULT_FACTOR
from sourcetrace.curvature.explicit import ExplicitCurvature
from sourcetrace.curvature.iterative import CurvatureOperator, LiSSA, lanczos
from sourcetrace.data import Examples
from sourcetrace.grads import GradientCapture


def setup(n=40, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    ctx = CurvatureContext(model, ClassificationTask(), GradientCapture(model), Examples((x, y)),
                           batch_size=16, progress=False)
    return model, ctx


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def fitted():
    model, ctx = setup()
    explicit = ExplicitCurvature(damping=0.05, kind="ggn")
    explicit.fit(ctx)
    vectors = torch.randn(4, ctx.capture.dim, dtype=torch.float64)
    return ctx, explicit, vectors, explicit.apply(vectors)


def test_operator_batches_add_up_to_the_mean():
    _, ctx = setup()
    v = torch.randn(2, ctx.capture.dim, dtype=torch.float64)
    small = CurvatureOperator(ctx, "ggn", batch_size=7)(v)
    whole = CurvatureOperator(ctx, "ggn", batch_size=40)(v)
    torch.testing.assert_close(small, whole, atol=1e-13, rtol=1e-10)


def test_cg_agrees_with_explicit(fitted):
    ctx, _, vectors, want = fitted
    cg = CURVATURES["cg"](damping=0.05, tol=1e-10)
    cg.fit(ctx)
    assert rel(cg.apply(vectors), want) < 1e-6
    assert cg.iterations <= ctx.capture.dim + 5


def test_lissa_agrees_with_explicit(fitted):
    # one batch holds all 40 examples, so the recursion is deterministic and its fixed point exact
    ctx, explicit, vectors, _ = fitted
    want = explicit.with_damping(0.2).apply(vectors)
    lissa = LiSSA(damping=0.2, tol=1e-5, batch_size=40)
    lissa.fit(ctx)
    assert lissa.s > float(explicit.eigenvalues.max())  # the default scale makes it contract
    assert rel(lissa.apply(vectors), want) < 1e-3


def test_lissa_on_mini_batches_is_close(fitted):
    ctx, explicit, vectors, _ = fitted
    want = explicit.with_damping(0.2).apply(vectors)
    lissa = LiSSA(damping=0.2, tol=1e-2, batch_size=20)
    lissa.fit(ctx)
    assert rel(lissa.apply(vectors), want) < 0.2  # the stochastic recursion's own noise


def test_arnoldi_full_rank_agrees_with_explicit(fitted):
    ctx, explicit, vectors, want = fitted
    dim = ctx.capture.dim
    arnoldi = CURVATURES["arnoldi"](damping=0.05, rank=dim, residual="zero")
    arnoldi.fit(ctx)
    assert rel(arnoldi.apply(vectors), want) < 1e-3
    top = explicit.eigenvalues.flip(0)[:5]
    torch.testing.assert_close(arnoldi.eigenvalues.flip(0)[:5], top, rtol=1e-8, atol=1e-12)


def test_arnoldi_low_rank_finds_the_top_eigenvalues(fitted):
    ctx, explicit, _, _ = fitted
    arnoldi = CURVATURES["arnoldi"](damping=0.05, rank=5, iterations=40)
    arnoldi.fit(ctx)
    assert len(arnoldi.eigenvalues) == 5
    torch.testing.assert_close(arnoldi.eigenvalues, explicit.eigenvalues[-5:], rtol=1e-6, atol=1e-10)


def test_arnoldi_drops_non_positive_ritz_values():
    model, ctx = setup(seed=1)  # at initialisation the Hessian is indefinite
    exact = ExplicitCurvature(damping=0.05, kind="hessian", clip=False)
    exact.fit(ctx)
    top = float(exact.eigenvalues.max())
    assert float(exact.eigenvalues.min()) < -1e-3 * top
    arnoldi = CURVATURES["arnoldi"](damping=0.05, kind="hessian", rank=ctx.capture.dim, residual="zero")
    arnoldi.fit(ctx)
    assert (arnoldi.eigenvalues > 0).all()
    assert arnoldi.dropped >= int((exact.eigenvalues < 0).sum())
    assert len(arnoldi.eigenvalues) == int((exact.eigenvalues > 1e-10 * top).sum())
    # equal to the explicit Hessian with negative curvature clipped to 0
    u, clipped = exact.eigenvectors, exact.eigenvalues.clamp_min(0)
    v = torch.randn(3, ctx.capture.dim, dtype=torch.float64)
    assert rel(arnoldi.apply(v), ((v @ u) / (clipped + 0.05)) @ u.T) < 1e-6


def test_lanczos_restarts_on_repeated_eigenvalues():
    class Diagonal:  # C = diag(1, 1, 1, 2, 2, 3, 0, 0): an invariant subspace after three steps
        dim, device = 8, torch.device("cpu")

        def __call__(self, v):
            return v * torch.tensor([1, 1, 1, 2, 2, 3, 0, 0], dtype=torch.float64)

    theta, vecs = lanczos(Diagonal(), 8)
    torch.testing.assert_close(theta, torch.tensor([0, 0, 1, 1, 1, 2, 2, 3], dtype=torch.float64),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)


def test_default_damping_from_the_trace_estimate(fitted):
    ctx, explicit, vectors, _ = fitted
    mean = float(torch.trace(explicit.matrix())) / ctx.capture.dim
    cg = CURVATURES["cg"](tol=1e-8)
    cg.fit(ctx)
    assert cg.lam == pytest.approx(DEFAULT_FACTOR * mean, rel=0.3)  # Hutchinson, 32 probes
    out = cg.apply(vectors)
    assert torch.isfinite(out).all()
    assert rel(out, explicit.with_damping(cg.lam).apply(vectors)) < 1e-5

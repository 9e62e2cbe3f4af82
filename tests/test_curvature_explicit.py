"""Explicit curvature against independent computations: ridge regression's closed form, autograd Hessians."""

import numpy as np
import pytest
import torch
from torch import nn

from sourcetrace import ClassificationTask, RegressionTask
from sourcetrace.curvature.base import CURVATURES, CurvatureContext
from sourcetrace.curvature.damping import DEFAULT_FACTOR, resolve_damping
from sourcetrace.curvature.explicit import ExplicitCurvature
from sourcetrace.data import Examples
from sourcetrace.errors import InvalidOptionError
from sourcetrace.grads import GradientCapture


def context(model, task, x, y, batch_size=16):
    return CurvatureContext(model, task, GradientCapture(model), Examples((x, y)), batch_size=batch_size,
                            progress=False)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def functional(model):
    """θ (flat) -> model output, for torch.autograd.functional."""
    shapes = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]

    def call(theta, x):
        params, i = {}, 0
        for n, shape, k in shapes:
            params[n] = theta[i: i + k].reshape(shape)
            i += k
        return torch.func.functional_call(model, params, (x,))

    return call


def mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_registered():
    assert CURVATURES["explicit"] is ExplicitCurvature


def test_ridge_influence_equals_closed_form_leave_one_out():
    """score(q, i) = -∇m_q (H + λI)⁻¹ ∇ℓ_i equals N × the first-order change of m_q when i is left out."""
    rng = np.random.default_rng(0)
    n, d, lam = 60, 4, 0.3
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.5 + 0.3 * rng.normal(size=n)
    xq, yq = rng.normal(size=(5, d)), rng.normal(size=5)
    a = np.hstack([x, np.ones((n, 1))])  # bias as a column of ones
    aq = np.hstack([xq, np.ones((5, 1))])

    def ridge(rows, targets):  # argmin (1/N) Σ ½(aθ - y)² + (λ/2)‖θ‖², with the full set's 1/N
        return np.linalg.solve(rows.T @ rows / n + lam * np.eye(d + 1), rows.T @ targets / n)

    theta = ridge(a, y)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(theta[:d])[None])
        model.bias.copy_(torch.tensor(theta[d:]))
    task = RegressionTask()
    ctx = context(model, task, torch.tensor(x), torch.tensor(y)[:, None])
    curv = ExplicitCurvature(damping=lam, kind="hessian")
    curv.fit(ctx)
    np.testing.assert_allclose(curv.matrix().numpy(), a.T @ a / n, atol=1e-12)

    g = torch.tensor((a @ theta - y)[:, None] * a)  # ∇ℓ_i, parameters in (weight, bias) order
    q = torch.tensor(-(aq @ theta - yq)[:, None] * aq)  # ∇m_q, m = -½(f - y)²
    scores = -(curv.apply(q) @ g.T).numpy()

    def measure(th):
        return -0.5 * (aq @ th - yq) ** 2

    # leaving i out moves θ by Δθ_i = (1/N)(H + λI)⁻¹∇ℓ_i to first order; m moves by ∇m·Δθ_i
    h = a.T @ a / n + lam * np.eye(d + 1)
    shift = np.linalg.solve(h, g.numpy().T) / n  # [d+1, n]
    first_order = -(q.numpy() @ shift)  # m_full - m_without_i, first order in 1/N
    np.testing.assert_allclose(scores, n * first_order, rtol=1e-8, atol=1e-12)
    # ... and close to the exact leave-one-out change (the difference is second order in 1/N)
    exact = np.stack([measure(theta) - measure(ridge(np.delete(a, i, 0), np.delete(y, i)))
                      for i in range(n)], axis=1)
    assert np.corrcoef(scores.ravel(), exact.ravel())[0, 1] > 0.99


def test_ridge_first_order_derivative_is_exact():
    """The first-order term as a finite difference in the example's weight, not the same formula twice."""
    rng = np.random.default_rng(1)
    n, d, lam = 30, 3, 0.1
    x = rng.normal(size=(n, d))
    y = rng.normal(size=n)
    model = nn.Linear(d, 1, bias=False).double()
    theta = np.linalg.solve(x.T @ x / n + lam * np.eye(d), x.T @ y / n)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(theta)[None])
    curv = ExplicitCurvature(damping=lam, kind="hessian")
    curv.fit(context(model, RegressionTask(), torch.tensor(x), torch.tensor(y)[:, None]))
    xq, yq = rng.normal(size=d), 0.7
    q = torch.tensor(-(xq @ theta - yq) * xq)[None]
    i, eps = 3, 1e-6
    w = np.ones(n)
    w[i] -= eps  # down-weight example i by eps (in units of 1/N)
    th_eps = np.linalg.solve((x * w[:, None]).T @ x / n + lam * np.eye(d), (x * w[:, None]).T @ y / n)
    m = -0.5 * (xq @ theta - yq) ** 2
    m_eps = -0.5 * (xq @ th_eps - yq) ** 2
    g = torch.tensor((x[i] @ theta - y[i]) * x[i])
    score = float(-(curv.apply(q) @ g))
    assert score == pytest.approx(n * (m - m_eps) / eps, rel=1e-4)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_matrix_matches_autograd(kind):
    model = mlp()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    task = ClassificationTask()
    curv = ExplicitCurvature(damping=0.1, kind=kind, clip=False, block=16)
    curv.fit(context(model, task, x, y, batch_size=7))
    theta, call = flat_params(model), functional(model)
    if kind == "hessian":
        want = torch.autograd.functional.hessian(lambda t: task.loss_from_outputs(call(t, x), (x, y)).mean(),
                                                 theta)
    else:
        jac = torch.autograd.functional.jacobian(lambda t: call(t, x), theta)  # [N, C, dim]
        p = torch.softmax(call(theta, x), 1).detach()
        h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # softmax cross-entropy Hessian
        want = torch.einsum("nci,ncd,ndj->ij", jac, h_out, jac) / len(x)
    torch.testing.assert_close(curv.matrix(), want, atol=1e-12, rtol=1e-9)
    v = torch.randn(3, want.shape[0], dtype=torch.float64)
    want_apply = torch.linalg.solve(want + 0.1 * torch.eye(want.shape[0], dtype=torch.float64), v.T).T
    torch.testing.assert_close(curv.apply(v), want_apply, atol=1e-10, rtol=1e-8)


def test_default_damping_is_the_documented_rule_and_well_conditioned():
    model = mlp()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    curv = ExplicitCurvature()
    curv.fit(context(model, ClassificationTask(), x, y))
    dim = curv.eigenvalues.numel()
    mean = float(torch.trace(curv.matrix())) / dim
    assert curv.lam == pytest.approx(DEFAULT_FACTOR * mean, rel=1e-9)
    # λ_max ≤ tr(C) = dim · mean, so the condition number is at most 1 + dim / factor
    cond = float(curv.eigenvalues.max() + curv.lam) / curv.lam
    assert cond <= 1 + dim / DEFAULT_FACTOR
    out = curv.apply(torch.randn(4, dim, dtype=torch.float64))
    assert torch.isfinite(out).all()
    # the rule is scale-free: scaling the loss scales λ, so scores only scale
    assert resolve_damping(None, 10 * mean) == pytest.approx(10 * curv.lam)
    assert curv.with_damping(0.5).lam == 0.5
    with pytest.raises(InvalidOptionError):
        resolve_damping(-1.0, mean)


def test_refuses_a_large_model():
    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 2))
    ctx = context(model, ClassificationTask(), torch.randn(4, 200), torch.randint(0, 2, (4,)))
    with pytest.raises(InvalidOptionError, match="cg"):
        ExplicitCurvature().fit(ctx)


def test_ggn_needs_task_outputs():
    class Plain:
        def train_loss(self, model, batch):
            return (model(batch[0]).squeeze(1) - batch[1]) ** 2

        def measurement(self, model, batch):
            return -self.train_loss(model, batch)

    model = nn.Linear(3, 1).double()
    ctx = context(model, Plain(), torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    with pytest.raises(InvalidOptionError, match="hessian"):
        ExplicitCurvature(kind="ggn").fit(ctx)
    curv = ExplicitCurvature(kind="hessian", damping=0.0)
    curv.fit(ctx)
    a = torch.cat([ctx.train.items.tensors[0], torch.ones(8, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(curv.matrix(), 2 * a.T @ a / 8)  # Hessian of the mean of (aθ - y)²


def test_eigendecomposition_is_cached_per_model_and_data(tmp_path):
    model = mlp()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    ctx = context(model, ClassificationTask(), x, y)
    ctx.folder = tmp_path
    first = ExplicitCurvature(damping=0.1)
    first.fit(ctx)
    assert (tmp_path / "explicit-ggn.safetensors").exists()
    again = ExplicitCurvature(damping=0.1)
    again.fit(ctx)
    torch.testing.assert_close(again.matrix(), first.matrix(), atol=0, rtol=0)
    with torch.no_grad():
        model[0].weight.add_(0.1)  # another model: the cache is not reused
    other = ExplicitCurvature(damping=0.1)
    other.fit(ctx)
    assert not torch.allclose(other.matrix(), first.matrix())


def test_ggn_of_a_causal_lm_equals_brute_force():
    """GGN of tiny GPT-2's completion loss: mean over examples of Jᵀ (diag p − p pᵀ) J, built from the logits'
    Jacobian by autograd, summed over the completion positions."""
    from models import lm_examples, tiny_gpt2
    from sourcetrace.curvature.base import CurvatureContext
    from sourcetrace.curvature.explicit import ExplicitCurvature
    from sourcetrace.data import Examples
    from sourcetrace.grads import GradientCapture
    from sourcetrace.tasks import CausalLMTask

    model = tiny_gpt2(vocab_size=12, dtype=torch.float64)
    task = CausalLMTask()
    train = Examples(lm_examples(3, prompt=2, completion=2, vocab_size=12))
    capture = GradientCapture(model, modules=["lm_head", "transformer.h.0.mlp.c_proj"])
    params = dict(capture.params)
    curv = ExplicitCurvature(kind="ggn", damping=0.0)
    curv.fit(CurvatureContext(model, task, capture, train, batch_size=8))
    got = curv.matrix()

    names = list(params)
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def logits_of(theta, batch):
        chunks = dict(zip(names, [c.reshape(params[n].shape) for c, n in zip(theta.split(sizes), names)]))
        return torch.func.functional_call(model, chunks, args=(), kwargs={"input_ids": batch["input_ids"],
                                          "attention_mask": batch["attention_mask"]}).logits

    want = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    for i in range(len(train)):
        batch = task.collate([train[i]])
        jac = torch.autograd.functional.jacobian(lambda t, b=batch: logits_of(t, b), flat)  # [1, T, V, P]
        logits = logits_of(flat, batch)[0]
        keep = batch["labels"][0, 1:] != -100
        for t in torch.nonzero(keep).flatten().tolist():  # position t predicts token t+1
            p = torch.softmax(logits[t], -1)
            h = torch.diag(p) - torch.outer(p, p)
            j = jac[0, t]
            want += j.T @ h @ j
    want /= len(train)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-10)

"""TRAK against its formula computed by hand (float64, per-example autograd)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sourcetrace as st
from models import lm_examples, tiny_gpt2
from sourcetrace.errors import InvalidOptionError
from sourcetrace.grads.projection import RandomProjection


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _margin(model, x, y):
    logits = model(x)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, 1)


def _grads(model, x, y, what):
    """Per-example gradients of the margin, or of the cross-entropy loss, one backward each, [n, dim]."""
    rows = []
    for i in range(len(y)):
        logits = model(x[i: i + 1])[0]
        if what == "margin":
            others = torch.cat([logits[: y[i]], logits[y[i] + 1:]])
            value = logits[y[i]] - torch.logsumexp(others, 0)
        else:
            value = F.cross_entropy(logits[None], y[i: i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))]))
    return torch.stack(rows)


def test_trak_without_projection_equals_the_explicit_formula():
    x, y = _data(12, 0)
    xq, yq = _data(3, 1)
    models = [_model(0), _model(1)]
    states = [m.state_dict() for m in models]
    dim = sum(p.numel() for p in models[0].parameters())
    lam = 0.7
    # damping is λ on the mean-loss curvature, ΦᵀRΦ/n + λI, for every method: λ/n here is λ on ΦᵀRΦ
    attr = st.Attributor(models[0], st.ClassificationTask(), "trak", checkpoints=states, projection="none",
                         damping=lam / len(y), out_to_loss="per-model", store_dtype="float64", progress=False)
    got = attr.fit((x, y)).score((xq, yq))
    # by hand, from the sign convention: score = mean_c -∇m_c(q)ᵀ (Φ_cᵀ R_c Φ_c + λI)⁻¹ ∇L_c(i), with the
    # Gauss-Newton weights R = ∂²L/∂f² of the cross-entropy in the margin, computed by double autograd
    expected = torch.zeros(3, 12, dtype=torch.float64)
    si = torch.zeros(12, dtype=torch.float64)
    for m in models:
        phi = _grads(m, x, y, "margin")
        r = []
        for i in range(len(y)):  # L as a function of the margin f: log(1 + e^{-f})
            f = torch.tensor(float(_margin(m, x[i: i + 1], y[i: i + 1]).detach()), dtype=torch.float64,
                             requires_grad=True)
            (d1,) = torch.autograd.grad(F.softplus(-f), f, create_graph=True)
            r.append(torch.autograd.grad(d1, f)[0])
        inverse = torch.linalg.inv(phi.T @ torch.diag(torch.stack(r)) @ phi
                                   + lam * torch.eye(dim, dtype=torch.float64))
        loss_grads = _grads(m, x, y, "loss")
        expected += -_grads(m, xq, yq, "margin") @ inverse @ loss_grads.T / len(models)
        si += ((loss_grads @ inverse) * loss_grads).sum(1) / len(models)  # mean_c ∇L_iᵀ M_c ∇L_i
    assert torch.allclose(got.matrix, expected, rtol=1e-8, atol=1e-10)
    assert got.self_influence is None  # n solves: on demand only
    assert torch.allclose(attr.self_influence(), si, rtol=1e-8)


def test_trak_mean_out_to_loss_and_default_damping_rule():
    x, y = _data(10, 2)
    xq, yq = _data(2, 3)
    models = [_model(2), _model(3)]
    states = [m.state_dict() for m in models]
    dim = sum(p.numel() for p in models[0].parameters())
    attr = st.Attributor(models[0], st.ClassificationTask(), "trak", checkpoints=states, projection="none",
                         curvature="covariance", out_to_loss="mean", store_dtype="float64", progress=False)
    got = attr.fit((x, y)).score((xq, yq)).matrix
    # TRAK's eq. 12: Q averaged over models, Q_i = 1 - p_i; λ = factor · tr(ΦᵀΦ)/n per model
    qbar = torch.stack([1 - torch.softmax(m(x), 1).gather(1, y[:, None])[:, 0] for m in models]).mean(0)
    expected = torch.zeros(2, 10, dtype=torch.float64)
    for m in models:
        phi = _grads(m, x, y, "margin")
        lam = attr.method.options.damping_factor * torch.trace(phi.T @ phi) / len(y)
        inverse = torch.linalg.inv(phi.T @ phi + lam * torch.eye(dim, dtype=torch.float64))
        expected += _grads(m, xq, yq, "margin") @ inverse @ phi.T / len(models)
    assert torch.allclose(got, expected * qbar, rtol=1e-8, atol=1e-10)


def test_trak_projects_with_the_seeded_matrix_and_stays_finite_when_wider_than_the_data():
    x, y = _data(8, 4)
    xq, yq = _data(2, 5)
    model = _model(4)
    dim = sum(p.numel() for p in model.parameters())
    k = 20  # wider than the 8 training examples: ΦᵀΦ is singular, the damping keeps it invertible
    attr = st.Attributor(model, st.ClassificationTask(), "trak", proj_dim=k, store_dtype="float64",
                         seed=7, progress=False)
    got = attr.fit((x, y)).score((xq, yq)).matrix
    p = RandomProjection(dim, k, "gaussian", seed=7).matrix(dtype=torch.float64)
    phi = _grads(model, x, y, "margin") @ p
    q = 1 - torch.softmax(model(x), 1).gather(1, y[:, None])[:, 0]
    gn = phi.T @ torch.diag(q * (1 - q)) @ phi
    lam = attr.method.options.damping_factor * torch.trace(gn) / len(y)
    expected = _grads(model, xq, yq, "margin") @ p @ torch.linalg.inv(
        gn + lam * torch.eye(k, dtype=torch.float64)) @ phi.T * q
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-10)


def test_trak_options_are_checked():
    with pytest.raises(InvalidOptionError):
        st.Attributor(_model(0), st.ClassificationTask(), "trak", projection="sparse")
    with pytest.raises(InvalidOptionError):
        st.Attributor(_model(0), st.ClassificationTask(), "trak", checkpoints=[_model(0).state_dict()],
                      learning_rates=[0.1])


def test_trak_runs_on_tiny_gpt2():
    model = tiny_gpt2()
    train = lm_examples(6)
    for method, options in (("trak", {"proj_dim": 64}),):
        scores = st.Attributor(model, st.CausalLMTask(), method, progress=False, **options).fit(train)
        matrix = scores.score(train[:2]).matrix
        assert matrix.shape == (2, 6) and torch.isfinite(matrix).all()
        assert (matrix.argmax(1) == torch.arange(2)).all()  # each example is its own top proponent

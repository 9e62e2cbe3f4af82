"""Compositions of the four parts against brute force with explicit matrices (float64), and the errors of
compositions and options that cannot work (raised when the Attributor is built, before any pass)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sourcetrace as st
from sourcetrace.errors import InvalidOptionError, ShapeError
from sourcetrace.grads.projection import RandomProjection

N, NQ = 14, 3


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N + NQ, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (N + NQ,), generator=gen)
    return model, (x[:N], y[:N]), (x[N:], y[N:])


def _margin(logits, y):
    others = logits.scatter(1, y[:, None], float("-inf"))
    return logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, 1)


def _layer_grads(model, x, y, what):
    """Per example and layer: the gradient matrix [W | b] of the loss or the margin, and the layer input."""
    out = []
    for i in range(len(y)):
        h = model[1](model[0](x[i: i + 1]))
        logits = model[2](h)
        value = F.cross_entropy(logits, y[i: i + 1]) if what == "loss" else _margin(logits, y[i: i + 1])[0]
        params = [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
        gw0, gb0, gw2, gb2 = torch.autograd.grad(value, params)
        one = torch.ones(1, dtype=x.dtype)
        out.append({"0": (torch.cat([gw0, gb0[:, None]], 1), torch.cat([x[i], one])),
                    "2": (torch.cat([gw2, gb2[:, None]], 1), torch.cat([h[0].detach(), one]))})
    return out


def _ekfac_in_projected_space(model, train, kron, lam):
    """Per layer: the projections and the explicit EK-FAC matrix in Kronecker-projected space, from
    per-example gradients: Â = P_aᵀ E[a aᵀ] P_a, Ŝ = P_gᵀ E[g gᵀ] P_g, Λ = E[(Q_Sᵀ Ĝ Q_A)²] (empirical
    Fisher)."""
    rows = _layer_grads(model, *train, "loss")
    out = {}
    for layer in ("0", "2"):
        p_g, p_a = kron.side_matrix(f"{layer}.weight", 0), kron.side_matrix(f"{layer}.weight", 1)
        grads = torch.stack([r[layer][0] for r in rows])
        acts = torch.stack([r[layer][1] for r in rows])
        a_hat = p_a.T @ (acts.T @ acts / N) @ p_a
        s_hat = p_g.T @ (grads[:, :, -1].T @ grads[:, :, -1] / N) @ p_g  # bias gradient = output gradient
        qa, qs = torch.linalg.eigh(a_hat)[1], torch.linalg.eigh(s_hat)[1]
        lam_ = ((qs.T @ (p_g.T @ grads @ p_a) @ qa) ** 2).mean(0)
        basis = torch.kron(qs, qa)
        out[layer] = (p_g, p_a, basis @ torch.diag(lam_.reshape(-1) + lam) @ basis.T)
    return out


def _projected(rows, layer, p_g, p_a):
    return torch.stack([(p_g.T @ r[layer][0] @ p_a).reshape(-1) for r in rows])


def test_ekfac_on_kronecker_projected_features_equals_the_explicit_composition():
    model, train, queries = _setup()
    attr = st.Attributor(model, st.ClassificationTask(), "logra", curvature="ekfac", rank=3, damping=1e-3,
                         curvature_options={"fisher": "empirical"}, store_dtype="float64", progress=False)
    got = attr.fit(train).score(queries).matrix
    blocks = _ekfac_in_projected_space(model, train, attr.method.bound[0], 1e-3)
    g_rows, q_rows = _layer_grads(model, *train, "loss"), _layer_grads(model, *queries, "margin")
    want = sum(-_projected(q_rows, layer, p_g, p_a)
               @ torch.linalg.solve(m, _projected(g_rows, layer, p_g, p_a).T)
               for layer, (p_g, p_a, m) in blocks.items())
    assert blocks["0"][2].shape == (9, 9)  # both sides of the 5 × 7 block are projected to 3
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-12)


def test_trak_ekfac_is_one_file_and_equals_its_explicit_composition():
    """The method added as one file: Kronecker projection × EK-FAC × TRAK's out-to-loss ensemble."""
    model, train, queries = _setup()
    attr = st.Attributor(model, st.ClassificationTask(), "trak-ekfac", rank=3, damping=1e-3,
                         curvature_options={"fisher": "empirical"}, store_dtype="float64", progress=False)
    got = attr.fit(train).score(queries).matrix
    blocks = _ekfac_in_projected_space(model, train, attr.method.bound[0], 1e-3)
    f_rows, q_rows = _layer_grads(model, *train, "margin"), _layer_grads(model, *queries, "margin")
    q_out = 1 - torch.softmax(model(train[0]), 1).gather(1, train[1][:, None])[:, 0].detach()  # 1 - p
    want = sum(_projected(q_rows, layer, p_g, p_a)
               @ torch.linalg.solve(m, _projected(f_rows, layer, p_g, p_a).T)
               for layer, (p_g, p_a, m) in blocks.items()) * q_out / N
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-12)


def test_trak_projection_with_cg_equals_the_projected_ggn_solved_explicitly():
    model, train, queries = _setup()
    k, lam = 8, 1e-2
    attr = st.Attributor(model, st.ClassificationTask(), "trak", curvature="cg", proj_dim=k, damping=lam,
                         curvature_options={"tol": 1e-13, "max_iter": 40}, store_dtype="float64",
                         progress=False)
    got = attr.fit(train).score(queries).matrix
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    dim = flat.numel()

    def logits(theta, xi):
        chunks, start = {}, 0
        for name, p in params.items():
            chunks[name] = theta[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
        return torch.func.functional_call(model, chunks, (xi[None],))[0]

    ggn = torch.zeros(dim, dim, dtype=torch.float64)
    for xi in train[0]:
        jac = torch.func.jacrev(logits)(flat, xi)  # [4, dim]
        p = torch.softmax(logits(flat, xi), 0)
        ggn += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / N
    proj = RandomProjection(dim, k, "gaussian", seed=0).matrix(dtype=torch.float64)
    margin_grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        _margin(model(xs[i: i + 1]), ys[i: i + 1])[0], list(params.values()))])
        for xs, ys in (train, queries) for i in range(len(ys))]
    phi, q = torch.stack(margin_grads[:N]) @ proj, torch.stack(margin_grads[N:]) @ proj
    q_out = 1 - torch.softmax(model(train[0]), 1).gather(1, train[1][:, None])[:, 0].detach()
    damped = proj.T @ ggn @ proj + lam * torch.eye(k, dtype=torch.float64)
    want = q @ torch.linalg.solve(damped, phi.T) * q_out / N
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method, options, message", [
    ("kfac", {"curvature": "ekfac"}, "method 'kfac' is curvature='kfac'"),
    ("trak", {"curvature": "ekfac"}, "does not work on features='random'"),
    ("influence", {"features": "kronecker", "curvature": "explicit"}, "not work on features='kronecker'"),
    ("arnoldi", {"curvature_options": {"rnak": 5}}, "no option 'rnak' \\(did you mean 'rank'\\?\\)"),
    ("ekfac", {"damping": -1.0}, "damping must be a finite number >= 0"),
    ("cg", {"damping_factor": 0.0}, "damping_factor must be a positive number"),
    ("grad-dot", {"damping": 0.1}, "curvature 'identity' has no option 'damping'"),
    ("grad-dot", {"proj_dim": 64}, "proj_dim= applies to features='random'"),
    ("logra", {"proj_dim": 64}, "proj_dim= applies to features='random'"),
    ("trak", {"rank": 8}, "rank= applies to features='kronecker'"),
    ("tracin", {"checkpoints": [{}]}, "tracin needs checkpoints=.* and learning_rates="),
    ("ekfac", {"out_to_loss": "mean"}, "out_to_loss= applies to combination='ensemble'"),
    ("grad-dot", {"dda_reference": 10}, "dda_reference= applies to dda=True"),
    ("grad-cos", {"relatif": True}, "relatif=True needs a self-influence"),
    ("trak", {"dda": True}, "dda=True replaces the checkpoint combination"),
    ("influence", {"curvature": "ekfca"}, "no curvature 'ekfca' \\(did you mean 'ekfac'\\?\\)"),
    ("trak", {"features": "kronekcer"}, "features must be one of identity, random, kronecker"),
    ("grad-dot", {"batchsize": 8}, "no option 'batchsize' \\(did you mean 'batch_size'\\?\\)"),
])
def test_invalid_compositions_and_options_fail_when_built(method, options, message):
    model, _, _ = _setup()
    with pytest.raises(InvalidOptionError, match=message):
        st.Attributor(model, st.ClassificationTask(), method, progress=False, **options)


class _FailsOnNaN(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 4).double()

    def forward(self, x):
        if torch.isnan(x).any():
            raise RuntimeError("a failure that has nothing to do with shapes")
        return self.linear(x)


def test_query_side_failure_is_a_shape_error_only_when_shapes_differ():
    _, train, queries = _setup()
    attr = st.Attributor(_FailsOnNaN(), st.ClassificationTask(), "grad-dot", progress=False).fit(train)
    with pytest.raises(RuntimeError, match="nothing to do with shapes") as caught:
        attr.score((torch.full_like(queries[0], float("nan")), queries[1]))
    assert not isinstance(caught.value, ShapeError)
    with pytest.raises(ShapeError, match="a training example has"):
        attr.score((queries[0][:, :5], queries[1]))

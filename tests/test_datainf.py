"""DataInf against its closed form computed by hand, and against the exact inverse where they coincide."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sourcetrace as st
from models import lm_examples, tiny_gpt2


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (n,), generator=gen)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _grads(model, x, y, sign, params):
    """Per-example gradients of sign · cross-entropy, {name: [n, numel]}, one backward each."""
    out = {n: [] for n, _ in params}
    for i in range(len(y)):
        loss = sign * F.cross_entropy(model(x[i: i + 1]), y[i: i + 1])
        for (n, _), g in zip(params, torch.autograd.grad(loss, [p for _, p in params])):
            out[n].append(g.reshape(-1))
    return {n: torch.stack(v) for n, v in out.items()}


def _closed_form(model, train, queries, damping=None, params=None):
    """-Σ_l [1/(nλ_l) Σ_i (v_l - (g_iᵀv_l)/(λ_l + ‖g_i‖²) g_i)]ᵀ g_{l,k}; v: measurement gradients."""
    params = params or list(model.named_parameters())
    g = _grads(model, *train, 1.0, params)
    v = _grads(model, *queries, -1.0, params)  # measurement = -loss
    n = len(train[1])
    total = 0
    for name, gl in g.items():
        vl = v[name]
        lam = damping if damping is not None else 0.1 * float((gl ** 2).sum(1).mean()) / gl.shape[1]
        pre = torch.zeros_like(vl)
        for i in range(n):
            pre += vl - (vl @ gl[i])[:, None] / (lam + gl[i] @ gl[i]) * gl[i]
        pre /= n * lam
        total = total - pre @ gl.T
    return total


def test_datainf_equals_its_closed_form_with_the_default_and_a_given_damping():
    model, train, queries = _model(), _data(9, 0), _data(3, 1)
    task = st.ClassificationTask(measurement="loss")
    for damping in (None, 0.05):
        got = st.Attributor(model, task, "datainf", damping=damping, store_dtype="float64",
                            progress=False).fit(train).score(queries).matrix
        assert torch.allclose(got, _closed_form(model, train, queries, damping), rtol=1e-8, atol=1e-12)


def test_datainf_with_one_example_is_the_exact_damped_inverse_per_block():
    # with n = 1 swapping inversion and averaging changes nothing: DataInf = (g gᵀ + λI)⁻¹ per block
    model, train, queries = _model(), _data(1, 2), _data(2, 3)
    lam = 0.3
    got = st.Attributor(model, st.ClassificationTask(measurement="loss"), "datainf", damping=lam,
                        store_dtype="float64", progress=False).fit(train).score(queries).matrix
    params = list(model.named_parameters())
    g = _grads(model, *train, 1.0, params)
    v = _grads(model, *queries, -1.0, params)
    expected = sum(-v[n] @ torch.linalg.solve(g[n].T @ g[n] + lam * torch.eye(g[n].shape[1],
                                                                                dtype=torch.float64), g[n].T)
                   for n in g)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12)


def test_datainf_on_peft_lora_layers():
    peft = pytest.importorskip("peft")
    base = _model()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"], lora_alpha=4,
                                                      init_lora_weights="gaussian"))
    model = model.double()
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, _ in params)
    train, queries = _data(6, 4), _data(2, 5)
    got = st.Attributor(model, st.ClassificationTask(measurement="loss"), "datainf", store_dtype="float64",
                        progress=False).fit(train).score(queries).matrix
    assert torch.allclose(got, _closed_form(model, train, queries, params=params), rtol=1e-8, atol=1e-12)


def test_datainf_runs_on_tiny_gpt2():
    model = tiny_gpt2()
    train = lm_examples(6)
    for method, options in (("datainf", {}),):
        scores = st.Attributor(model, st.CausalLMTask(), method, progress=False, **options).fit(train)
        matrix = scores.score(train[:2]).matrix
        assert matrix.shape == (2, 6) and torch.isfinite(matrix).all()
        assert (matrix.argmax(1) == torch.arange(2)).all()  # each example is its own top proponent

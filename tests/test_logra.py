"""LoGra: equals block-wise damped-Fisher influence when no side is projected; runs on tiny GPT-2."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sourcetrace as st
from models import tiny_gpt2


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _grads(model, x, y, sign):
    rows = []
    for i in range(len(y)):
        loss = sign * F.cross_entropy(model(x[i: i + 1]), y[i: i + 1])
        rows.append(dict(zip([n for n, _ in model.named_parameters()],
                             torch.autograd.grad(loss, list(model.parameters())))))
    return rows


def test_logra_with_whole_sides_is_layerwise_damped_fisher_influence():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    train, queries = _data(10, 0), _data(3, 1)
    lam = 0.2
    got = st.Attributor(model, st.ClassificationTask(measurement="loss"), "logra", rank=64, damping=lam,
                        store_dtype="float64", progress=False).fit(train).score(queries).matrix

    def layer_rows(rows, layer):  # [W | b] of a Linear layer, flattened row-major
        return torch.stack([torch.cat([r[f"{layer}.weight"], r[f"{layer}.bias"][:, None]], 1).reshape(-1)
                            for r in rows])

    g_rows, q_rows = _grads(model, *train, 1.0), _grads(model, *queries, -1.0)
    expected = 0
    for layer in ("0", "2"):
        g, q = layer_rows(g_rows, layer), layer_rows(q_rows, layer)
        fisher = g.T @ g / len(g) + lam * torch.eye(g.shape[1], dtype=torch.float64)
        expected = expected - q @ torch.linalg.solve(fisher, g.T)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12)


def test_logra_default_damping_and_projected_rows_agree_with_the_kronecker_formula():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    train, queries = _data(12, 2), _data(2, 3)
    attr = st.Attributor(model, st.ClassificationTask(), "logra", rank=3, store_dtype="float64",
                         progress=False).fit(train)
    got = attr.score(queries).matrix
    method = attr.method

    kron = method.bound[0]
    g_rows = _grads(model, *train, 1.0)
    expected = 0
    task = st.ClassificationTask()
    for layer in ("0", "2"):
        w = f"{layer}.weight"
        big = torch.kron(kron.side_matrix(w, 0), kron.side_matrix(w, 1))
        g = torch.stack([torch.cat([r[w], r[f"{layer}.bias"][:, None]], 1).reshape(-1) for r in g_rows]) @ big
        q = []
        for i in range(len(queries[1])):
            m = task.measurement(model, (queries[0][i: i + 1], queries[1][i: i + 1])).sum()
            mod = model.get_submodule(layer)
            gw, gb = torch.autograd.grad(m, [mod.weight, mod.bias])
            q.append(torch.cat([gw, gb[:, None]], 1).reshape(-1))
        q = torch.stack(q) @ big
        fisher = g.T @ g / len(g)
        lam = torch.trace(fisher) / len(g)  # factor 1 × mean ‖φ_i‖² / n
        damped = fisher + lam * torch.eye(len(fisher), dtype=torch.float64)
        expected = expected - q @ torch.linalg.solve(damped, g.T)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12)


def test_logra_on_tiny_gpt2_with_conv1d_and_tied_embeddings():
    model = tiny_gpt2()
    gen = torch.Generator().manual_seed(0)
    train = [{"prompt": torch.randint(1, 30, (3,), generator=gen).tolist(),
              "completion": torch.randint(1, 30, (int(n),), generator=gen).tolist()}
             for n in torch.randint(2, 6, (10,), generator=gen)]
    queries = train[:3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attr = st.Attributor(model, st.CausalLMTask(), "logra", rank=8, progress=False, batch_size=4)
        scores = attr.fit(train).score(queries)
    left_out = [str(w.message) for w in caught if "leave out" in str(w.message)]
    assert left_out and "ln_" in left_out[0]  # LayerNorms and the position embedding are named
    assert scores.matrix.shape == (3, 10) and torch.isfinite(scores.matrix).all()
    # a training example is its own strongest proponent under a damped inverse-Fisher metric
    assert (scores.matrix.argmax(1) == torch.arange(3)).all()
    kron = attr.method.bound[0]
    names = {b.weight for b in kron.blocks}
    assert "transformer.h.0.attn.c_attn.weight" in names  # Conv1D, projected without rewriting the model
    assert "transformer.wte.weight" in names and "transformer.wpe.weight" in kron.left_out


def test_kronecker_rows_of_gpt2_equal_its_per_example_gradients_when_nothing_is_projected():
    transformers = pytest.importorskip("transformers")
    from sourcetrace.grads import GradientCapture
    from sourcetrace.grads.projection import KroneckerProjection

    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=12, n_positions=8, n_inner=8,
                                  attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    task = st.CausalLMTask()
    batch = task.collate([{"prompt": [1, 2], "completion": [3, 4, 5]}, {"prompt": [6], "completion": [7, 8]}])
    capture = GradientCapture(model)
    kron = KroneckerProjection(capture, rank=100, exclude={"transformer.wpe.weight"})  # identity everywhere
    rows = kron(task.train_loss, batch)
    params = dict(model.named_parameters())
    for i in range(2):
        one = {k: v[i: i + 1] for k, v in batch.items()}
        values = torch.autograd.grad(task.train_loss(model, one).sum(), list(params.values()))
        grads = dict(zip(params, values))
        # tied input embedding and LM head: the block holds the gradient of the shared tensor, [V, d]
        assert torch.allclose(rows[i, kron.slices["transformer.wte.weight"]],
                              grads["transformer.wte.weight"].reshape(-1), atol=1e-10)
        c_attn = torch.cat([grads["transformer.h.0.attn.c_attn.weight"],
                            grads["transformer.h.0.attn.c_attn.bias"][None]], 0)  # Conv1D: [in+1, out]
        assert torch.allclose(rows[i, kron.slices["transformer.h.0.attn.c_attn.weight"]], c_attn.reshape(-1),
                              atol=1e-10)

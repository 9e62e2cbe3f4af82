"""Random and Kronecker (LoGra) projections, against brute-force per-example gradients and JL bounds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sourcetrace.grads import GradientCapture
from sourcetrace.grads.projection import KroneckerProjection, RandomProjection


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_random_projection_preserves_inner_products_within_jl_bounds(kind):
    gen = torch.Generator().manual_seed(0)
    m, dim, k = 40, 500, 400
    x = torch.randn(m, dim, generator=gen, dtype=torch.float64)
    x[: m // 2] += 2 * x[m // 2:]  # correlated pairs, not only near-orthogonal ones
    proj = RandomProjection(dim, k, kind, seed=3, block_rows=64)
    y = proj(x)
    exact, approx = x @ x.T, y @ y.T
    norms = x.norm(dim=1)
    err = (approx - exact) / (norms[:, None] * norms[None, :])  # distortion relative to ‖x‖‖y‖
    # Var of the normalised error is (1 + cos²)/k ≤ 2/k for Gaussian entries (less for Rademacher);
    # over m² pairs the largest stays within ~5 standard deviations, the mean near 0.
    assert err.abs().max() <= 5 * math.sqrt(2 / k)
    assert err.mean().abs() <= 3 * math.sqrt(2 / k) / m
    assert ((y.norm(dim=1) / norms) ** 2 - 1).abs().max() <= 5 * math.sqrt(2 / k)


def test_random_projection_entries_and_scale():
    p = RandomProjection(300, 50, "rademacher", seed=1).matrix(dtype=torch.float64)
    assert torch.allclose(p.abs(), torch.full_like(p, 50 ** -0.5))
    g = RandomProjection(3000, 50, "gaussian", seed=1).matrix(dtype=torch.float64)
    assert abs(float(g.var()) * 50 - 1) < 0.05 and abs(float(g.mean())) < 0.01


def test_random_projection_is_deterministic_and_block_consistent():
    x = torch.randn(7, 1000, dtype=torch.float64)
    a = RandomProjection(1000, 32, seed=5, block_rows=100)
    b = RandomProjection(1000, 32, seed=5, block_rows=100, cache_bytes=0)  # regenerated every call
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))
    assert not torch.allclose(a(x), RandomProjection(1000, 32, seed=6, block_rows=100)(x))
    # any split of the coordinates, cutting through blocks, sums to the whole projection
    parts = a(x[:, :250]) + a(x[:, 250:777], offset=250) + a(x[:, 777:], offset=777)
    assert torch.allclose(parts, a(x), atol=1e-12)
    # the same matrix in float64 and float32 (generated once in float32, then cast)
    assert torch.allclose(a(x), x @ a.matrix(dtype=torch.float64), atol=1e-12)
    assert torch.allclose(a(x.float()).double(), a(x), atol=1e-4)


# ---- Kronecker projection --------------------------------------------------------------------------------

class SeqNet(nn.Module):
    """Embedding → Linear (with bias) → tanh → transformers Conv1D → scalar per example."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.lin = nn.Linear(6, 9)
        self.c1d = Conv1D(5, 9)  # nf=5 outputs, nx=9 inputs; weight [9, 5]
        nn.init.normal_(self.c1d.bias)

    def forward(self, ids):
        return self.c1d(torch.tanh(self.lin(self.emb(ids))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.head = nn.Linear(3 * 3 * 3, 4, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _brute(model, fn, batch, b):
    """Per-example gradients by one backward pass per example."""
    params = dict(model.named_parameters())
    out = []
    for i in range(b):
        one = batch[i: i + 1]
        grads = torch.autograd.grad(fn(model, one).sum(), list(params.values()), allow_unused=True)
        out.append({n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)})
    return out


def _check(model, fn, batch, rank, folded):
    """Projected rows equal (P_0 ⊗ P_1)ᵀ vec([W | b]) of the brute-force per-example gradient."""
    capture = GradientCapture(model)
    kron = KroneckerProjection(capture, rank=rank, seed=2)
    rows = kron(fn, batch)
    assert rows.shape == (batch.shape[0], kron.dim)
    brute = _brute(model, fn, batch, batch.shape[0])
    assert set(kron.slices) == set(folded)
    for weight, make in folded.items():
        p0, p1 = kron.side_matrix(weight, 0), kron.side_matrix(weight, 1)
        big = torch.kron(p0, p1)  # [(r·s), k_0·k_1]: rows indexed by the row-major position in [r, s]
        for i, grads in enumerate(brute):
            expected = big.T @ make(grads).reshape(-1)
            assert torch.allclose(rows[i, kron.slices[weight]], expected, atol=1e-10), weight
    return kron


def test_kronecker_projection_equals_projected_brute_force_gradient_linear_conv1d_embedding():
    torch.manual_seed(0)
    model = SeqNet().double()
    ids = torch.randint(0, 11, (4, 7))
    ids[0, :2] = 0  # padding tokens contribute nothing to the embedding gradient

    def fn(m, batch):
        return (m(batch) ** 2).sum((1, 2))

    folded = {
        "emb.weight": lambda g: g["emb.weight"],  # [V, d]; no bias
        "lin.weight": lambda g: torch.cat([g["lin.weight"], g["lin.bias"][:, None]], 1),  # [out, in+1]
        "c1d.weight": lambda g: torch.cat([g["c1d.weight"], g["c1d.bias"][None, :]], 0),  # [in+1, out]
    }
    kron = _check(model, fn, ids, rank=4, folded=folded)
    assert kron.left_out == []
    # rank no smaller than a side keeps that side whole (identity)
    _check(model, fn, ids, rank=100, folded=folded)


def test_kronecker_projection_conv2d_via_unfold():
    torch.manual_seed(1)
    model = ConvNet().double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)

    def fn(m, batch):
        return torch.log_softmax(m(batch), 1)[:, 0]

    folded = {
        "conv.weight": lambda g: torch.cat([g["conv.weight"].reshape(3, -1), g["conv.bias"][:, None]], 1),
        "head.weight": lambda g: g["head.weight"],
    }
    _check(model, fn, x, rank=5, folded=folded)


def test_structured_features_are_the_kronecker_rows_randomly_projected():
    from sourcetrace.grads.features import FeatureMap

    torch.manual_seed(0)
    model = SeqNet().double()
    ids = torch.randint(0, 11, (4, 7))

    def fn(m, batch):
        return (m(batch) ** 2).sum((1, 2))

    capture = GradientCapture(model)
    fmap = FeatureMap("structured", proj_dim=16, rank=3, seed=5)
    feats = fmap.bind(capture, 0)
    kron = KroneckerProjection(capture, 3, "gaussian", 5)
    dense = RandomProjection(kron.dim, 16, "gaussian", 5).matrix(dtype=torch.float64)
    expected = kron(fn, ids).double() @ dense
    assert feats.dim == 16 and feats.feature_kind == "structured"
    torch.testing.assert_close(feats(fn, ids).double(), expected, rtol=1e-5, atol=1e-8)
    # a later checkpoint gets an independent projection of the same Kronecker rows
    assert not torch.allclose(fmap.bind(capture, 1)(fn, ids).double(), expected)

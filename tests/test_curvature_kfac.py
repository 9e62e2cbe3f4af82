"""K-FAC, EK-FAC and the diagonal Fisher against brute-force Fisher matrices from per-example gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import tiny_gpt2
from sourcetrace.curvature.base import CURVATURES, CurvatureContext
from sourcetrace.curvature.kfac import EKFAC, KFAC, DiagonalFisher
from sourcetrace.data import Examples
from sourcetrace.errors import InvalidOptionError
from sourcetrace.grads import GradientCapture
from sourcetrace.tasks import CausalLMTask, ClassificationTask


@pytest.fixture(autouse=True, scope="module")
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _ctx(model: nn.Module, task, data, batch_size: int = 16, **kw) -> CurvatureContext:
    return CurvatureContext(model=model, task=task, capture=GradientCapture(model), train=Examples(data),
                            batch_size=batch_size, progress=False, **kw)


def _per_example(ctx: CurvatureContext, fn) -> torch.Tensor:
    return torch.cat([ctx.capture.flat(fn, b) for b in ctx.batches()])


def _fisher(ctx: CurvatureContext, fn) -> torch.Tensor:
    g = _per_example(ctx, fn)
    return g.T @ g / g.shape[0]


class _RademacherRegression:
    """Squared loss whose "sampled" loss f·s (s = ±1) has output gradient s, s² = 1: the GGN with no noise."""

    def train_loss(self, model, batch):
        x, y = batch
        return 0.5 * (model(x).squeeze(1) - y) ** 2

    def measurement(self, model, batch):
        return -self.train_loss(model, batch)

    def sampled_loss(self, model, batch, generator=None):
        x, _ = batch
        s = torch.randint(0, 2, (x.shape[0],), generator=generator).to(x.dtype) * 2 - 1
        return model(x).squeeze(1) * s


class _LinearLoss:
    """loss = ⟨f(x), t⟩: the output gradient of each example is exactly its target t."""

    def train_loss(self, model, batch):
        x, t = batch
        return (model(x) * t).sum(1)

    def measurement(self, model, batch):
        return -self.train_loss(model, batch)


def test_registered():
    assert CURVATURES["kfac"] is KFAC and CURVATURES["ekfac"] is EKFAC
    assert CURVATURES["diagonal"] is DiagonalFisher


def test_kfac_equals_exact_ggn_for_one_linear_layer_with_scalar_output():
    """Squared loss, one output: GGN = E[[x,1][x,1]ᵀ] = A ⊗ S with S = 1, so K-FAC is exact."""
    x, y = torch.randn(50, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 0.3, torch.randn(50)
    model = nn.Linear(4, 1)
    ctx = _ctx(model, _RademacherRegression(), (x, y), batch_size=8)
    ggn = _fisher(ctx, lambda m, b: m(b[0]).squeeze(1))  # Jacobians of the output: JᵀHJ with H = 1
    v = torch.randn(3, ctx.capture.dim)
    for damping in (1e-3, 0.5):
        curv = KFAC(damping=damping)
        curv.fit(ctx)
        expected = torch.linalg.solve(ggn + damping * torch.eye(5), v.T).T
        torch.testing.assert_close(curv.apply(v), expected, rtol=1e-9, atol=1e-10)
    # the default damping is DAMPING_FACTOR × the mean eigenvalue, i.e. × trace(GGN) / dim
    curv = KFAC()
    curv.fit(ctx)
    lam = curv.damping_factor * torch.trace(ggn) / 5
    torch.testing.assert_close(curv.apply(v), torch.linalg.solve(ggn + lam * torch.eye(5), v.T).T)


def _rotated_one_hot(n: int = 240):
    """Inputs α_k u_k and output gradients β_j v_j (U, V orthogonal) with (k, j) dependent: the Fisher is
    diagonal in the basis V ⊗ U, which is also K-FAC's eigenbasis, but it is not A ⊗ S."""
    gen = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(4, 4, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(3, 3, generator=gen))[0]
    alpha, beta = torch.tensor([1.0, 1.7, 2.6, 3.9]), torch.tensor([1.0, 2.2, 3.5])
    k = torch.randint(0, 4, (n,), generator=gen)
    j = torch.where(torch.rand(n, generator=gen) < 0.7, k % 3, torch.randint(0, 3, (n,), generator=gen))
    return (alpha[k, None] * u[:, k].T, beta[j, None] * v[:, j].T)


def test_ekfac_is_exact_when_the_fisher_is_diagonal_in_the_kronecker_basis():
    model = nn.Linear(4, 3, bias=False)
    ctx = _ctx(model, _LinearLoss(), _rotated_one_hot(), batch_size=32)
    fisher = _fisher(ctx, ctx.task.train_loss)
    v = torch.randn(4, ctx.capture.dim)
    expected = torch.linalg.solve(fisher + 1e-3 * torch.eye(12), v.T).T
    ekfac, kfac = EKFAC(damping=1e-3, fisher="empirical"), KFAC(damping=1e-3, fisher="empirical")
    ekfac.fit(ctx)
    kfac.fit(ctx)
    torch.testing.assert_close(ekfac.apply(v), expected, rtol=1e-8, atol=1e-10)
    assert (kfac.apply(v) - expected).norm() > 0.1 * expected.norm()  # K-FAC's eigenvalues are off here


def _check_blocks_against_brute_force(ctx: CurvatureContext, curv: KFAC, scale: torch.Tensor | None = None
                                      ) -> None:
    """EK-FAC eigenvalues = diag(Qᵀ F Q) per block; diagonal blocks = diag F; apply is SPD and finite.
    With `scale` s (flat), F is the preconditioned diag(s) F diag(s)."""
    fn = curv._loss(ctx, 0) if len(ctx.train) <= ctx.batch_size else None
    assert fn is not None, "use one batch so that the sampled labels are the brute force's too"
    fisher = _fisher(ctx, fn)
    if scale is not None:
        fisher = scale[:, None] * fisher * scale[None, :]
    layout = {n: sl for n, _, sl in ctx.layout()}
    for b in curv.blocks:
        idx = torch.cat([torch.arange(ctx.capture.dim)[layout[b.weight]]]
                        + ([torch.arange(ctx.capture.dim)[layout[b.bias]]] if b.bias else []))
        # columns of the flat layout in the block's [out, in'] matrix order
        eye = torch.eye(ctx.capture.dim)[:, idx]
        w = eye[layout[b.weight]].T
        bias = eye[layout[b.bias]].T if b.bias else None
        basis = b.rotate(b.matrix(w, bias)).reshape(len(idx), -1)  # row r: Qᵀ e_r, in eigen-coordinates
        f_block = fisher[idx][:, idx]
        diag = torch.einsum("ra,rs,sa->a", basis, f_block, basis)
        torch.testing.assert_close(b.eig.reshape(-1), diag, rtol=1e-8, atol=1e-12)
    for name in curv.diag_names:
        sl = layout[name]
        torch.testing.assert_close(curv.diag[name].reshape(-1), fisher.diagonal()[sl], rtol=1e-8, atol=1e-12)
    v = torch.randn(5, ctx.capture.dim)
    p = curv.apply(v)
    assert torch.isfinite(p).all()
    gram = v @ p.T
    torch.testing.assert_close(gram, gram.T, rtol=1e-8, atol=1e-10)
    assert torch.linalg.eigvalsh(gram).min() > 0


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class _EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5, padding_idx=0)
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, ids):
        return self.fc(self.norm(self.emb(ids)).mean(1))


def test_conv2d_blocks_match_brute_force():
    data = (torch.randn(24, 2, 6, 6), torch.randint(0, 4, (24,)))
    ctx = _ctx(_ConvNet(), ClassificationTask(), data, batch_size=24)
    curv = EKFAC()
    curv.fit(ctx)
    assert {b.kind for b in curv.blocks} == {"conv2d", "linear"}
    _check_blocks_against_brute_force(ctx, curv)


def test_embedding_blocks_match_brute_force_and_a_is_token_frequencies():
    ids = torch.randint(0, 7, (30, 6))
    ctx = _ctx(_EmbeddingNet(), ClassificationTask(), (ids, torch.randint(0, 3, (30,))), batch_size=30)
    curv = EKFAC(fisher="empirical")
    curv.fit(ctx)
    emb = next(b for b in curv.blocks if b.kind == "embedding")
    assert emb.qa is None  # A is diagonal: no rotation on the input side
    counts = torch.bincount(ids.reshape(-1), minlength=7).double()
    counts[0] = 0  # padding_idx gets no gradient
    torch.testing.assert_close(emb.ea, counts / counts.sum())
    assert curv.diag_names == ["norm.weight", "norm.bias"]
    _check_blocks_against_brute_force(ctx, curv)


def test_preconditioned_fit_matches_brute_force_with_the_kronecker_scale():
    """fit_average(scale=s): blocks fitted to diag(ŝ) F diag(ŝ), ŝ the rank-one fit of s per block (exactly
    s when s is rank one), on an embedding, a linear layer and LayerNorm's diagonal blocks."""
    ids = torch.randint(0, 7, (30, 6))
    ctx = _ctx(_EmbeddingNet(), ClassificationTask(), (ids, torch.randint(0, 3, (30,))), batch_size=30)
    gen = torch.Generator().manual_seed(3)
    params = dict(ctx.capture.params)
    scale = {n: torch.exp(0.5 * torch.randn(p.shape, generator=gen)) for n, p in params.items()}
    u, v = torch.exp(torch.randn(3, generator=gen)), torch.exp(torch.randn(6, generator=gen))
    scale["fc.weight"], scale["fc.bias"] = torch.outer(u, v[:5]), u * v[5]  # rank one with the bias column
    curv = EKFAC(fisher="empirical")
    curv.fit_average([ctx], scale=scale)
    assert curv.scales is not None
    torch.testing.assert_close(curv.scales["fc.weight"], scale["fc.weight"].reshape(-1))
    torch.testing.assert_close(curv.scales["fc.bias"], scale["fc.bias"])
    torch.testing.assert_close(curv.scales["norm.weight"], scale["norm.weight"])
    assert not torch.allclose(curv.scales["emb.weight"], scale["emb.weight"].reshape(-1))  # not rank one
    flat = torch.cat([curv.scales[n] for n, _, _ in ctx.layout()])
    _check_blocks_against_brute_force(ctx, curv, flat)


def test_preconditioned_kfac_is_exact_for_one_linear_layer_with_scalar_output():
    x, y = torch.randn(50, 4) + 0.3, torch.randn(50)
    ctx = _ctx(nn.Linear(4, 1), _RademacherRegression(), (x, y), batch_size=8)
    ggn = _fisher(ctx, lambda m, b: m(b[0]).squeeze(1))
    scale = {"weight": torch.tensor([[0.5, 2.0, 1.0, 3.0]]), "bias": torch.tensor([0.7])}
    s = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.7])
    curv = KFAC()
    curv.fit_average([ctx], scale=scale)
    v = torch.randn(3, 5)
    torch.testing.assert_close(curv.apply_fn(v, lambda e: e), v @ (s[:, None] * ggn * s[None, :]),
                               rtol=1e-9, atol=1e-10)
    with pytest.raises(InvalidOptionError, match="positive"):
        KFAC().fit_average([ctx], scale={"weight": -scale["weight"], "bias": scale["bias"]})


def _tiny_gpt2():
    return tiny_gpt2(dtype=torch.float64)


def test_gpt2_conv1d_blocks_match_brute_force():
    model = _tiny_gpt2()
    gen = torch.Generator().manual_seed(0)
    data = [{"prompt": torch.randint(1, 30, (int(n),), generator=gen).tolist(),
             "completion": torch.randint(1, 30, (3,), generator=gen).tolist()}
            for n in torch.randint(2, 6, (12,), generator=gen)]
    ctx = _ctx(model, CausalLMTask(), data, batch_size=12)
    with pytest.warns(UserWarning):  # the position embeddings go through torch.func
        curv = EKFAC()
        curv.fit(ctx)
    assert {b.kind for b in curv.blocks} == {"conv1d"}
    assert "transformer.wte.weight" in curv.diag_names  # tied to lm_head: no single Kronecker structure
    _check_blocks_against_brute_force(ctx, curv)
    kfac = KFAC()
    kfac.fit(ctx)
    p = kfac.apply(torch.randn(3, ctx.capture.dim))
    assert torch.isfinite(p).all()


def test_streaming_is_independent_of_the_batch_size():
    data = (torch.randn(70, 2, 6, 6), torch.randint(0, 4, (70,)))
    model = _ConvNet()
    fits = []
    for bs in (7, 64):
        curv = EKFAC(fisher="empirical")
        curv.fit(_ctx(model, ClassificationTask(), data, batch_size=bs))
        fits.append(curv)
    for b1, b2 in zip(fits[0].blocks, fits[1].blocks):
        torch.testing.assert_close(b1.a_sum / b1.a_count, b2.a_sum / b2.a_count, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b1.s_sum / b1.s_count, b2.s_sum / b2.s_count, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b1.eig, b2.eig, rtol=1e-8, atol=1e-12)
    v = torch.randn(2, sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(fits[0].apply(v), fits[1].apply(v), rtol=1e-8, atol=1e-10)


def test_diagonal_fisher_is_v_over_mean_squared_gradient():
    data = (torch.randn(40, 2, 6, 6), torch.randint(0, 4, (40,)))
    ctx = _ctx(_ConvNet(), ClassificationTask(), data, batch_size=16)
    g2 = _per_example(ctx, ctx.task.train_loss).pow(2).mean(0)
    v = torch.randn(3, ctx.capture.dim)
    curv = DiagonalFisher(damping=0.01, fisher="empirical")
    curv.fit(ctx)
    torch.testing.assert_close(curv.apply(v), v / (g2 + 0.01))
    curv = DiagonalFisher(fisher="empirical")
    curv.fit(ctx)
    layout = {n: sl for n, _, sl in ctx.layout()}
    lam = torch.cat([torch.full((sl.stop - sl.start,), curv.damping_factor * float(g2[sl].mean()))
                     for sl in layout.values()])
    torch.testing.assert_close(curv.apply(v), v / (g2 + lam))


def test_true_fisher_is_seeded_and_cached(tmp_path):
    data = (torch.randn(40, 2, 6, 6), torch.randint(0, 4, (40,)))
    model = _ConvNet()
    v = torch.randn(2, sum(p.numel() for p in model.parameters()))
    a, b, c = EKFAC(), EKFAC(), EKFAC()
    a.fit(_ctx(model, ClassificationTask(), data, seed=3))
    b.fit(_ctx(model, ClassificationTask(), data, seed=3, folder=tmp_path))
    torch.testing.assert_close(a.apply(v), b.apply(v))
    assert (tmp_path / "ekfac.safetensors").exists()
    c.fit(_ctx(model, ClassificationTask(), data, seed=3, folder=tmp_path))  # read back from the folder
    torch.testing.assert_close(a.apply(v), c.apply(v))
    d = EKFAC()
    d.fit(_ctx(model, ClassificationTask(), data, seed=4))
    assert not torch.allclose(a.apply(v), d.apply(v))


def test_options_are_checked():
    with pytest.raises(InvalidOptionError):
        EKFAC(fisher="exact")
    with pytest.raises(InvalidOptionError):
        KFAC(damping=-1.0)
    ctx = _ctx(nn.Linear(3, 2), _LinearLoss(), (torch.randn(8, 3), torch.randn(8, 2)))
    with pytest.raises(InvalidOptionError, match="sampled_loss"):
        EKFAC().fit(ctx)

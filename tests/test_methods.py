"""grad-dot, grad-cos and TracIn against a brute-force per-example autograd loop (float64)."""

import copy

import pytest
import torch
from torch import nn

import sourcetrace as st
from sourcetrace.errors import InvalidOptionError, SourcetraceError, UnknownMethodError
from sourcetrace.grads import GradientCapture
from sourcetrace.methods import gradient

N_TRAIN, N_QUERY, D, C = 13, 4, 4, 3


def mlp():
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_QUERY, D, dtype=torch.float64, generator=g)
    y = torch.randint(0, C, (N_TRAIN + N_QUERY,), generator=g)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


# ---- the independent reference: hand-written loss and margin, one backward per example -------------
def ce(model, x, y):
    return -torch.log_softmax(model(x[None])[0], 0)[y]


def margin(model, x, y):
    logits = model(x[None])[0]
    others = torch.cat([logits[:y], logits[y + 1:]])
    return logits[y] - torch.logsumexp(others, 0)


def grads(model, fn, xs, ys):
    params = list(model.parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(fn(model, x, int(y)), params)])
            for x, y in zip(xs, ys)]
    return torch.stack(rows)


def brute(models, rates, train, queries, cosine=False):
    """score(q, i) = -Σ_c lr_c ∇m_c(q)·∇L_c(i), or with cosines."""
    total = torch.zeros(len(queries[0]), len(train[0]), dtype=torch.float64)
    for model, lr in zip(models, rates):
        q, g = grads(model, margin, *queries), grads(model, ce, *train)
        if cosine:
            q, g = q / q.norm(dim=1, keepdim=True), g / g.norm(dim=1, keepdim=True)
        total -= lr * q @ g.T
    return total


def fit(model, train, method="grad-dot", **kw):
    kw.setdefault("store_dtype", "float64")
    return st.Attributor(model, st.ClassificationTask(), method=method, progress=False, **kw).fit(train)


def close(a, b, tol=1e-9):
    return (a - b).norm() / b.norm() < tol


def checkpoints(n=3):
    """n different models (as if saved during training)."""
    return [mlp() for _ in range(n)]


# ---- brute force ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["grad-dot", "grad-cos"])
def test_scores_equal_brute_force(data, method):
    train, queries = data
    model = mlp()
    scores = fit(model, train, method, batch_size=5).score(queries)
    want = brute([model], [1.0], train, queries, cosine=method == "grad-cos")
    assert scores.matrix.dtype == torch.float64
    assert close(scores.matrix, want)
    assert scores.train_ids == list(range(N_TRAIN)) and scores.query_ids == list(range(N_QUERY))


@pytest.mark.parametrize("as_paths", [False, True])
def test_tracin_equals_brute_force(data, tmp_path, as_paths):
    train, queries = data
    models, rates = checkpoints(3), [0.1, 0.05, 0.02]
    states = [copy.deepcopy(m.state_dict()) for m in models]
    if as_paths:
        paths = [tmp_path / f"ck{c}.pt" for c in range(3)]
        for s, p in zip(states, paths):
            torch.save(s, p)
        states = paths
    final = mlp()  # the model handed to the Attributor is not one of the checkpoints
    attr = fit(final, train, "tracin", checkpoints=states, learning_rates=rates, batch_size=4)
    scores = attr.score(queries)
    assert close(scores.matrix, brute(models, rates, train, queries))
    # self-influence: Σ_c lr_c ‖∇L_c(i)‖²
    want = sum(lr * grads(m, ce, *train).pow(2).sum(1) for m, lr in zip(models, rates))
    assert close(scores.self_influence, want) and close(attr.self_influence(), want)


def test_self_influence_grad_dot(data):
    train, queries = data
    model = mlp()
    attr = fit(model, train)
    want = grads(model, ce, *train).pow(2).sum(1)
    assert close(attr.self_influence(), want)
    assert close(attr.score(queries).self_influence, want)
    with pytest.raises(SourcetraceError, match="self-influence"):
        fit(model, train, "grad-cos").self_influence()


def test_sign_convention_one_sgd_step(data):
    """One SGD step of size η on training example i changes the query's margin by ≈ η · score(q, i)."""
    train, queries = data
    model = mlp()
    scores = fit(model, train).score(queries).matrix
    eta = 1e-6

    def margins(m):
        with torch.no_grad():
            return torch.stack([margin(m, x, int(y)) for x, y in zip(*queries)])

    before = margins(model)
    change = torch.empty(N_QUERY, N_TRAIN, dtype=torch.float64)
    for i in range(N_TRAIN):
        stepped = copy.deepcopy(model)
        loss = ce(stepped, train[0][i], int(train[1][i]))
        for p, g in zip(stepped.parameters(), torch.autograd.grad(loss, list(stepped.parameters()))):
            p.data -= eta * g
        change[:, i] = margins(stepped) - before
    assert close(change / eta, scores, tol=1e-4)
    # and the sign is meaningful: the largest-score example really raises the margin the most
    for q in range(N_QUERY):
        assert int(change[q].argmax()) == int(scores[q].argmax())


# ---- streaming top-k over several shards ----------------------------------------------------------
def test_top_k_streaming_equals_dense(data, monkeypatch):
    train, queries = data
    model = mlp()
    dim = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(gradient, "SHARD_BYTES", dim * 8 * 4)  # 4 rows per shard: 4 shards for 13 rows
    attr = fit(model, train, batch_size=3)
    assert attr.method.stores[0].num_shards == 4
    dense = attr.score(queries)
    assert close(dense.matrix, brute([model], [1.0], train, queries))
    for k in (1, 5, N_TRAIN):
        sparse = attr.score(queries, top_k=k)
        assert not sparse.is_dense and sparse.self_influence is None
        for q in range(N_QUERY):
            pairs = ((sparse.top(q, k), dense.top(q, k)), (sparse.bottom(q, k), dense.bottom(q, k)))
            for mine, want in pairs:
                assert [a.index for a in mine] == [a.index for a in want]
                assert [a.score for a in mine] == pytest.approx([a.score for a in want], rel=1e-12)


# ---- option and method validation -----------------------------------------------------------------
def test_unknown_method_suggests_a_name(data):
    with pytest.raises(UnknownMethodError, match="did you mean 'grad-dot'") as info:
        st.Attributor(mlp(), st.ClassificationTask(), method="grad_dot")
    available = str(info.value).split("Available: ")[1].split(", ")
    assert {"grad-cos", "grad-dot", "tracin"} <= set(available) and available == st.available_methods()
    assert "grad-dot" in st.available_methods() and "tracin" in st.available_methods()


def test_unknown_and_invalid_options():
    task = st.ClassificationTask()
    with pytest.raises(InvalidOptionError, match="no option 'batchsize'.*batch_size"):
        st.Attributor(mlp(), task, batchsize=4)
    with pytest.raises(InvalidOptionError, match="batch_size"):
        st.Attributor(mlp(), task, batch_size=0)
    with pytest.raises(InvalidOptionError, match="tracin needs checkpoints"):
        st.Attributor(mlp(), task, method="tracin")
    with pytest.raises(InvalidOptionError, match="one learning rate per checkpoint"):
        st.Attributor(mlp(), task, method="tracin", checkpoints=[mlp().state_dict()], learning_rates=[1, 2])


def test_relatif_divides_by_the_root_of_self_influence():
    """RelatIF: score(q, i) / √(∇L_iᵀ P ∇L_i), checked against the same method's own parts (EK-FAC)."""
    torch.manual_seed(1)
    x, y = torch.randn(25, 4, dtype=torch.float64), torch.randint(0, 3, (25,))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    task = st.ClassificationTask()
    plain = st.Attributor(model, task, "ekfac", store_dtype="float64", progress=False).fit((x, y))
    want = plain.score((x[:3], y[:3])).matrix / plain.self_influence().sqrt()
    got = st.Attributor(model, task, "ekfac", store_dtype="float64", relatif=True, progress=False) \
        .fit((x, y)).score((x[:3], y[:3])).matrix
    assert torch.allclose(got, want, rtol=1e-10)
    # self-influence itself against brute force: gᵀ P g with P applied to each training gradient
    g = GradientCapture(model).flat(task.train_loss, (x, y))
    brute = (plain.method.precondition(0, g) * g).sum(1)
    assert torch.allclose(plain.self_influence(), brute, rtol=1e-8)


@pytest.mark.parametrize("method", ["grad-dot", "ekfac"])
def test_scores_by_module_add_up_and_match_a_module_restricted_run(method):
    """Per-module scores sum to the total; with a block-diagonal curvature each equals that module alone."""
    torch.manual_seed(2)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    task = st.ClassificationTask()
    attr = st.Attributor(model, task, method, store_dtype="float64", progress=False).fit((x, y))
    parts = attr.score_by_module((x[:3], y[:3]))
    assert set(parts) == {"0", "2"}
    total = attr.score((x[:3], y[:3])).matrix
    assert torch.allclose(sum(p.matrix for p in parts.values()), total, rtol=1e-10)
    alone = st.Attributor(model, task, method, modules=["2"], store_dtype="float64", progress=False) \
        .fit((x, y)).score((x[:3], y[:3])).matrix
    assert torch.allclose(parts["2"].matrix, alone, rtol=1e-8)


def test_query_low_rank_truncates_each_weight_block():
    """query_rank=r: each weight block of the preconditioned query is its best rank-r approximation."""
    torch.manual_seed(4)
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 4, (20,))
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    task = st.ClassificationTask()
    exact = st.Attributor(model, task, "ekfac", store_dtype="float64", progress=False).fit((x, y))
    cut = st.Attributor(model, task, "ekfac", store_dtype="float64", query_rank=1, progress=False).fit((x, y))
    q = exact.method.query_features(exact.ctx, st.Examples((x[:2], y[:2])))[0]
    got = cut.method.query_features(cut.ctx, st.Examples((x[:2], y[:2])))[0]
    w = q[:, :30].reshape(2, 5, 6)  # first weight [5, 6]
    u, s, vh = torch.linalg.svd(w)
    want = s[:, :1, None] * u[..., :1] @ vh[:, :1]
    assert torch.allclose(got[:, :30].reshape(2, 5, 6), want, rtol=1e-10, atol=1e-12)
    assert torch.equal(got[:, 30:35], q[:, 30:35])  # biases untouched
    full = st.Attributor(model, task, "ekfac", store_dtype="float64", query_rank=5, progress=False)
    full.fit((x, y))
    assert torch.allclose(full.score((x[:2], y[:2])).matrix, exact.score((x[:2], y[:2])).matrix, rtol=1e-10)

"""SOURCE against an explicit-GGN implementation of its formula, and its two limits (float64).

Limits (Bae et al. 2024, §3.3): with one segment and one checkpoint, f(H) = (I − e^{−aH})H⁻¹ (a = η̄K) is
EK-FAC influence with damping δ = 1/a after the factor φ(aH): (1 − e^{−aλ})/λ = φ(aλ)/(λ + δ) with
φ(x) = (1 + 1/x)(1 − e^{−x}) ∈ [1, 1.3) (largest 1.2985 at x ≈ 1.8), and φ → 1 both as aλ → 0 and as
aλ → ∞. As a → 0, f(H)/a → I and SOURCE/a is TracIn at that checkpoint (error O(aλ_max)).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import sourcetrace as st
from sourcetrace.curvature.base import CurvatureContext
from sourcetrace.curvature.kfac import EKFAC
from sourcetrace.data import Examples
from sourcetrace.errors import InvalidOptionError
from sourcetrace.grads import GradientCapture
from sourcetrace.methods.source import flow_residual, plan_segments

N_TRAIN, N_QUERY, D, C = 16, 4, 3, 3


@pytest.fixture(autouse=True, scope="module")
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)).double()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_QUERY, D, generator=g)
    y = torch.randint(0, C, (N_TRAIN + N_QUERY,), generator=g)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def train_run(train, stage_data, steps_each=(3, 3, 3, 3), lrs=(0.5, 0.4, 0.3, 0.2), stages=(0, 0, 1, 1),
              momentum=0.0, wd=0.0):
    """Full-batch SGD (torch.optim's update written out) through the stages, a checkpoint after each block."""
    model = mlp()
    x, y = train
    states, steps, done = [], [], 0
    buffers = [torch.zeros_like(p) for p in model.parameters()]
    for k, lr, s in zip(steps_each, lrs, stages):
        idx = stage_data[s]
        for _ in range(k):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, list(model.parameters()))
            with torch.no_grad():
                for p, g, b in zip(model.parameters(), grads, buffers):
                    b.mul_(momentum).add_(g + wd * p)
                    p.sub_(lr * b)
        done += k
        states.append(copy.deepcopy(model.state_dict()))
        steps.append(done)
    return model, states, steps


# ---- the independent reference: exact GGN, per-example gradients with torch.func ----------------------
def flat_params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def per_example_grads(model, fn, x, y):
    params = flat_params(model)

    def one(xi, yi):
        g = torch.func.grad(lambda p: fn(functional_call(model, p, (xi[None],))[0], yi))(params)
        return torch.cat([v.reshape(-1) for v in g.values()])

    return torch.stack([one(xi, yi) for xi, yi in zip(x, y)])


def ce(logits, y):
    return -torch.log_softmax(logits, 0)[y]


def margin(logits, y):
    others = torch.cat([logits[:y], logits[y + 1:]])
    return logits[y] - torch.logsumexp(others, 0)


def ggn(model, x):
    """mean_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i, J_i the Jacobian of example i's logits (cross-entropy GGN)."""
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(flat_params(model))
    j = torch.cat([v.reshape(len(x), C, -1) for v in jac.values()], 2)  # [B, C, P]
    p = torch.softmax(model(x), 1).detach()
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("bcp,bcd,bdq->pq", j, h, j) / len(x)


def at(state):
    m = mlp()
    m.load_state_dict(state)
    return m


def reference(final, states, segments, train, queries, stage_data, momentum, wd):
    """score = −Σ_l (N/N_s)/|C_l| Σ_{c∈l} (f_l(H̄_l) S_{l+1}⋯S_L q)ᵀ g_c(i) over the stage's examples."""
    x, y = train
    q = per_example_grads(final, margin, *queries)
    total = torch.zeros(len(queries[0]), N_TRAIN)
    v = q
    for members, stage, k, lr in reversed(segments):
        models = [at(states[c]) for c in members]
        idx = stage_data[stage]
        h = sum(ggn(m, x[idx]) for m in models) / len(models) + wd * torch.eye(q.shape[1])
        lam, u = torch.linalg.eigh(h)
        a = lr * k / (1 - momentum)
        f = (1 - torch.exp(-a * lam)) / lam
        mask = torch.zeros(N_TRAIN)
        mask[idx] = 1
        for m in models:
            g = per_example_grads(m, ce, x, y)
            total -= (N_TRAIN / len(idx)) / len(models) * ((v @ u) * f @ u.T) @ g.T * mask
        v = (v @ u) * torch.exp(-a * lam) @ u.T
    return total


def source(final, train, **kw):
    return st.Attributor(final, st.ClassificationTask(), method="source", progress=False,
                         store_dtype="float64", batch_size=5, **kw).fit(train)


def close(a, b, tol):
    return float((a - b).norm() / b.norm()) < tol


# ---- tests ------------------------------------------------------------------------------------------
def test_plan_segments_groups_within_stages():
    segs = plan_segments([2, 4, 6, 8, 10, 12], [1, 1, 1, 0.5, 0.5, 0.5], None, 3)
    assert [s.checkpoints for s in segs] == [[0, 1], [2, 3], [4, 5]]
    assert [s.steps for s in segs] == [4, 4, 4] and [s.lr for s in segs] == [1, 0.75, 0.5]
    segs = plan_segments([3, 6, 9, 12], [1] * 4, [0, 0, 1, 1], 3)
    assert [(s.checkpoints, s.stage) for s in segs] == [([0], 0), ([1], 0), ([2, 3], 1)]
    assert [s.checkpoints for s in plan_segments([3, 6, 9, 12], [1] * 4, [0, 0, 1, 1], 1)] == [[0, 1], [2, 3]]
    with pytest.raises(InvalidOptionError, match="crosses a stage"):
        plan_segments([3, 6, 9, 12], [1] * 4, [0, 0, 1, 1], [1, 2, 1])


def test_source_equals_explicit_ggn_formula_multistage(data):
    """Two stages (stage 0 on 10 examples), three segments, momentum and weight decay: the walked-back
    query, the residuals, the per-stage masks and N/N_s all against an independent exact-GGN computation."""
    train, queries = data
    stage_data = [torch.arange(10), torch.arange(N_TRAIN)]
    momentum, wd = 0.3, 0.01
    final, states, steps = train_run(train, stage_data, momentum=momentum, wd=wd)
    lrs = [0.5, 0.4, 0.3, 0.2]
    attr = source(final, train, checkpoints=states, learning_rates=lrs, steps=steps, stages=[0, 0, 1, 1],
                  stage_examples=[list(range(10)), None], momentum=momentum, weight_decay=wd,
                  curvature="explicit")
    got = attr.score(queries).matrix
    segments = [([0], 0, 3, 0.5), ([1], 0, 3, 0.4), ([2, 3], 1, 6, 0.25)]
    want = reference(final, states, segments, train, queries, stage_data, momentum, wd)
    assert close(got, want, 1e-8)
    assert (got[:, 10:] != 0).all()  # stage-1 examples are scored by the last segment only


def test_adam_variant_equals_the_nonsymmetric_formula(data):
    """Preconditioned steps θ −= η(P∇L + λθ) (AdamW): per segment B = P̄H̄ + λI, residual B⁻¹(I − e^{−aB})P̄ ḡ
    and Jacobian e^{−aB}, computed here with matrix_exp of the non-symmetric B; SOURCE works with the
    symmetric P^½ H P^½ instead."""
    train, queries = data
    stage_data = [torch.arange(10), torch.arange(N_TRAIN)]
    final, states, steps = train_run(train, stage_data)
    gen = torch.Generator().manual_seed(5)
    pres = [{n: torch.exp(torch.randn(p.shape, generator=gen)) for n, p in final.named_parameters()}
            for _ in states]
    wd, lrs = 0.05, [0.5, 0.4, 0.3, 0.2]
    got = source(final, train, checkpoints=states, learning_rates=lrs, steps=steps, stages=[0, 0, 1, 1],
                 stage_examples=[list(range(10)), None], weight_decay=wd, decoupled_weight_decay=True,
                 preconditioners=pres, curvature="explicit").score(queries).matrix
    x, y = train
    v = per_example_grads(final, margin, *queries)
    want = torch.zeros(N_QUERY, N_TRAIN)
    eye = torch.eye(v.shape[1])
    for members, stage, k, lr in reversed([([0], 0, 3, 0.5), ([1], 0, 3, 0.4), ([2, 3], 1, 6, 0.25)]):
        models = [at(states[c]) for c in members]
        idx = stage_data[stage]
        h = sum(ggn(m, x[idx]) for m in models) / len(models)
        pbar = sum(torch.cat([pres[c][n].reshape(-1) for n, _ in final.named_parameters()])
                   for c in members) / len(members)
        b = pbar[:, None] * h + wd * eye
        e = torch.linalg.matrix_exp(-lr * k * b)
        r = torch.linalg.solve(b, eye - e) * pbar[None, :]
        mask = torch.zeros(N_TRAIN)
        mask[idx] = 1
        for m in models:
            want -= (N_TRAIN / len(idx)) / len(models) * (v @ r) @ per_example_grads(m, ce, x, y).T * mask
        v = v @ e
    assert close(got, want, 1e-8)
    plain = source(final, train, checkpoints=states, learning_rates=lrs, steps=steps, stages=[0, 0, 1, 1],
                   stage_examples=[list(range(10)), None], weight_decay=wd, curvature="explicit")
    assert not close(plain.score(queries).matrix, want, 0.1)  # the preconditioner matters


def test_one_segment_is_ekfac_influence_with_damping_one_over_horizon(data):
    """L = 1, one checkpoint (the final model): SOURCE(q) = EK-FAC influence (δ = 1/a) of φ(aH) q."""
    train, queries = data
    final = mlp()
    a = 40.0  # η̄K: 20 steps at 2.0
    src = source(final, train, checkpoints=[final.state_dict()], learning_rates=[2.0], steps=[20], segments=1)
    inf = st.Attributor(final, st.ClassificationTask(), method="ekfac", progress=False, store_dtype="float64",
                        batch_size=5, damping=1 / a).fit(train)
    curv = inf.method.preconditioners[0]
    cap = GradientCapture(final)
    q = cap.flat(st.ClassificationTask().measurement, queries)
    g = cap.flat(st.ClassificationTask().train_loss, train)

    def phi(eig):
        x = a * eig
        return torch.where(x > 0, (1 + 1 / x.clamp_min(1e-300)) * -torch.expm1(-x), torch.ones_like(x))

    got = src.score(queries).matrix
    assert close(got, -curv.apply(curv.apply_fn(q, phi)) @ g.T, 1e-9)
    grid = torch.logspace(-6, 6, 200)
    assert (phi(grid / a) >= 1 - 1e-12).all() and (phi(grid / a) < 1.3).all()
    assert abs(float(phi(torch.tensor([1e-8 / a]))) - 1) < 1e-6
    assert abs(float(phi(torch.tensor([1e4 / a]))) - 1) < 1e-3
    assert not close(got, inf.score(queries).matrix, 1e-3)  # φ matters at this horizon


def test_small_horizon_approaches_tracin(data):
    """a = η̄K → 0: SOURCE / a → TracIn at the checkpoint (lr 1), with error shrinking linearly in a."""
    train, queries = data
    final = mlp()
    state = final.state_dict()
    tracin = st.Attributor(final, st.ClassificationTask(), method="tracin", progress=False,
                           store_dtype="float64", checkpoints=[state], learning_rates=[1.0]).fit(train)
    want = tracin.score(queries).matrix
    errors = []
    for a in (1e-2, 1e-3):
        got = source(final, train, checkpoints=[state], learning_rates=[a], steps=[1], segments=1,
                     curvature_options={"fisher": "empirical"}).score(queries).matrix / a
        errors.append(float((got - want).norm() / want.norm()))
    assert errors[1] < 1e-2 and 7 < errors[0] / errors[1] < 13


def test_fit_average_averages_factors_and_eigenvalues(data):
    """EK-FAC over two models: A, S averaged; eigenvalues = mean over models of (Q_Sᵀ G Q_A)² per example."""
    train, _ = data
    task = st.ClassificationTask()
    models = [mlp(0), mlp(1)]
    ctxs = [CurvatureContext(m, task, GradientCapture(m), Examples(train), batch_size=5, progress=False)
            for m in models]
    singles = []
    for c in ctxs:
        e = EKFAC(fisher="empirical")
        e.fit(c)
        singles.append(e)
    avg = EKFAC(fisher="empirical")
    avg.fit_average(ctxs)
    for k, b in enumerate(avg.blocks):
        a_mean = sum(s.blocks[k].a_sum / s.blocks[k].a_count for s in singles) / 2
        s_mean = sum(s.blocks[k].s_sum / s.blocks[k].s_count for s in singles) / 2
        assert torch.allclose(b.qa @ torch.diag(b.ea) @ b.qa.T, a_mean, atol=1e-10)
        assert torch.allclose(b.qs @ torch.diag(b.es) @ b.qs.T, s_mean, atol=1e-10)
        lam = 0
        for c in ctxs:
            g = c.capture.per_example(task.train_loss, (train[0], train[1]))
            w, bias = g[b.weight], g[b.bias]
            mat = torch.cat([w, bias[:, :, None]], 2)
            lam = lam + (b.qs.T @ mat @ b.qa).pow(2).mean(0) / 2
        assert torch.allclose(b.eig, lam, atol=1e-12)
    for b in avg.blocks:  # f(F) with f = 1/(λ + δ) is apply()
        b.damp = 0.1
    v = torch.randn(3, ctxs[0].capture.dim)
    assert torch.allclose(avg.apply_fn(v, lambda e: 1 / (e + 0.1)), avg.apply(v))


def test_flow_residual_is_stable_at_zero():
    f = flow_residual(5.0)
    assert torch.allclose(f(torch.tensor([0.0, 1e-20, 1e-8, 1.0])),
                          torch.tensor([5.0, 5.0, 5.0 * (1 - 2.5e-8), 1 - torch.exp(torch.tensor(-5.0))]))


def test_options_are_checked():
    m = mlp()
    with pytest.raises(InvalidOptionError, match="steps"):
        st.Attributor(m, st.ClassificationTask(), method="source", checkpoints=[m.state_dict()],
                      learning_rates=[0.1])
    with pytest.raises(InvalidOptionError, match="covers no optimizer steps"):
        st.Attributor(m, st.ClassificationTask(), method="source", checkpoints=[m.state_dict()] * 2,
                      learning_rates=[0.1, 0.1], steps=[0, 0])
    with pytest.raises(InvalidOptionError, match="one entry per stage"):
        st.Attributor(m, st.ClassificationTask(), method="source", checkpoints=[m.state_dict()] * 2,
                      learning_rates=[0.1, 0.1], steps=[1, 2], stages=[0, 1], stage_examples=[None])
    assert "source" in st.available_methods()


def test_options_from_a_recorded_trajectory(data, tmp_path):
    """Steps, mean learning rates, momentum, weight decay, stages and stage data read from the recorder."""
    from sourcetrace.methods.source import trajectory_options
    from sourcetrace.trajectory import Trajectory, TrajectoryRecorder

    train, _ = data
    x, y = train
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.2, weight_decay=0.01)
    rec = TrajectoryRecorder(tmp_path / "traj", model, opt, at_steps=[2, 4, 6, 8])
    stage_ids = [list(range(0, 10, 2)), list(range(N_TRAIN))]  # stage 0 sees the even examples < 10 only
    for step in range(8):
        if step == 4:
            rec.stage("fine-tune")
        ids = stage_ids[step // 4][step % 2::2]
        for group in opt.param_groups:
            group["lr"] = 0.5 / (step + 1)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
        opt.step()
        rec.step(model, opt, ids)
    rec.finish(model, opt)
    options = trajectory_options(Trajectory.load(tmp_path / "traj"), train_ids=list(range(N_TRAIN)))
    assert options["steps"] == [2, 4, 6, 8] and options["stages"] == [0, 0, 1, 1]
    assert options["stage_examples"] == [[0, 2, 4, 6, 8], None]
    want = [(0.5 / (2 * k + 1) + 0.5 / (2 * k + 2)) / 2 for k in range(4)]
    assert torch.allclose(torch.tensor(options["learning_rates"]), torch.tensor(want))
    assert options["momentum"] == 0.2 and options["weight_decay"] == 0.01
    last = options["checkpoints"][-1]
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())


def test_adam_options_from_a_recorded_trajectory(data, tmp_path):
    """An AdamW run: preconditioners 1/(√v̂ + ε) from each checkpoint's second moments, decoupled decay."""
    from sourcetrace.methods.source import trajectory_options
    from sourcetrace.trajectory import Trajectory, TrajectoryRecorder

    train, queries = data
    x, y = train
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, eps=1e-6)
    rec = TrajectoryRecorder(tmp_path / "traj", model, opt, at_steps=[3, 6])
    for step in range(6):
        ids = list(range(step % 2, N_TRAIN, 2))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
        opt.step()
        rec.step(model, opt, ids)
    rec.finish(model, opt)
    options = trajectory_options(Trajectory.load(tmp_path / "traj"))
    assert options["decoupled_weight_decay"] and options["momentum"] == 0.0 and options["weight_decay"] == 0.1
    last = options["preconditioners"][-1]
    for name, p in model.named_parameters():
        v_hat = opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** 6)
        want = 1 / (v_hat.sqrt() + 1e-6)
        torch.testing.assert_close(last[name], want.clamp_max(100 * want.median()))
    scores = source(model, train, **options).score(queries).matrix
    assert scores.shape == (N_QUERY, N_TRAIN) and torch.isfinite(scores).all()


def test_trajectory_option(data, tmp_path):
    """source with trajectory= equals source with the options read from it (stages need the data's ids)."""
    from sourcetrace.methods.source import trajectory_options
    from sourcetrace.trajectory import Trajectory, TrajectoryRecorder

    train, queries = data
    x, y = train
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    rec = TrajectoryRecorder(tmp_path / "traj", model, opt, checkpoint_every=2)
    for step in range(8):
        if step == 4:
            rec.stage("all")
        ids = list(range(0, 10, 2)) if step < 4 else list(range(step % 2, N_TRAIN, 2))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
        opt.step()
        rec.step(model, opt, ids)
    rec.finish(model, opt)
    traj = Trajectory.load(tmp_path / "traj")
    got = source(model, train, trajectory=traj).score(queries).matrix
    want = source(model, train, **trajectory_options(traj, list(range(N_TRAIN)))).score(queries).matrix
    torch.testing.assert_close(got, want)
    # a workdir keeps the trajectory's fingerprint: refitting, or a new Attributor on it, reuses it
    attr = st.Attributor(model, st.ClassificationTask(), "source", workdir=tmp_path / "w", progress=False,
                         store_dtype="float64", batch_size=5, trajectory=traj)
    attr.fit(train)
    attr.fit(train)
    again = st.Attributor(model, st.ClassificationTask(), "source", workdir=tmp_path / "w", progress=False,
                          store_dtype="float64", batch_size=5, trajectory=tmp_path / "traj")
    torch.testing.assert_close(again.fit(train).score(queries).matrix, want)

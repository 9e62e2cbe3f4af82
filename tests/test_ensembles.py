"""Retraining engine: subsets, leave-one-out, caching and resume, checked against closed-form ridge."""

from __future__ import annotations

import numpy as np
import pytest

from sourcetrace.ensembles import LeaveOneOut, SubsetRetraining, retrain_leave_one_out, retrain_subsets
from sourcetrace.errors import (
    EmptyDataError,
    InvalidOptionError,
    NonFiniteError,
    ShapeError,
    WorkdirMismatchError,
)

N_TRAIN, DIM, LAM = 24, 4, 0.5


@pytest.fixture(scope="module")
def ridge():
    """A tiny ridge regression, trained in closed form, and its query measurement (negative squared error)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN, DIM))
    y = x @ rng.normal(size=DIM) + 0.3 * rng.normal(size=N_TRAIN)
    xq = rng.normal(size=(3, DIM))
    yq = xq @ rng.normal(size=DIM)

    def train(indices: np.ndarray, seed: int) -> np.ndarray:
        xi, yi = x[indices], y[indices]
        w = np.linalg.solve(xi.T @ xi + LAM * np.eye(DIM), xi.T @ yi)
        return w + 1e-3 * np.random.default_rng(seed).normal(size=DIM)  # seeds give different models

    def measure(w: np.ndarray) -> np.ndarray:
        return -((xq @ w - yq) ** 2)

    return x, y, xq, yq, train, measure


class Counting:
    """Wraps train_fn, records what it trained and fails after `fail_after` calls (a killed run)."""

    def __init__(self, train, fail_after: int | None = None):
        self.train, self.fail_after = train, fail_after
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def __call__(self, indices, seed):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("killed")
        self.calls.append((tuple(indices.tolist()), seed))
        return self.train(indices, seed)


def test_subsets_shapes_sizes_and_seed_mean(ridge):
    *_, train, measure = ridge
    gt = retrain_subsets(train, measure, N_TRAIN, n_subsets=5, fraction=0.25, seeds=(0, 1), progress=False)
    assert gt.masks.dtype == bool and gt.masks.shape == (5, N_TRAIN)
    assert (gt.masks.sum(axis=1) == 6).all()
    assert gt.per_seed.shape == (5, 2, 3) and gt.measurements.shape == (5, 3)
    np.testing.assert_allclose(gt.measurements, gt.per_seed.mean(axis=1))
    assert not np.allclose(gt.per_seed[:, 0], gt.per_seed[:, 1])
    # Each entry is the measurement of a model trained on exactly that subset with that seed.
    np.testing.assert_allclose(gt.per_seed[3, 1], measure(train(np.flatnonzero(gt.masks[3]), 1)))
    again = retrain_subsets(train, measure, N_TRAIN, n_subsets=5, fraction=0.25, seeds=(0, 1), progress=False)
    np.testing.assert_array_equal(again.masks, gt.masks)
    other = retrain_subsets(
        train, measure, N_TRAIN, n_subsets=5, fraction=0.25, seeds=(0, 1), seed=1, progress=False
    )
    assert not np.array_equal(other.masks, gt.masks)


def test_leave_one_out_equals_closed_form(ridge):
    x, y, xq, yq, train, measure = ridge
    indices = [0, 5, 7, 23]
    gt = retrain_leave_one_out(
        lambda idx, s: train(idx, 0), measure, N_TRAIN, indices, seeds=(0,), progress=False
    )
    # Sherman-Morrison: without example i, w_-i = w - H^-1 x_i r_i / (1 - h_i).
    h_inv = np.linalg.inv(x.T @ x + LAM * np.eye(DIM))
    w = h_inv @ x.T @ y + 1e-3 * np.random.default_rng(0).normal(size=DIM)
    w_exact = h_inv @ x.T @ y
    expected = []
    for i in indices:
        r = y[i] - x[i] @ w_exact
        w_minus = w - h_inv @ x[i] * r / (1.0 - x[i] @ h_inv @ x[i])
        expected.append(measure(w) - measure(w_minus))
    np.testing.assert_allclose(gt.effect, np.array(expected), rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(gt.indices, indices)
    assert gt.n_train == N_TRAIN and gt.full.shape == (3,) and gt.removed.shape == (4, 3)


def test_interrupted_subsets_resume_without_retraining(ridge, tmp_path):
    *_, train, measure = ridge
    kw = dict(n_subsets=6, seeds=(0, 1), fingerprint="ridge-v1", progress=False)
    reference = retrain_subsets(train, measure, N_TRAIN, **kw)

    first = Counting(train, fail_after=5)
    with pytest.raises(RuntimeError, match="killed"):
        retrain_subsets(first, measure, N_TRAIN, workdir=tmp_path, **kw)
    second = Counting(train)
    resumed = retrain_subsets(second, measure, N_TRAIN, workdir=tmp_path, **kw)
    assert len(first.calls) == 5 and len(second.calls) == 12 - 5
    assert not set(first.calls) & set(second.calls)
    np.testing.assert_array_equal(resumed.masks, reference.masks)
    np.testing.assert_array_equal(resumed.per_seed, reference.per_seed)
    np.testing.assert_array_equal(resumed.measurements, reference.measurements)

    third = Counting(train)
    cached = retrain_subsets(third, measure, N_TRAIN, workdir=tmp_path, **kw)
    assert third.calls == []
    np.testing.assert_array_equal(cached.per_seed, reference.per_seed)


def test_interrupted_leave_one_out_resumes(ridge, tmp_path):
    *_, train, measure = ridge
    kw = dict(seeds=(0, 1), progress=False)
    reference = retrain_leave_one_out(train, measure, N_TRAIN, [1, 2, 3], **kw)
    first = Counting(train, fail_after=3)
    with pytest.raises(RuntimeError):
        retrain_leave_one_out(first, measure, N_TRAIN, [1, 2, 3], workdir=tmp_path, **kw)
    second = Counting(train)
    resumed = retrain_leave_one_out(second, measure, N_TRAIN, [1, 2, 3], workdir=tmp_path, **kw)
    assert len(second.calls) == 8 - 3
    np.testing.assert_array_equal(resumed.removed_per_seed, reference.removed_per_seed)
    np.testing.assert_array_equal(resumed.full, reference.full)


def test_workdir_made_with_other_settings_is_refused(ridge, tmp_path):
    *_, train, measure = ridge
    kw = dict(seeds=(0,), progress=False)
    retrain_subsets(train, measure, N_TRAIN, n_subsets=3, workdir=tmp_path, fingerprint="a", **kw)
    with pytest.raises(WorkdirMismatchError, match="n_subsets.*overwrite=True"):
        retrain_subsets(train, measure, N_TRAIN, n_subsets=4, workdir=tmp_path, fingerprint="a", **kw)
    with pytest.raises(WorkdirMismatchError, match="fingerprint"):
        retrain_subsets(train, measure, N_TRAIN, n_subsets=3, workdir=tmp_path, fingerprint="b", **kw)
    with pytest.raises(WorkdirMismatchError, match="kind"):
        retrain_leave_one_out(train, measure, N_TRAIN, [0, 1], workdir=tmp_path, fingerprint="a", **kw)
    counting = Counting(train)
    gt = retrain_subsets(
        counting, measure, N_TRAIN, n_subsets=4, workdir=tmp_path, fingerprint="a", overwrite=True, **kw
    )
    assert len(counting.calls) == 4 and gt.masks.shape == (4, N_TRAIN)

    loo_dir = tmp_path / "loo"
    retrain_leave_one_out(train, measure, N_TRAIN, [0, 1], workdir=loo_dir, **kw)
    with pytest.raises(WorkdirMismatchError, match="indices"):
        retrain_leave_one_out(train, measure, N_TRAIN, [0, 2], workdir=loo_dir, **kw)


def test_save_load_round_trip(ridge, tmp_path):
    *_, train, measure = ridge
    gt = retrain_subsets(train, measure, N_TRAIN, n_subsets=3, seeds=(0, 1), progress=False)
    back = SubsetRetraining.load(gt.save(tmp_path / "subsets"))
    for name in ("masks", "measurements", "per_seed"):
        np.testing.assert_array_equal(getattr(back, name), getattr(gt, name))
    assert back.masks.dtype == bool

    out = retrain_leave_one_out(train, measure, N_TRAIN, [4, 2], seeds=(0, 1), progress=False)
    back_loo = LeaveOneOut.load(out.save(tmp_path / "loo"))
    assert back_loo.n_train == N_TRAIN
    for name in ("indices", "full", "removed", "full_per_seed", "removed_per_seed"):
        np.testing.assert_array_equal(getattr(back_loo, name), getattr(out, name))
    with pytest.raises(InvalidOptionError, match="leave-one-out"):
        SubsetRetraining.load(tmp_path / "loo")


def test_bad_input_errors(ridge):
    *_, train, measure = ridge
    kw = dict(progress=False)
    with pytest.raises(EmptyDataError):
        retrain_subsets(train, measure, 0, **kw)
    with pytest.raises(InvalidOptionError, match="fraction"):
        retrain_subsets(train, measure, N_TRAIN, fraction=1.0, **kw)
    with pytest.raises(InvalidOptionError, match="seeds"):
        retrain_subsets(train, measure, N_TRAIN, seeds=(), **kw)
    with pytest.raises(InvalidOptionError, match="n_subsets"):
        retrain_subsets(train, measure, N_TRAIN, n_subsets=1, **kw)
    with pytest.raises(EmptyDataError, match="indices"):
        retrain_leave_one_out(train, measure, N_TRAIN, [], **kw)
    with pytest.raises(ShapeError, match="0..23"):
        retrain_leave_one_out(train, measure, N_TRAIN, [3, N_TRAIN], **kw)

    lengths = iter([3, 2])
    with pytest.raises(ShapeError, match="same queries"):
        retrain_subsets(train, lambda w: np.zeros(next(lengths)), N_TRAIN, n_subsets=2, seeds=(0,), **kw)
    with pytest.raises(ShapeError, match="one value per query"):
        retrain_subsets(train, lambda w: np.zeros((2, 2)), N_TRAIN, n_subsets=2, seeds=(0,), **kw)
    with pytest.raises(NonFiniteError):
        retrain_subsets(train, lambda w: np.array([np.nan]), N_TRAIN, n_subsets=2, seeds=(0,), **kw)


# ---- encoded ensembles -------------------------------------------------------------------------------
def _ensemble(n_train=12, n_members=6):
    import torch

    from sourcetrace.diffusion import EpsMLP
    from sourcetrace.ensembles import EncodedEnsemble, balanced_codes

    codes = balanced_codes(n_train, n_members, seed=1)
    members = []
    for j in range(n_members):
        torch.manual_seed(j)
        members.append(EpsMLP((1, 3, 3), hidden=8, depth=2).double())
    return EncodedEnsemble(members, codes)


def test_codes_are_balanced_and_unique():
    from sourcetrace.ensembles import balanced_codes

    for n, e in ((20, 6), (3432, 14), (100, 20)):
        codes = balanced_codes(n, e, seed=3)
        assert codes.shape == (n, e) and codes.dtype == bool
        assert (codes.sum(1) == e // 2).all()
        assert len({row.tobytes() for row in codes}) == n
    assert (balanced_codes(30, 8, seed=0) == balanced_codes(30, 8, seed=0)).all()
    with pytest.raises(InvalidOptionError, match="n_members >= 10"):
        balanced_codes(100, 8)
    with pytest.raises(InvalidOptionError, match="even"):
        balanced_codes(5, 5)


def test_code_draws_of_other_seeds_differ_and_stay_balanced_and_unique():
    """The validity benchmark's code draws (seeds 0..7, 64 and 128 members for 200 examples): new codes,
    each draw balanced and unique."""
    from sourcetrace.ensembles import balanced_codes

    for e in (64, 128):
        draws = [balanced_codes(200, e, seed=s) for s in range(8)]
        for codes in draws:
            assert (codes.sum(1) == e // 2).all() and len({row.tobytes() for row in codes}) == 200
        for a in range(8):
            for b in range(a + 1, 8):
                assert (draws[a] != draws[b]).any(1).mean() > 0.99  # almost every example gets a new code


def test_ensemble_sampler_equals_averaging_members_by_hand():
    import torch

    from sourcetrace.diffusion import StoredNoise, linear_schedule

    ens = _ensemble()
    ab = linear_schedule(50)
    noise = StoredNoise.draw(2, (1, 3, 3), num_steps=5, seed=0)
    noise = StoredNoise(noise.start.double(), noise.steps.double())
    for kind in ("ddim", "ddpm"):
        got = ens.sample(noise, ab, kind=kind)
        # by hand: the same reverse process with the members' ε averaged explicitly
        x = noise.start
        ts = [40, 30, 20, 10, 0]
        for k, t in enumerate(ts):
            tt = torch.full((2,), t)
            eps = sum(m(x, tt) for m in ens.members) / ens.n_members
            a_t, a_p = ab[t], (ab[t - 10] if t >= 10 else torch.tensor(1.0, dtype=torch.float64))
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            if kind == "ddim":
                x = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps
            else:
                beta = 1 - a_t / a_p
                x = a_p.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_p) / (1 - a_t) * x
                if t > 0:
                    x = x + ((1 - a_p) / (1 - a_t) * beta).sqrt() * noise.steps[k]
        torch.testing.assert_close(got, x)
    # a counterfactual uses only the members that did not see the example
    i = 4
    kept = [m for j, m in enumerate(ens.members) if not ens.codes[i, j]]
    sub = type(ens)(kept, ens.codes[:, ~ens.codes[i]])
    torch.testing.assert_close(ens.counterfactual(noise, ab, i), sub.sample(noise, ab))


def test_influence_is_distance_to_each_counterfactual():
    import torch

    from sourcetrace.diffusion import StoredNoise, linear_schedule

    ens = _ensemble()
    ab = linear_schedule(50)
    noise = StoredNoise.draw(3, (1, 3, 3), num_steps=5, seed=2)
    noise = StoredNoise(noise.start.double(), noise.steps.double())
    scores = ens.influence(noise, ab, chunk=5, progress=False)
    full = ens.sample(noise, ab)
    for i in (0, 7, 11):
        want = (ens.counterfactual(noise, ab, i) - full).reshape(3, -1).norm(dim=1)
        torch.testing.assert_close(scores.matrix[:, i], want.float())
    assert scores.metadata["radius"] == pytest.approx(scores.matrix.max(1).values.tolist())
    embedded = ens.influence(noise, ab, embed=lambda x: x.reshape(len(x), -1)[:, :2], progress=False)
    assert embedded.metadata["distance"] == "embedding" and (embedded.matrix <= scores.matrix + 1e-6).all()


def test_weight_jvp_equals_finite_differences():
    import torch

    from sourcetrace.diffusion import StoredNoise, linear_schedule

    ens = _ensemble()
    ab = linear_schedule(50)
    noise = StoredNoise.draw(2, (1, 3, 3), num_steps=5, seed=0)
    noise = StoredNoise(noise.start.double(), noise.steps.double())
    jac = ens.weight_jacobian(noise, ab, kind="ddpm")
    w0, h = ens.uniform_weights().double(), 1e-6
    for j in range(ens.n_members):
        e = torch.eye(ens.n_members, dtype=torch.float64)[j]
        fd = (ens.sample(noise, ab, weights=w0 + h * e, kind="ddpm")
              - ens.sample(noise, ab, weights=w0 - h * e, kind="ddpm")) / (2 * h)
        torch.testing.assert_close(jac["jacobian"][j], fd, rtol=1e-5, atol=1e-7)
    diff = ens.differential_ablation(noise, ab, kind="ddpm")
    delta = ens.weights_without(3).double() - w0
    want = torch.einsum("e,e...->...", delta, jac["jacobian"]).reshape(2, -1).norm(dim=1)
    torch.testing.assert_close(diff.matrix[:, 3], want.float())


def test_ablation_scores_match_retraining_by_dropping_members():
    import torch

    from sourcetrace.diffusion import DiffusionTask, diffusion_examples, linear_schedule

    ens = _ensemble()
    task = DiffusionTask(linear_schedule(50), timesteps=3)
    queries = diffusion_examples(torch.rand(2, 1, 3, 3).double(), ids=["a", "b"])
    scores = ens.ablation_scores(task, queries)
    batch = task.collate(queries)
    batch["x"] = batch["x"].double()

    def measure(members):
        outs = torch.stack([task.outputs(m, batch) for m in members]).mean(0)
        return -(outs - batch["noise"].double()).pow(2).reshape(2, -1).mean(1)

    for i in (0, 5):
        kept = [m for j, m in enumerate(ens.members) if not ens.codes[i, j]]
        torch.testing.assert_close(scores.matrix[:, i].double(), measure(ens.members) - measure(kept),
                                   rtol=1e-4, atol=1e-6)
    with pytest.raises(InvalidOptionError, match="no member is left"):
        ens.weights_without(list(range(12)))


def test_members_are_cached_and_resumed(tmp_path):
    import torch

    from sourcetrace.diffusion import EpsMLP
    from sourcetrace.ensembles import balanced_codes, train_members

    codes = balanced_codes(6, 4, seed=0)
    calls = []

    def train(indices, j):
        calls.append(j)
        torch.manual_seed(100 + j)
        return EpsMLP((4,), hidden=4, depth=1)

    first = train_members(train, codes, workdir=tmp_path, build_fn=lambda: EpsMLP((4,), hidden=4, depth=1),
                          progress=False)
    again = train_members(train, codes, workdir=tmp_path, build_fn=lambda: EpsMLP((4,), hidden=4, depth=1),
                          progress=False)
    assert calls == [0, 1, 2, 3]
    for a, b in zip(first, again):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
    with pytest.raises(WorkdirMismatchError):
        train_members(train, balanced_codes(5, 4, seed=1), workdir=tmp_path, build_fn=lambda: None,
                      progress=False)

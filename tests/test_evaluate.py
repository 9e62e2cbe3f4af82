"""LDS and leave-one-out metrics, checked against scipy and against a retrained ridge regression."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from sourcetrace.ensembles import LeaveOneOut, SubsetRetraining, retrain_leave_one_out, retrain_subsets
from sourcetrace.errors import EmptyDataError, InvalidOptionError, NonFiniteError, ShapeError
from sourcetrace.evaluate import LDSResult, LOOResult, lds, loo


def datamodel(n_query=8, n_train=30, n_subsets=60, noise=0.0, seed=0):
    """Scores and subset measurements of a linear datamodel: measurement = sum of members' scores + noise."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_query, n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, rng.permutation(n_train)[: n_train // 2]] = True
    actual = 2.0 * masks @ scores.T + 1.0 + noise * rng.normal(size=(n_subsets, n_query))
    gt = SubsetRetraining(masks=masks, measurements=actual, per_seed=actual[:, None, :])
    return scores, gt


class FakeScores:
    """Stands in for sourcetrace.Scores: the metrics only read `.matrix`."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix


def test_lds_perfect_negated_and_random():
    scores, gt = datamodel()
    perfect = lds(scores, gt)
    assert isinstance(perfect, LDSResult)
    np.testing.assert_allclose(perfect.per_query, 1.0, atol=1e-12)
    assert perfect.mean == pytest.approx(1.0) and perfect.ci_low == pytest.approx(1.0)
    assert lds(-scores, gt).mean == pytest.approx(-1.0)

    scores, gt = datamodel(n_query=200, n_train=50, n_subsets=100)
    rand = np.random.default_rng(1).normal(size=scores.shape)
    result = lds(rand, gt)
    assert abs(result.mean) < 0.05
    assert result.ci_low < 0.0 < result.ci_high


def test_lds_agrees_with_scipy_loop():
    scores, gt = datamodel(noise=3.0, seed=3)
    scores = np.round(scores)  # integer scores make ties in the predicted sums
    result = lds(scores, gt)
    predicted = gt.masks.astype(float) @ scores.T
    expected = [stats.spearmanr(predicted[:, q], gt.measurements[:, q]).statistic for q in range(len(scores))]
    np.testing.assert_allclose(result.per_query, expected, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected))


def test_lds_accepts_scores_objects_and_tensors():
    scores, gt = datamodel(noise=2.0)
    expected = lds(scores, gt).per_query
    np.testing.assert_allclose(lds(torch.from_numpy(scores), gt).per_query, expected)
    np.testing.assert_allclose(lds(FakeScores(torch.from_numpy(scores)), gt).per_query, expected)
    as_float32 = lds(FakeScores(torch.from_numpy(scores).float()), gt).per_query
    np.testing.assert_allclose(as_float32, expected, atol=0.05)


def test_bootstrap_ci_contains_mean_and_narrows_with_more_queries():
    widths = []
    for n_query in (20, 400):
        rng = np.random.default_rng(n_query)
        scores, gt = datamodel(n_query=n_query, noise=0.0, seed=n_query)
        noisy = gt.measurements + rng.uniform(0, 30, size=n_query) * rng.normal(size=gt.measurements.shape)
        gt = SubsetRetraining(masks=gt.masks, measurements=noisy, per_seed=noisy[:, None, :])
        result = lds(scores, gt, n_bootstrap=500, seed=1)
        assert result.ci_low <= result.mean <= result.ci_high
        np.testing.assert_equal(lds(scores, gt, n_bootstrap=500, seed=1).ci_low, result.ci_low)  # seeded
        widths.append(result.ci_high - result.ci_low)
    assert widths[1] < widths[0] / 2


def test_constant_query_is_nan_and_left_out_with_warning():
    scores, gt = datamodel(n_query=4, noise=1.0)
    actual = gt.measurements.copy()
    actual[:, 2] = 5.0
    gt = SubsetRetraining(masks=gt.masks, measurements=actual, per_seed=actual[:, None, :])
    with pytest.warns(RuntimeWarning, match="1 of 4 queries"):
        result = lds(scores, gt)
    assert np.isnan(result.per_query[2]) and np.isfinite(result.per_query[[0, 1, 3]]).all()
    assert result.mean == pytest.approx(result.per_query[[0, 1, 3]].mean())
    assert np.isfinite([result.ci_low, result.ci_high]).all()


def test_lds_bad_input():
    scores, gt = datamodel(n_query=3, n_train=10)
    with pytest.raises(ShapeError, match=r"expected \[n_query, n_train\] = \[3, 10\]"):
        lds(scores.T, gt)
    with pytest.raises(ShapeError):
        lds(scores[0], gt)
    with pytest.raises(EmptyDataError):
        lds(np.zeros((0, 10)), gt)
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(NonFiniteError):
        lds(bad, gt)
    with pytest.raises(InvalidOptionError):
        lds(scores, gt, confidence=1.5)
    one = SubsetRetraining(masks=gt.masks[:1], measurements=gt.measurements[:1], per_seed=gt.per_seed[:1])
    with pytest.raises(EmptyDataError, match="subsets"):
        lds(scores, one)


def loo_truth(effect: np.ndarray, indices, n_train: int) -> LeaveOneOut:
    full = np.zeros(effect.shape[1])
    removed = full - effect
    return LeaveOneOut(
        indices=np.asarray(indices),
        full=full,
        removed=removed,
        n_train=n_train,
        full_per_seed=full[None],
        removed_per_seed=removed[:, None],
    )


def test_loo_sign_and_agreement_with_scipy():
    rng = np.random.default_rng(0)
    n_query, n_train, indices = 5, 20, [0, 3, 4, 9, 11, 12, 19]
    scores = rng.normal(size=(n_query, n_train))
    effect = scores[:, indices].T + 0.5 * rng.normal(size=(len(indices), n_query))
    gt = loo_truth(effect, indices, n_train)
    for method, corr in (("spearman", stats.spearmanr), ("pearson", stats.pearsonr)):
        result = loo(scores, gt, method=method)
        assert isinstance(result, LOOResult)
        expected = [corr(scores[q, indices], effect[:, q]).statistic for q in range(n_query)]
        np.testing.assert_allclose(result.per_query, expected, atol=1e-12)
    exact = loo_truth(scores[:, indices].T, indices, n_train)
    assert loo(scores, exact).mean == pytest.approx(1.0)
    assert loo(-scores, exact, method="pearson").mean == pytest.approx(-1.0)


def test_loo_bad_input():
    gt = loo_truth(np.ones((3, 2)) * np.arange(3)[:, None], [0, 1, 2], 6)
    with pytest.raises(ShapeError, match=r"\[2, 6\]"):
        loo(np.zeros((2, 5)), gt)
    with pytest.raises(InvalidOptionError):
        loo(np.zeros((2, 6)), gt, method="kendall")
    with pytest.warns(RuntimeWarning, match="2 of 2 queries"):
        assert np.isnan(loo(np.zeros((2, 6)), gt).mean)


def ridge_problem(n_train=40, dim=3, lam=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train, dim))
    y = x @ rng.normal(size=dim) + 0.5 * rng.normal(size=n_train)
    xq = rng.normal(size=(6, dim))
    yq = xq @ rng.normal(size=dim)

    def train(indices, seed):
        xi = x[indices]
        return np.linalg.solve(xi.T @ xi + lam * np.eye(dim), xi.T @ y[indices])

    def measure(w):
        return -((xq @ w - yq) ** 2)

    # Influence of up-weighting example i on query q: -grad m_q . H^-1 grad loss_i (positive = proponent).
    w = train(np.arange(n_train), 0)
    h_inv = np.linalg.inv(x.T @ x + lam * np.eye(dim))
    grad_m = -2.0 * (xq @ w - yq)[:, None] * xq
    grad_loss = (x @ w - y)[:, None] * x
    influence = -grad_m @ h_inv @ grad_loss.T
    return train, measure, influence


def test_influence_of_retrained_ridge_tracks_ground_truth():
    train, measure, influence = ridge_problem()
    gt = retrain_leave_one_out(train, measure, 40, np.arange(40), seeds=(0,), progress=False)
    assert loo(influence, gt).mean > 0.95
    assert loo(-influence, gt).mean < -0.9
    subsets = retrain_subsets(train, measure, 40, n_subsets=40, seeds=(0,), progress=False)
    assert lds(influence, subsets).mean > 0.8
    assert lds(-influence, subsets).mean < -0.5


def test_calibrate_recovers_the_scale_and_removal_effect_uses_it():
    from sourcetrace import Scores
    from sourcetrace.errors import ScoresError
    from sourcetrace.evaluate import calibrate

    rng = np.random.default_rng(0)
    n_train, n_query, m = 40, 3, 60
    matrix = rng.normal(size=(n_query, n_train))
    masks = rng.random((m, n_train)) < 0.5
    actual = np.array([5.0, -1.0, 2.0]) + 3.0 * masks @ matrix.T + 0.01 * rng.normal(size=(m, n_query))
    truth = SubsetRetraining(masks=masks, measurements=actual, per_seed=actual[:, None, :])
    cal = calibrate(matrix, truth)
    assert cal.scale == pytest.approx(3.0, rel=1e-3) and cal.r2 > 0.999
    np.testing.assert_allclose(cal.per_query, 3.0, rtol=1e-2)
    # the same numbers by ordinary least squares with an intercept per query
    for q in range(n_query):
        slope = np.polyfit(masks @ matrix[q], actual[:, q], 1)[0]
        assert cal.per_query[q] == pytest.approx(slope)
    scores = Scores(torch.tensor(matrix), [f"t{i}" for i in range(n_train)], ["a", "b", "c"], "grad-dot")
    with pytest.raises(ScoresError, match="calibrate"):
        scores.removal_effect(["t1"])
    effect = scores.removal_effect(["t1", "t4"], scale=cal.scale)
    torch.testing.assert_close(effect, -cal.scale * torch.tensor(matrix[:, [1, 4]].sum(1)))
    with pytest.raises(ScoresError, match="no training examples"):
        scores.removal_effect(["nope"], scale=1.0)
    with pytest.raises(ShapeError):
        calibrate(matrix[:, :5], truth)


def test_lds_matches_ground_truth_by_id_whatever_the_order():
    """Scores whose training and query columns are shuffled give the same LDS once matched by id."""
    import sourcetrace as st

    matrix, gt = datamodel(noise=2.0, seed=5)
    train_ids = [f"t{i}" for i in range(matrix.shape[1])]
    query_ids = [("q", i) for i in range(matrix.shape[0])]
    expected = lds(matrix, gt).per_query
    rng = np.random.default_rng(0)
    cols, rows = rng.permutation(matrix.shape[1]), rng.permutation(matrix.shape[0])
    shuffled = st.Scores(torch.from_numpy(matrix[rows][:, cols]), [train_ids[c] for c in cols],
                         [query_ids[r] for r in rows])
    matched = lds(shuffled, gt, train_ids=train_ids, query_ids=query_ids).per_query
    np.testing.assert_allclose(matched, expected, atol=1e-12)
    # taken in the order they come, the shuffled scores are wrong: the ids are what makes them right
    assert not np.allclose(lds(shuffled, gt).per_query[np.argsort(rows)], expected)


def test_loo_matches_by_id_too():
    import sourcetrace as st

    rng = np.random.default_rng(2)
    n_query, n_train, indices = 4, 12, [1, 2, 5, 7, 10]
    scores = rng.normal(size=(n_query, n_train))
    gt = loo_truth(scores[:, indices].T + 0.3 * rng.normal(size=(len(indices), n_query)), indices, n_train)
    expected = loo(scores, gt).per_query
    cols = rng.permutation(n_train)
    shuffled = st.Scores(torch.from_numpy(scores[:, cols]), [f"t{c}" for c in cols], list(range(n_query)))
    got = loo(shuffled, gt, train_ids=[f"t{i}" for i in range(n_train)], query_ids=list(range(n_query)))
    np.testing.assert_allclose(got.per_query, expected, atol=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_formula():
    from scipy.linalg import sqrtm

    from sourcetrace.evaluate import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu = a.mean(0) - b.mean(0)
    direct = mu @ mu + np.trace(sa + sb - 2 * np.real(sqrtm(sa @ sb)))
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient covariances (fewer rows than features) still give a finite, symmetric value
    c, d = rng.normal(size=(4, 10)), rng.normal(size=(5, 10))
    assert np.isfinite(frechet_distance(c, d))
    assert frechet_distance(c, d) == pytest.approx(frechet_distance(d, c), rel=1e-6)


def test_frechet_distance_bad_input():
    from sourcetrace.errors import EmptyDataError, NonFiniteError, ShapeError
    from sourcetrace.evaluate import frechet_distance

    with pytest.raises(ShapeError, match="same feature extractor"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ShapeError, match=r"\[N, D\]"):
        frechet_distance(np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(EmptyDataError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(NonFiniteError):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((5, 2)))

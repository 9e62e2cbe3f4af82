"""insights: each prediction against retraining or a brute-force computation, on a small convex setting."""

import numpy as np
import pytest
import torch

import sourcetrace as st
from sourcetrace import insights as ins
from sourcetrace.errors import EmptyDataError, InvalidOptionError, ScoresError, ShapeError
from sourcetrace.insights.planted import plant, tabular_data


@pytest.fixture(scope="module")
def planted():
    x, y, sub = tabular_data(n=900, seed=1)
    return plant(
        x, y, sub, name="small", n_train=400, n_query=160, n_pool=20, n_poison=20, n_slice=30, seed=1
    )


@pytest.fixture(scope="module")
def fitted(planted):
    s = planted.setting
    model = s.train()
    attr = st.Attributor(
        model, st.ClassificationTask(), "explicit", damping=s.wd, store_dtype="float64", progress=False
    )
    scores = attr.fit(s.examples(s.x_train, s.y_train)).score(s.examples(s.x_query, s.y_query))
    return model, s.margins(model), scores


def test_setting_weights_are_linear_and_training_converges(planted):
    s = planted.setting
    w = np.ones(s.n_train)
    w[:5] = 2.0
    doubled = s.margins(s.train(weights=w))
    extra = s.margins(s.train(extra=(s.x_train[:5], s.y_train[:5])))  # the same rows once more
    np.testing.assert_allclose(doubled, extra, atol=1e-6)
    model = s.train()
    x, y = s.examples(s.x_train, s.y_train)
    loss = torch.nn.functional.cross_entropy(model(x), y) + 0.5 * s.wd * sum(
        (p * p).sum() for p in model.parameters()
    )
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-6


def test_setting_roundtrip_and_errors(planted, tmp_path):
    s = planted.setting
    s.save(tmp_path / "s")
    back = ins.Setting.load(tmp_path / "s")
    np.testing.assert_array_equal(back.x_train, s.x_train)
    assert list(back.train_meta["source"]) == list(s.train_meta["source"])
    assert back.wd == s.wd and back.n_classes == s.n_classes
    with pytest.raises(FileNotFoundError, match="whatif FOLDER --example"):
        ins.Setting.load(tmp_path / "nothing")
    with pytest.raises(ShapeError):
        ins.Setting(np.zeros((3, 2)), [0, 1], np.zeros((1, 2)), [0])


def test_group_removal_is_scaled_group_sum_and_matches_retraining(planted, fitted):
    s = planted.setting
    model, margins, scores = fitted
    groups = s.train_meta["source"]
    removal = ins.group_removal(scores, groups, scale=1.0 / s.n_train)
    m = scores.matrix.numpy()
    for j, g in enumerate(removal.train_ids):
        want = -m[:, groups == g].sum(1) / s.n_train
        np.testing.assert_allclose(removal.matrix[:, j].numpy(), want, atol=1e-12)
    predicted, actual = [], []
    for j, g in enumerate(removal.train_ids[:6]):
        w = np.where(groups == g, 0.0, 1.0)
        actual.append(s.margins(s.train(weights=w)) - margins)
        predicted.append(removal.matrix[:, j].numpy())
    r = np.corrcoef(np.concatenate(predicted), np.concatenate(actual))[0, 1]
    assert r > 0.95
    with pytest.raises(ScoresError, match="pass scale="):
        ins.group_removal(scores, groups)
    assert ins.members(groups, "batch-P", list(range(s.n_train))) == list(planted.poison_rows)
    with pytest.raises(EmptyDataError):
        ins.members(groups, "nope", list(range(s.n_train)))


def test_feature_clusters_are_seeded_and_recover_separated_blobs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (30, 2)), rng.normal(5, 0.1, (30, 2))])
    a, b = ins.feature_clusters(x, 2, seed=3), ins.feature_clusters(x, 2, seed=3)
    np.testing.assert_array_equal(a, b)
    assert len(set(a[:30])) == 1 and len(set(a[30:])) == 1 and a[0] != a[-1]
    with pytest.raises(InvalidOptionError):
        ins.feature_clusters(x, 0)


def test_behaviour_metrics_by_hand():
    m = np.array([2.0, -1.0, 0.5, -3.0])
    b = ins.Behaviour("b", (0, 1), "margin")
    assert b.value(m) == pytest.approx(0.5)
    assert ins.Behaviour("b", (0, 1), "loss").value(m) == pytest.approx(
        (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(1.0))) / 2
    )
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    assert ins.Behaviour("b", (0, 1), "accuracy").value(m) == pytest.approx((sig(2.0) + sig(-1.0)) / 2)
    gap = ins.Behaviour.gap_between("g", [False, False, True, True], [True, True, False, False])
    assert gap.value(m) == pytest.approx((sig(2.0) + sig(-1.0)) / 2 - (sig(0.5) + sig(-3.0)) / 2)
    assert not gap.higher_is_better and gap.improvement(0.3, 0.1) == pytest.approx(0.2)
    assert ins.Behaviour.errors_on("e", [True, True, True, False], m).queries == (1,)
    assert b.error(m) == 0.5
    with pytest.raises(InvalidOptionError):
        ins.Behaviour("b", (0,), "f1")
    with pytest.raises(EmptyDataError):
        ins.Behaviour("b", (), "margin")
    with pytest.raises(ShapeError):
        ins.Behaviour("b", (9,), "margin").value(m)


def test_responsible_groups_rank_the_planted_source_first_and_removal_fixes_the_slice(planted, fitted):
    s = planted.setting
    model, margins, scores = fitted
    in_slice = s.query_meta["subclass"] == planted.slice_subclass
    b = ins.Behaviour("slice", tuple(np.flatnonzero(in_slice)), "margin")
    ranking = ins.responsible_groups(scores, s.train_meta["source"], b, margins, scale=1.0 / s.n_train)
    assert ranking.rank_of("batch-P") == 1
    top = ranking.table(1)[0]
    # the prediction is the metric at margins − scale·(group sums): recompute it
    cols = s.train_meta["source"] == "batch-P"
    want = b.value(margins - scores.matrix.numpy()[:, cols].sum(1) / s.n_train)
    assert top["predicted_after"] == pytest.approx(want)
    actual = b.value(s.margins(s.train(weights=np.where(cols, 0.0, 1.0))))
    assert b.improvement(ranking.before, actual) > 0
    assert top["predicted_improvement"] == pytest.approx(actual - ranking.before, rel=0.5)


def test_pool_columns_for_training_rows_equal_plain_influence_rescaled(planted, fitted):
    s = planted.setting
    model, margins, scores = fitted
    pool = ins.pool_scores(s, model, relabel=[(0, (int(s.y_train[0]) + 1) % s.n_classes)])
    n_pool = pool.scores.shape[1]
    assert n_pool == s.n_train + 1 + len(s.y_pool) and pool.scale == pytest.approx(1 / n_pool)
    np.testing.assert_allclose(
        pool.scores.matrix[:, : s.n_train].numpy() * pool.scale,
        scores.matrix.numpy() / s.n_train,
        rtol=1e-3,
        atol=2e-5,
    )  # ε rows in the curvature


def test_every_action_kind_predicts_the_retrained_margins(planted, fitted):
    s = planted.setting
    model, margins, scores = fitted
    rows = tuple(range(10))
    new = tuple(int((s.y_train[r] + 1) % s.n_classes) for r in rows)
    pool = ins.pool_scores(s, model, relabel=list(zip(rows, new)))
    actions = [
        ins.Action("remove", tuple(range(20, 40))),
        ins.Action("reweight", tuple(range(40, 60)), weight=3.0),
        ins.Action("relabel", rows, new),
        ins.Action("acquire", tuple(range(10))),
    ]
    for action in actions:
        dw = ins.actions.weight_change(action, pool)
        assert np.abs(dw).sum() == pytest.approx(
            {"remove": 20, "reweight": 40, "relabel": 20, "acquire": 10}[action.kind]
        )
        predicted = ins.predict_margins(action, pool)
        actual = s.margins(ins.apply(s, action)) - margins
        assert np.corrcoef(predicted, actual)[0, 1] > 0.9, action.kind
    b = ins.Behaviour("all", tuple(range(len(margins))), "loss")
    effect = ins.whatif(actions[0], b, pool, margins, setting=s, verify=True, n_bootstrap=100)
    assert effect.actual_after == pytest.approx(b.value(s.margins(ins.apply(s, actions[0]))))
    lo, hi = effect.actual_ci
    assert lo <= effect.actual_change <= hi
    with pytest.raises(InvalidOptionError, match="pass setting="):
        ins.whatif(actions[0], b, pool, margins, verify=True)


def test_action_validation():
    with pytest.raises(InvalidOptionError):
        ins.Action("delete", (1,))
    with pytest.raises(EmptyDataError):
        ins.Action("remove", ())
    with pytest.raises(InvalidOptionError, match="one new label"):
        ins.Action("relabel", (1, 2), (0,))


def test_suspicion_combines_percentile_ranks_and_outliers_by_brute_force():
    a, b = np.array([3.0, 1.0, 2.0, 0.0]), np.array([0.0, 1.0, 3.0, 2.0])
    susp = ins.suspicion({"a": a, "b": b}, ["w", "x", "y", "z"])
    np.testing.assert_allclose(
        susp.matrix[2].numpy(), ((np.array([4, 2, 3, 1]) + np.array([1, 2, 4, 3])) / 8)
    )
    assert susp.top("combined", 1)[0].train_id == "y"
    with pytest.raises(ShapeError):
        ins.suspicion({"a": a[:3]}, ["w", "x", "y", "z"])
    x = np.random.default_rng(0).normal(size=(30, 3))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(ins.outliers(x, k=4), np.sort(d, 1)[:, :4].mean(1))
    scores = st.Scores(torch.tensor([[1.0, -2.0], [3.0, 0.0]]), ["a", "b"], [0, 1])
    np.testing.assert_allclose(ins.heldout_harm(scores), [-2.0, 1.0])


def test_reliability_by_hand():
    a = np.array([[5.0, 4, 3, 2, 1]])
    b = np.array([[5.0, 3, 4, 1, 2]])
    c = np.array([[1.0, 2, 3, 4, 5]])
    np.testing.assert_allclose(ins.topk_jaccard(a, c, 2), [0.0])
    np.testing.assert_allclose(ins.topk_jaccard(a, b, 3), [1.0])
    # union of top-2 of a ({0,1}) and b ({0,2}) = {0,1,2}: ranks in a 3,2,1; in b 3,1,2 → ρ = 0.5
    np.testing.assert_allclose(ins.topk_rank_correlation(a, b, 2), [0.5])
    same = ins.reliability([a, a.copy(), a.copy()], k=2)
    assert same.jaccard[0] == 1 and same.stability[0] == 1 and same.badge(0) == "stable"
    mixed = ins.reliability([a, c], k=2, n_bootstrap=500)
    assert mixed.jaccard[0] == 0 and mixed.stability[0] < 0.8 and mixed.unstable[0]
    assert mixed.train_agreement.shape == (5,)
    with pytest.raises(InvalidOptionError):
        ins.reliability([a])


def test_support_signs_by_brute_force_and_regions():
    s = torch.tensor([[1.0, 0.05, -1.0, 0.5], [0.2, 0.2, 0.2, -0.1]])
    qf, tf = np.array([[0.0, 0.0], [10.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [2.0, 2.0]])
    sup = ins.support(st.Scores(s, [0, 1, 2, 3], [0, 1]), qf, tf, k=2, share=0.1)
    np.testing.assert_allclose(sup.positive_mass, [1.55, 0.6])
    np.testing.assert_allclose(sup.proponents, [2, 3])  # scores above 0.1 × the row's largest
    np.testing.assert_allclose(sup.distance, [1.0, (9.0 + np.sqrt(64 + 4)) / 2])
    assert list(ins.flag([0.1, 0.9, 0.5, 0.7], 0.5)) == [1, 3]
    regions = ins.regions(
        [1, 3],
        np.array([[0.0], [5.0], [0.0], [5.2]]),
        np.array([[5.1], [0.0]]),
        ["a", "b", "c", "d"],
        n_clusters=1,
    )
    assert regions[0].queries == [1, 3] and regions[0].nearest_train[0] == 0
    assert "collect more like these" in regions[0].describe()

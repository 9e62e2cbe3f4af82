"""evaluate.suite and evaluate.mislabel: quanda's metric definitions against hand computations."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from sourcetrace import evaluate
from sourcetrace.errors import EmptyDataError, ShapeError
from sourcetrace.evaluate import mislabel

S = np.array([[0.9, 0.1, 0.5, -0.2], [0.0, 0.8, 0.3, 0.7], [0.2, 0.3, 0.1, 0.6]])


def test_class_and_subclass_detection_by_hand():
    # top-1 rows: 0, 1, 3 → train labels a, b, b; query labels a, a, b → 2 of 3
    assert evaluate.class_detection(S, ["a", "b", "a", "b"], ["a", "a", "b"]) == pytest.approx(2 / 3)
    assert evaluate.subclass_detection(S, [1, 2, 3, 4], [1, 2, 4]) == 1.0
    with pytest.raises(ShapeError):
        evaluate.class_detection(S, ["a"], ["a", "a", "b"])


def test_top_k_cardinality_by_hand():
    # top-2 rows: {0, 2}, {1, 3}, {3, 1} → 4 distinct of 6
    assert evaluate.top_k_cardinality(S, 2) == pytest.approx(4 / 6)
    assert evaluate.top_k_cardinality(S, 1) == 1.0


def test_shortcut_detection_is_mean_average_precision():
    from sklearn.metrics import average_precision_score

    shortcut = [1, 3]
    want = np.mean([average_precision_score([0, 1, 0, 1], S[q]) for q in (0, 2)])
    assert evaluate.shortcut_detection(S, shortcut, [0, 2]) == pytest.approx(want)
    # by hand for query 0: order 0 (no), 2 (no), 1 (yes, P=1/3), 3 (yes, P=2/4) → (1/3 + 1/2) / 2
    assert evaluate.shortcut_detection(S, shortcut, [0]) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert evaluate.shortcut_detection(S, shortcut, []) == 0.0
    ties = np.array([1.0, 1.0, 0.0, 0.0])
    assert mislabel.average_precision(ties, [0, 2]) == pytest.approx(
        average_precision_score([1, 0, 1, 0], ties)
    )


def test_model_randomization_is_mean_rowwise_spearman():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
    want = np.mean([spearmanr(a[q], b[q])[0] for q in range(5)])
    assert evaluate.model_randomization(a, b) == pytest.approx(want)
    assert evaluate.model_randomization(a, a) == pytest.approx(1.0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    r1, r2 = evaluate.randomize_model(model, seed=1), evaluate.randomize_model(model, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(r1.parameters(), r2.parameters()))
    assert not torch.equal(r1[0].weight, model[0].weight)


def test_mislabel_metrics_by_hand():
    from sklearn.metrics import roc_auc_score

    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.3, 0.05])
    flipped = [0, 3]
    truth = np.isin(np.arange(6), flipped)
    assert mislabel.auc(scores, flipped) == pytest.approx(roc_auc_score(truth, scores))
    assert mislabel.precision_at_k(scores, flipped) == 0.5  # top-2: rows 0, 2
    assert mislabel.precision_at_k(scores, flipped, k=4) == 0.5
    # quanda: ranking 0, 2, 3, 4, 1, 5 (stable on the tie) → found 1,1,2,2,2,2 → curve /2, trapezoid /6
    curve = np.array([1, 1, 2, 2, 2, 2]) / 2
    want = sum((curve[i] + curve[i + 1]) / 2 for i in range(5)) / 6
    assert mislabel.quanda_score(scores, flipped) == pytest.approx(want)
    res = evaluate.mislabel_detection(torch.tensor(scores), flipped)
    assert res.k == 2 and res.auc == pytest.approx(roc_auc_score(truth, scores))
    with pytest.raises(EmptyDataError):
        mislabel.auc(scores, [])
    with pytest.raises(ShapeError):
        mislabel.auc(scores, [7])


def test_evaluation_suite_runs_what_its_inputs_allow():
    out = evaluate.evaluation_suite(
        S,
        train_labels=["a", "b", "a", "b"],
        query_labels=["a", "a", "b"],
        shortcut_rows=[1, 3],
        shortcut_queries=[0],
        randomized_scores=S[::-1],
        self_influence=np.array([0.1, 0.9, 0.2, 0.3]),
        flipped=[1],
        k=2,
    )
    assert set(out) == {
        "top_k_cardinality",
        "class_detection",
        "shortcut_detection",
        "model_randomization",
        "mislabeling_detection",
    }
    assert out["class_detection"] == pytest.approx(2 / 3)
    assert out["mislabeling_detection"] == pytest.approx(mislabel.quanda_score([0.1, 0.9, 0.2, 0.3], [1]))

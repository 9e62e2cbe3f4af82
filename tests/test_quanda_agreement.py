"""The suite's metrics equal quanda's own code on the same scores (skipped where quanda is not installed)."""

import numpy as np
import pytest

from sourcetrace.bench import quanda_check
from sourcetrace.evaluate import suite
from sourcetrace.evaluate.mislabel import quanda_score

Q = quanda_check.load()
pytestmark = pytest.mark.skipif(Q is None, reason="quanda is not installed (make setup installs it)")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_suite_equals_quanda(seed):
    rng = np.random.default_rng(seed)
    n_train, n_query = 60, 12
    scores, rand = rng.normal(size=(n_query, n_train)), rng.normal(size=(n_query, n_train))
    train_labels, query_labels = rng.integers(0, 3, n_train), rng.integers(0, 3, n_query)
    train_sub, query_sub = (np.array([f"c{v}" for v in rng.integers(0, 6, n)]) for n in (n_train, n_query))
    shortcut_rows = np.flatnonzero(train_labels == 1)[:8]
    short = rng.normal(size=(5, n_train))
    short[:, shortcut_rows] += 1.0
    ours = {
        "class_detection": suite.class_detection(scores, train_labels, query_labels),
        "subclass_detection": suite.subclass_detection(scores, train_sub, query_sub),
        "shortcut_detection": suite.shortcut_detection(short, shortcut_rows),
        "model_randomization": suite.model_randomization(scores, rand),
        "top_k_cardinality": suite.top_k_cardinality(scores, 10),
    }
    theirs = quanda_check.suite_by_quanda(
        Q, scores, train_labels=train_labels, query_labels=query_labels, train_subclasses=train_sub,
        query_subclasses=query_sub, shortcut_scores=short, shortcut_rows=shortcut_rows, shortcut_class=1,
        randomized_scores=rand,
    )
    assert set(theirs) == set(ours)
    for name, d in quanda_check.differences(ours, theirs).items():
        assert d["abs_diff"] < 1e-6, (name, d)
    # a metric that disagrees is caught: class detection against other labels differs from quanda's
    other = suite.class_detection(scores, (train_labels + 1) % 3, query_labels)
    assert abs(other - theirs["class_detection"]) > 0


def test_mislabeling_equals_quanda_on_the_order():
    rng = np.random.default_rng(3)
    s = rng.normal(size=200)
    flipped = rng.choice(200, 20, replace=False)
    got = quanda_check.mislabeling_by_quanda(Q, s, flipped)
    assert abs(got["order_only"] - quanda_score(s, flipped)) < 1e-6
    # quanda's 1e-4 x index tie-break reorders suspicion scores closer than that
    close = np.linspace(1e-3, 0, 200)  # falling by 5e-6 per row: the +1e-4 x index reverses it
    assert quanda_check.mislabeling_by_quanda(Q, close, flipped)["as_shipped"] != pytest.approx(
        quanda_score(close, flipped), abs=1e-6)

"""Scores: ordering, ids, groups, persistence and pandas, checked against plain tensor computations."""

import sys

import pytest
import torch
from torch import nn

import sourcetrace as st
from sourcetrace import Scores
from sourcetrace.errors import MissingExtraError, ScoresError, ShapeError
from sourcetrace.methods.gradient import reduce_blocks

TRAIN_IDS = [f"t{i}" for i in range(9)]
QUERY_IDS = ["qa", "qb", "qc"]


@pytest.fixture
def scores():
    g = torch.Generator().manual_seed(3)
    matrix = torch.randn(3, 9, dtype=torch.float64, generator=g)
    return Scores(matrix, list(TRAIN_IDS), list(QUERY_IDS), "grad-dot", {"note": "x"},
                  self_influence=torch.rand(9, dtype=torch.float64, generator=g))


def test_top_and_bottom_order_and_ids(scores):
    for q in range(3):
        row = scores.matrix[q].tolist()
        order = sorted(range(9), key=lambda i: row[i], reverse=True)
        top = scores.top(q, k=4)
        assert [a.index for a in top] == order[:4]
        assert [a.train_id for a in top] == [TRAIN_IDS[i] for i in order[:4]]
        assert [a.score for a in top] == [row[i] for i in order[:4]]
        bottom = scores.bottom(q, k=3)
        assert [a.index for a in bottom] == order[::-1][:3]
        assert [a.score for a in bottom] == sorted(row)[:3]
    assert len(scores.top(0, k=100)) == 9  # k larger than the training set: everything, in order


def test_query_by_id(scores):
    assert scores.top("qb", k=5) == scores.top(1, k=5)
    assert scores.bottom("qc", k=2) == scores.bottom(2, k=2)
    with pytest.raises(ScoresError, match="no query 'nope'"):
        scores.top("nope")


def test_group_by_is_a_sum_over_members(scores):
    labels = ["a", "b", "a", "c", "b", "a", "c", "c", "a"]
    grouped = scores.group_by(labels)
    assert grouped.train_ids == ["a", "b", "c"]
    for j, group in enumerate("abc"):
        members = [i for i, lab in enumerate(labels) if lab == group]
        assert torch.allclose(grouped.matrix[:, j], scores.matrix[:, members].sum(1), rtol=0, atol=1e-12)
    assert grouped.metadata["group_sizes"] == [4, 2, 3]
    by_id = scores.group_by(dict(zip(TRAIN_IDS, labels)))
    assert torch.equal(by_id.matrix, grouped.matrix)
    with pytest.raises(ShapeError):
        scores.group_by(labels[:-1])
    with pytest.raises(ShapeError, match="no group"):
        scores.group_by({"t0": "a"})


def test_save_load_dense(scores, tmp_path):
    back = Scores.load(scores.save(tmp_path / "s"))
    assert torch.equal(back.matrix, scores.matrix) and back.matrix.dtype == torch.float64
    assert torch.equal(back.self_influence, scores.self_influence)
    assert (back.train_ids, back.query_ids, back.method, back.metadata) == \
           (TRAIN_IDS, QUERY_IDS, "grad-dot", {"note": "x"})
    assert not [p.name for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(FileNotFoundError):
        Scores.load(tmp_path / "nothing")


def test_save_load_top_k(scores, tmp_path):
    blocks = [(lo, min(lo + 4, 9), scores.matrix[:, lo:lo + 4]) for lo in range(0, 9, 4)]
    sparse = Scores(train_ids=TRAIN_IDS, query_ids=QUERY_IDS, method="grad-dot",
                    **reduce_blocks(iter(blocks), 3, 9, top_k=3))
    back = Scores.load(sparse.save(tmp_path / "s"))
    assert back.matrix is None
    for q in QUERY_IDS:
        assert back.top(q, 3) == sparse.top(q, 3) == scores.top(q, 3)
        assert back.bottom(q, 3) == sparse.bottom(q, 3) == scores.bottom(q, 3)
    with pytest.raises(ScoresError, match="larger top_k"):
        back.top(0, k=4)
    with pytest.raises(ScoresError, match="score again without top_k"):
        back.group_by(["a"] * 9)


def test_to_pandas(scores):
    frame = scores.to_pandas()
    assert list(frame.index) == QUERY_IDS and list(frame.columns) == TRAIN_IDS
    assert frame.loc["qb", "t4"] == scores.matrix[1, 4].item()


def test_to_pandas_without_pandas(scores, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingExtraError, match="pip install pandas"):
        scores.to_pandas()


def test_shape_checks():
    with pytest.raises(ShapeError, match="score matrix of shape"):
        Scores(torch.zeros(2, 3), ["a", "b"], ["q"])
    with pytest.raises(ShapeError):
        Scores(None, ["a"], ["q"])


def test_scores_from_attributor_round_trip(tmp_path):
    """What an Attributor returns survives save/load with its ids, dense and top-k."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    train = [{"id": f"ex{i}", "x": torch.randn(3), "y": i % 2} for i in range(7)]
    attr = st.Attributor(model, st.ClassificationTask(), progress=False).fit(train)
    queries = [{"id": "q1", "x": torch.randn(3), "y": 0}, {"id": "q2", "x": torch.randn(3), "y": 1}]
    dense = attr.score(queries)
    assert dense.train_ids == [f"ex{i}" for i in range(7)] and dense.query_ids == ["q1", "q2"]
    back = Scores.load(dense.save(tmp_path / "dense"))
    assert torch.equal(back.matrix, dense.matrix) and back.top("q2", 3) == dense.top("q2", 3)
    sparse = Scores.load(attr.score(queries, top_k=2).save(tmp_path / "sparse"))
    assert sparse.top("q1", 2) == dense.top("q1", 2) and sparse.bottom("q2", 2) == dense.bottom("q2", 2)


def test_tuple_and_mixed_ids_survive_save_and_load(tmp_path):
    train_ids = [("doc", 0), ("doc", 1), 7, "x", ("a", ("nested", 2))]
    s = Scores(torch.randn(2, 5, dtype=torch.float64), train_ids, [(1, 2), "q"], "grad-dot")
    back = Scores.load(s.save(tmp_path / "s"))
    assert back.train_ids == train_ids and back.query_ids == [(1, 2), "q"]
    assert back.top((1, 2), k=5) == s.top((1, 2), k=5)
    assert back.top(query_id="q", k=2)[0].train_id in train_ids


def test_query_positions_and_ids_are_unambiguous():
    s = Scores(torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 4.0], [2.0, 3.0]]), ["t0", "t1"], [5, 3, 0, 1])
    assert s.top(query_id=3, k=1)[0].train_id == "t1"  # the row with id 3 (position 1)
    assert s.top(row=3, k=1)[0].train_id == "t1"  # position 3 (id 1)
    assert s.top(query_id=0, k=1)[0].score == 5.0 and s.top(row=0, k=1)[0].score == 1.0
    assert s.top(5, k=1) == s.top(row=0, k=1)  # 5 is an id and no position: unambiguous
    with pytest.raises(ScoresError, match="ambiguous"):
        s.top(0)
    names = Scores(torch.eye(2), ["t0", "t1"], ["a", "b"])
    assert names.top(1, k=1) == names.top("b", k=1) == names.top(row=1, k=1)  # no int ids: a position
    assert names.top(k=1) == names.top(row=0, k=1)


def test_numpy_and_tensor_positions():
    import numpy as np

    s = Scores(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ["t0", "t1"], ["a", "b"])
    assert s.top(np.int64(1), k=1) == s.top(row=torch.tensor(1), k=1) == s.top("b", k=1)
    with pytest.raises(ScoresError, match="row must be a position"):
        s.top(row=1.0)

"""Examples: every accepted form of data gets stable ids, and a fingerprint that notices any change."""

import json
import re

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from sourcetrace import Examples
from sourcetrace.errors import EmptyDataError, ShapeError


def rows(n=5):
    return [{"id": f"doc-{i}", "x": [float(i), 2.0 * i], "y": i % 2} for i in range(n)]


def write_jsonl(path, items):
    path.write_text("\n".join(json.dumps(r) for r in items) + "\n\n")  # a trailing blank line is skipped
    return path


def test_ids_from_list_of_dicts():
    ex = Examples(rows())
    assert ex.ids == [f"doc-{i}" for i in range(5)] and len(ex) == 5 and ex[2]["y"] == 0
    assert Examples([{"x": 1}, {"x": 2}]).ids == [0, 1]  # no "id" field: positions


def test_ids_from_jsonl(tmp_path):
    ex = Examples(write_jsonl(tmp_path / "d.jsonl", rows()))
    assert ex.ids == [f"doc-{i}" for i in range(5)] and ex[3] == rows()[3]
    assert Examples(str(tmp_path / "d.jsonl")).ids == ex.ids
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n{"x": \n')
    with pytest.raises(ShapeError, match="bad.jsonl:2 is not valid JSON"):
        Examples(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="JSONL"):
        Examples(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EmptyDataError, match="is empty"):
        Examples(tmp_path / "empty.jsonl")


def test_tensor_pair_and_tensor_dataset():
    x, y = torch.randn(6, 3), torch.arange(6)
    pair = Examples((x, y))
    assert pair.ids == list(range(6))
    assert torch.equal(pair[4][0], x[4]) and int(pair[4][1]) == 4
    assert Examples((x.numpy(), y.numpy())).ids == list(range(6))
    ds = Examples(TensorDataset(x, y), ids=np.arange(10, 16))
    assert ds.ids == list(range(10, 16)) and all(type(i) is int for i in ds.ids)
    assert [(lo, len(b)) for lo, b in ds.batches(4)] == [(0, 4), (4, 2)]
    assert Examples(ds).ids == ds.ids  # re-wrapping keeps the ids


def test_refused_ids_and_shapes():
    dup = rows(3)
    dup[2]["id"] = "doc-0"
    with pytest.raises(ShapeError, match="ids must be unique"):
        Examples(dup)
    with pytest.raises(ShapeError, match="ids must be unique"):
        Examples(rows(3), ids=["a", "b", "a"])
    with pytest.raises(ShapeError, match="2 ids for 3 examples"):
        Examples(rows(3), ids=["a", "b"])
    with pytest.raises(ShapeError, match="3 inputs but 2 targets"):
        Examples((torch.zeros(3, 2), torch.zeros(2)))
    with pytest.raises(ShapeError, match="must be sized"):
        Examples(r for r in rows())
    with pytest.raises(EmptyDataError):
        Examples([])


def test_fingerprint_stable_and_sensitive(tmp_path):
    base = Examples(rows()).fingerprint()
    assert Examples(rows()).fingerprint() == base
    assert Examples(write_jsonl(tmp_path / "a.jsonl", rows())).fingerprint() == base  # same content
    changed = rows()
    changed[3]["x"][1] += 1e-9
    assert Examples(changed).fingerprint() != base
    changed = rows()
    changed[4]["y"] = 1  # was 0
    assert Examples(changed).fingerprint() != base
    assert Examples(rows(), ids=list("abcde")).fingerprint() != base  # the ids are part of it

    x, y = torch.randn(6, 3, dtype=torch.float64), torch.arange(6)
    fp = Examples((x, y)).fingerprint()
    assert Examples(TensorDataset(x.clone(), y.clone())).fingerprint() == fp
    x2 = x.clone()
    x2[5, 2] = torch.nextafter(x2[5, 2], torch.tensor(np.inf, dtype=torch.float64))  # one ulp
    assert Examples((x2, y)).fingerprint() != fp
    assert Examples((x.float(), y)).fingerprint() != fp  # the dtype counts
    y2 = y.clone()
    y2[0] = 1
    assert Examples((x, y2)).fingerprint() != fp


def test_ids_are_compact_and_behave_like_a_list():
    """Ids keep no Python object per example (a range, an int64 array, packed UTF-8) yet read, compare,
    slice, look up and fingerprint exactly as the list of the same ids."""
    import hashlib

    from sourcetrace.data import Ids

    cases = [(list(range(7)), "_range"), ([5, -3, 9, 2**40, 0], "_ints"), (["b", "é", "", "a-1"], "_text"),
             ([(1, 2), "a", 3.5], "_list"), ([1, "a"], "_list"), ([True, False], "_list")]
    for values, kind in cases:
        ids = Ids(values)
        assert getattr(ids, kind) is not None, (values, kind)
        assert ids == values and values == ids and list(ids) == values and len(ids) == len(values)
        assert [ids[i] for i in range(-len(values), len(values))] == values * 2
        assert [type(x) for x in ids] == [type(x) for x in values]
        for s in (slice(1, None), slice(None, 2), slice(None, None, 2), slice(3, 1)):
            assert list(ids[s]) == values[s]
        assert all(ids.index(v) == values.index(v) and v in ids for v in values)
        assert "missing" not in ids and 10**30 not in ids
        with pytest.raises(IndexError):
            ids[len(values)]
        reference = hashlib.sha256(json.dumps(values, default=str).encode()).hexdigest()
        assert hashlib.sha256(b"".join(ids.json_parts())).hexdigest() == reference  # fingerprints unchanged
    assert Ids(np.arange(3, 9))._range == range(3, 9) and Ids(torch.tensor([4, 2]))._ints is not None
    assert Ids([5, -3, 9]).index(np.int64(9)) == 2 and np.int64(4) in Ids(range(6))
    many = Ids([f"doc-{i}" for i in range(20_000)])
    assert many.index("doc-12345") == 12345 and list(many[19_998:]) == ["doc-19998", "doc-19999"]
    for dup in ([3, 1, 3], ["x", "y", "x"], [(1,), "a", (1,)]):
        with pytest.raises(ShapeError, match=re.escape(f"{dup[0]!r} appears more than once")):
            Examples(list(range(3)), ids=dup)
    assert isinstance(Examples(list(range(4))).ids._range, range)  # positions: a range, no list

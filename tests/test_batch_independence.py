"""Property: a query's scores do not depend on which other queries are scored with it, for every method and
option (float64; queries one by one, in random batches and all together agree to 1e-10)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn

import sourcetrace as st
from sourcetrace.trajectory import TrajectoryRecorder

N, NQ = 18, 7


def _data():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N + NQ, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N + NQ,), generator=gen)
    return (x[:N], y[:N]), (x[N:], y[N:])


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _recorded(folder):
    """A short SGD run recorded with checkpoints (for tracin, source, replay and dda)."""
    (x, y), _ = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = TrajectoryRecorder(folder, model, opt, checkpoint_every=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(9):
        idx = torch.randperm(N, generator=gen)[:6]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        rec.step(model, opt, idx)
    rec.finish(model, opt)
    return model


CASES = [
    ("grad-dot", {}), ("grad-cos", {}), ("grad-dot", {"relatif": True}),
    ("explicit", {}), ("cg", {}), ("lissa", {"curvature_options": {"depth": 25}}),
    ("arnoldi", {"curvature_options": {"rank": 8}}), ("kfac", {}), ("ekfac", {}),
    ("ekfac", {"query_rank": 1}),
    ("ekfac", {"relatif": True}), ("diagonal", {}), ("datainf", {}),
    ("trak", {"proj_dim": 12}), ("trak", {"proj_dim": 12, "curvature": "cg"}),
    ("trak", {"projection": "none", "curvature": "covariance", "out_to_loss": "per-model"}),
    ("logra", {"rank": 3}), ("logra", {"rank": 3, "curvature": "ekfac"}), ("trak-ekfac", {"rank": 3}),
    ("influence", {"features": "random", "proj_dim": 12, "curvature": "gauss-newton"}),
    ("tracin", {"trajectory": True}), ("tracin", {"trajectory": True, "dda": True}),
    ("grad-cos", {"trajectory": True, "dda": True}), ("ekfac", {"trajectory": True, "dda": True}),
    ("ekfac", {"trajectory": True, "dda": True, "dda_reference": 8}),
    ("source", {"trajectory": True, "segments": 2}), ("replay", {"trajectory": True}),
]
_FITTED: dict[int, st.Attributor] = {}


def _attributor(case: int, folder) -> st.Attributor:
    if case not in _FITTED:
        method, options = CASES[case]
        model = _model()
        if options.get("trajectory"):
            model = _recorded(folder / f"run-{case}")
            options = {**options, "trajectory": folder / f"run-{case}"}
        if method != "replay":
            options = {**options, "store_dtype": "float64"}
        train, _ = _data()
        _FITTED[case] = st.Attributor(model, st.ClassificationTask(), method, progress=False,
                                      **options).fit(train)
    return _FITTED[case]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{m}-{'-'.join(o)}" for m, o in CASES])
def test_scores_do_not_depend_on_the_other_queries(case, tmp_path_factory):
    attr = _attributor(case, tmp_path_factory.mktemp("runs"))
    _, (xq, yq) = _data()
    together = attr.score((xq, yq)).matrix.double()
    scale = together.abs().max().clamp_min(1e-300)
    alone = torch.cat([attr.score((xq[i: i + 1], yq[i: i + 1])).matrix.double() for i in range(NQ)])
    assert ((alone - together).abs().max() / scale) < 1e-10

    @settings(max_examples=4, deadline=None, derandomize=True)
    @given(hs.permutations(range(NQ)), hs.lists(hs.integers(1, NQ - 1), max_size=3, unique=True))
    def batches(order, cuts):
        bounds = [0, *sorted(cuts), NQ]
        for lo, hi in zip(bounds, bounds[1:]):
            idx = torch.tensor(order[lo:hi])
            got = attr.score((xq[idx], yq[idx])).matrix.double()
            assert ((got - together[idx]).abs().max() / scale) < 1e-10

    batches()

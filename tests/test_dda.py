"""DDA corrections on hand-computable inputs, and against brute-force scores of a small linear model."""

import copy

import pytest
import torch
from torch import nn

import sourcetrace as st
from sourcetrace.errors import ShapeError
from sourcetrace.methods import dda


def _s(rows):
    m = torch.tensor(rows, dtype=torch.float64)
    return st.Scores(m, list(range(m.shape[1])), list(range(m.shape[0])), "test")


def test_zscore_and_subtract_by_hand():
    ft, base = _s([[1.0, 2.0, 3.0]]), _s([[2.0, 2.0, 8.0]])
    assert dda.subtract(ft, base).matrix.tolist() == [[-1.0, 0.0, -5.0]]
    assert dda.subtract(ft, base, alpha=0.5).matrix.tolist() == [[0.0, 1.0, -1.0]]
    z = (2 / 3) ** 0.5  # population std of (1, 2, 3)
    assert dda.standardize(ft).matrix[0].tolist() == pytest.approx([-1 / z, 0, 1 / z])
    zb = dda.zscore(base.matrix)[0]  # (−1, −1, 2) / √2
    assert zb.tolist() == pytest.approx([-2 ** -0.5, -2 ** -0.5, 2 ** 0.5])
    diff = dda.subtract(ft, base, standardize=True).matrix[0]
    assert diff.tolist() == pytest.approx([-1 / z + 2 ** -0.5, 2 ** -0.5, 1 / z - 2 ** 0.5])
    assert dda.zscore(torch.ones(1, 3)).tolist() == [[0.0, 0.0, 0.0]]  # a constant row, not NaN


def test_combine_weights_per_query_and_checkpoint():
    a, b = _s([[1.0, 0.0], [0.0, 1.0]]), _s([[0.0, 4.0], [2.0, 0.0]])
    w = torch.tensor([[1.0, 0.5], [0.0, 2.0]])
    raw = dda.combine([a, b], w, standardize=False).matrix
    assert raw.tolist() == [[1.0, 2.0], [4.0, 0.0]]
    eq = dda.combine([a, b], standardize=True).matrix  # z of ±: (1, -1) and (-1, 1) cancel
    assert eq.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert dda.combine([a, b], [2.0, 0.0], standardize=False).matrix.tolist() == [[2.0, 0.0], [0.0, 2.0]]
    with pytest.raises(ShapeError):
        dda.combine([a, b], torch.ones(3))
    with pytest.raises(ShapeError):
        dda.subtract(a, _s([[1.0, 2.0, 3.0]]))


def test_normalize_train_divides_columns_by_rms():
    s = _s([[3.0, 1.0], [4.0, -1.0]])
    expected = [3 / 12.5 ** 0.5, 1.0, 4 / 12.5 ** 0.5, -1.0]
    assert dda.normalize_train(s).matrix.flatten().tolist() == pytest.approx(expected)


def test_default_is_weighted_standardized_combination_then_train_normalization():
    a, b = _s([[1.0, 2.0, 4.0], [0.0, 3.0, 1.0]]), _s([[2.0, 0.0, 1.0], [5.0, 1.0, 1.0]])
    w = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    combined = dda.combine([a, b], w)
    assert torch.allclose(dda.dda([a, b], w).matrix, dda.normalize_train(combined).matrix)
    assert torch.allclose(dda.dda([a, b], w, normalize_train=False).matrix, combined.matrix)
    assert dda.DEFAULT["normalize_train"] is True


def test_fitting_errors_is_one_minus_probability():
    class Fixed(nn.Module):  # logits [B, T, V] that put probability p on token 1 at every position
        def __init__(self, p):
            super().__init__()
            self.logit = nn.Parameter(torch.tensor([0.0, float(torch.logit(torch.tensor(p)))]))

        def forward(self, input_ids):
            return self.logit.expand(*input_ids.shape, 2)

    q = [{"prompt": [0], "completion": [1]}, {"prompt": [0], "completion": [1, 1]}]
    e = dda.fitting_errors([Fixed(0.5), Fixed(0.9)], st.CausalLMTask(), q)
    assert e.flatten().tolist() == pytest.approx([0.5, 0.1, 0.75, 1 - 0.81])


def _linear(seed):
    torch.manual_seed(seed)
    return nn.Linear(3, 1, bias=False).double()


def test_project_out_base_against_explicit_gradients():
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)
    train = [{"x": x[i], "y": y[i:i + 1]} for i in range(6)]
    queries = [{"x": x[i] + 0.1, "y": y[i:i + 1]} for i in range(2)]
    ft, base = _linear(0), _linear(1)
    task = st.RegressionTask()
    a_ft = st.Attributor(ft, task, "grad-dot", progress=False, store_dtype="float64").fit(train)
    a_b = st.Attributor(base, task, "grad-dot", progress=False, store_dtype="float64").fit(train)

    def grad(model, ex, fn):
        model.zero_grad()
        fn(model, {k: v[None] for k, v in ex.items()}).sum().backward()
        return model.weight.grad.flatten().clone()

    G = torch.stack([grad(ft, ex, task.train_loss) for ex in train])
    for mode in ("project", "normalize"):
        got = dda.project_out_base(a_ft, a_b, queries, mode=mode).matrix
        for r, ex in enumerate(queries):
            q, b = grad(ft, ex, task.measurement), grad(base, ex, task.measurement)
            v = q - (q @ b) / (b @ b) * b if mode == "project" else q / q.norm() - b / b.norm()
            assert got[r].tolist() == pytest.approx((-(G @ v)).tolist(), rel=1e-9, abs=1e-12)
    # score_features with the plain query features reproduces the Attributor's own scores
    feats = dda.query_features(a_ft, queries)
    assert torch.allclose(dda.score_features(a_ft, feats, [0, 1]).matrix, a_ft.score(queries).matrix)


def test_dda_option_equals_the_standalone_default():
    """`dda=True` equals per-checkpoint scores combined by `dda.combine` with fitting errors, computed by hand
    from separate Attributors; with `dda_reference`, each column is then divided by its root-mean-square over
    the reference: given queries, or training examples with each one's own row left out."""
    import sourcetrace as st
    from sourcetrace.methods import dda as dda_mod

    torch.manual_seed(3)
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    base = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    tuned = copy.deepcopy(base)
    opt = torch.optim.SGD(tuned.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tuned(x), y).backward()
        opt.step()
    states = [copy.deepcopy(base.state_dict()), copy.deepcopy(tuned.state_dict())]
    task, queries = st.ClassificationTask(), (x[:4] + 0.3, y[:4])
    held_out = (torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,)))
    models = []
    for state in states:
        model = copy.deepcopy(tuned)
        model.load_state_dict(state)
        models.append(model)

    def combined(q):
        per = [st.Attributor(m, task, "grad-dot", store_dtype="float64", progress=False).fit((x, y)).score(q)
               for m in models]
        return dda_mod.combine(per, dda_mod.fitting_errors(models, task, q)).matrix

    def option(q, **reference):
        return st.Attributor(tuned, task, "grad-dot", checkpoints=states, dda=True, store_dtype="float64",
                             progress=False, **reference).fit((x, y)).score(q).matrix.double()

    plain = combined(queries)
    assert torch.allclose(option(queries), plain, rtol=1e-9, atol=1e-12)
    on_train = combined((x, y))  # [30 reference rows, 30 columns]
    off_diagonal = on_train.pow(2).sum(0) - on_train.diagonal().pow(2)
    assert torch.allclose(option(queries, dda_reference=30), plain / (off_diagonal / 29).sqrt(),
                          rtol=1e-9, atol=1e-12)
    want = plain / combined(held_out).pow(2).mean(0).sqrt()
    assert torch.allclose(option(queries, dda_reference=held_out), want, rtol=1e-9, atol=1e-12)
    # one query alone gets the same scores as in its batch
    assert torch.allclose(option((queries[0][:1], queries[1][:1]), dda_reference=held_out), want[:1],
                          rtol=1e-10, atol=1e-12)


def test_dda_reference_is_checked_and_fingerprinted(tmp_path):
    import sourcetrace as st
    from sourcetrace.errors import InvalidOptionError

    model = torch.nn.Linear(3, 2)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InvalidOptionError, match="dda_reference must be"):
            st.Attributor(model, st.ClassificationTask(), "grad-dot", dda=True, dda_reference=bad)
    ref = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    a, b = (st.Attributor(model, st.ClassificationTask(), "grad-dot", dda=True, dda_reference=r)
            for r in (ref, (ref[0] + 1, ref[1])))
    assert a._options["dda_reference"]["examples"] == 4
    assert a._options["dda_reference"] != b._options["dda_reference"]  # another reference: another workdir

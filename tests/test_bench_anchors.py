"""The anchor adapters against independent computations; they also pin down each library's sign convention.

Reference: ``score(q, i) = -∇m(q)·∇L(i)`` (m the margin, L the cross-entropy), from a plain per-example
autograd loop in float64. Training example 0 is a copy of query 0, so every method must give it a positive
score on query 0 (a proponent), whatever its preconditioner.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sourcetrace.bench import anchors
from sourcetrace.errors import InvalidOptionError, ShapeError

N_TRAIN, N_TEST = 40, 5


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(1)
    x_train, y_train = (
        torch.randn(N_TRAIN, 64, generator=gen),
        torch.randint(0, 10, (N_TRAIN,), generator=gen),
    )
    x_test, y_test = torch.randn(N_TEST, 64, generator=gen), torch.randint(0, 10, (N_TEST,), generator=gen)
    x_train[0], y_train[0] = x_test[0], y_test[0]  # a duplicate of query 0: a sure proponent
    return (x_train, y_train), (x_test, y_test)


def _margin(logits: torch.Tensor, label: int) -> torch.Tensor:
    """logit_y - log Σ_{k≠y} exp(logit_k), written independently of the module under test."""
    others = torch.cat([logits[:label], logits[label + 1 :]])
    return logits[label] - torch.logsumexp(others, dim=0)


def _flat_grad(value: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])


def _grads(model: nn.Module, train, test):
    """Per-example float64 gradients: margin of each query, cross-entropy and margin of each train example."""
    net = copy.deepcopy(model).double()
    params = list(net.parameters())
    (x_train, y_train), (x_test, y_test) = train, test

    def per_example(fn, xs, ys):
        return torch.stack(
            [_flat_grad(fn(net(x[None].double())[0], int(y)), params) for x, y in zip(xs, ys, strict=True)]
        )

    def cross_entropy(logits, label):
        return F.cross_entropy(logits[None], torch.tensor([label]))

    query = per_example(_margin, x_test, y_test)
    loss = per_example(cross_entropy, x_train, y_train)
    margin = per_example(_margin, x_train, y_train)
    prob = torch.softmax(net(x_train.double()), dim=-1)[torch.arange(len(y_train)), y_train].detach()
    return query, loss, margin, prob


def _brute_force(model: nn.Module, train, test) -> np.ndarray:
    query, loss, _, _ = _grads(model, train, test)
    return -(query @ loss.T).numpy()


def _assert_close(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    assert got.shape == want.shape
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error <= rtol, error


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert [type(m) for m in model.modules()] == [nn.Sequential, nn.Linear, nn.Tanh, nn.Linear]
    assert all(p.requires_grad for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_available_anchors_reports_each_package():
    found = anchors.available_anchors()
    assert set(found) == {"kronfluence", "captum", "traker", "dattri"}
    assert all(isinstance(v, bool) for v in found.values())


def test_bad_inputs_raise_clear_errors(data):
    pytest.importorskip("captum")
    train, test = data
    model = _mlp()
    with pytest.raises(InvalidOptionError):
        anchors.kronfluence_scores(model, train, test, strategy="lissa")
    with pytest.raises(InvalidOptionError):
        anchors.captum_tracincp_scores(
            model, train, test, checkpoints=[model.state_dict()], learning_rates=[]
        )
    with pytest.raises(ShapeError):
        anchors.captum_tracincp_scores(
            model, (train[0], train[1][:-1]), test, checkpoints=[model.state_dict()], learning_rates=[1.0]
        )


# ------------------------------------------------------------------------------------------- kronfluence


def test_kronfluence_default_damping_is_the_library_default():
    pytest.importorskip("kronfluence")
    from kronfluence.arguments import ScoreArguments

    assert ScoreArguments().damping_factor == anchors.KRONFLUENCE_DEFAULT_DAMPING


def test_kronfluence_identity_equals_brute_force(data, tmp_path):
    """kronfluence returns +∇f·∇L; the adapter negates it into -∇m·∇L."""
    pytest.importorskip("kronfluence")
    train, test = data
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    got = anchors.kronfluence_scores(model, train, test, strategy="identity", workdir=tmp_path)
    want = _brute_force(model, train, test)
    _assert_close(got, want, rtol=1e-4)
    assert got[0, 0] > 0
    _assert_untouched(model, before)
    assert list(tmp_path.iterdir()) == []  # its scratch folder is removed


def test_kronfluence_identity_float64_model(data):
    pytest.importorskip("kronfluence")
    train, test = data
    model = _mlp().double()
    got = anchors.kronfluence_scores(model, (train[0].double(), train[1]), (test[0].double(), test[1]))
    _assert_close(got, _brute_force(model, train, test), rtol=1e-10)


@pytest.mark.parametrize("strategy", ["diagonal", "kfac", "ekfac"])
def test_kronfluence_preconditioners(data, strategy):
    """With damping λ far above the curvature, P ≈ I/λ, so λ·scores approach the plain gradient dot product;
    with kronfluence's own damping the duplicate of a query is still its proponent."""
    pytest.importorskip("kronfluence")
    train, test = data
    model = _mlp()
    want = _brute_force(model, train, test)
    damped = anchors.kronfluence_scores(model, train, test, strategy=strategy, damping_factor=1e4)
    _assert_close(damped * 1e4, want, rtol=2e-3)
    heuristic = anchors.kronfluence_scores(model, train, test, strategy=strategy, damping_factor=None)
    assert heuristic.shape == (N_TEST, N_TRAIN) and np.isfinite(heuristic).all()
    assert heuristic[0, 0] > 0


def test_kronfluence_heuristic_scale(data):
    """heuristic_scale replaces kronfluence's 0.1 for one call: at 0.1 it is the heuristic itself; far
    above the curvature the one-module preconditioner is ≈ I/λ, so scores follow the plain gradient dot
    product; kronfluence's constant is restored afterwards."""
    pytest.importorskip("kronfluence")
    import kronfluence.factor.config as config

    train, test = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10))
    for strategy in ("diagonal", "ekfac"):
        own = anchors.kronfluence_scores(model, train, test, strategy=strategy, damping_factor=None)
        same = anchors.kronfluence_scores(model, train, test, strategy=strategy, damping_factor=None,
                                          heuristic_scale=0.1)
        _assert_close(same, own, rtol=1e-6)
        big = anchors.kronfluence_scores(model, train, test, strategy=strategy, damping_factor=None,
                                         heuristic_scale=1e6)
        want = _brute_force(model, train, test)
        assert np.corrcoef(big.ravel(), want.ravel())[0, 1] > 0.9999
        assert np.corrcoef(own.ravel(), want.ravel())[0, 1] < 0.999  # the scale matters
    assert config.HEURISTIC_DAMPING_SCALE == 0.1
    with pytest.raises(InvalidOptionError):
        anchors.kronfluence_scores(model, train, test, strategy="ekfac", heuristic_scale=1.0)


# ------------------------------------------------------------------------------------------------- captum


@pytest.mark.parametrize("batched", [True, False])
def test_captum_tracincp_one_checkpoint_equals_brute_force(data, batched):
    """captum returns lr·∇ℓ_test·∇ℓ_train; with ℓ_test = -margin that is already -∇m·∇L."""
    pytest.importorskip("captum")
    train, test = data
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    got = anchors.captum_tracincp_scores(
        model,
        train,
        test,
        checkpoints=[model.state_dict()],
        learning_rates=[1.0],
        batch_size=16,
        sample_wise_grads_per_batch=batched,
    )
    _assert_close(got, _brute_force(model, train, test), rtol=1e-4)
    assert got[0, 0] > 0
    _assert_untouched(model, before)


def test_captum_tracincp_sums_checkpoints_weighted_by_learning_rate(data):
    pytest.importorskip("captum")
    train, test = data
    first, second = _mlp(0), _mlp(1)
    got = anchors.captum_tracincp_scores(
        first,
        train,
        test,
        checkpoints=[first.state_dict(), second.state_dict()],
        learning_rates=[0.5, 2.0],
    )
    want = 0.5 * _brute_force(first, train, test) + 2.0 * _brute_force(second, train, test)
    _assert_close(got, want, rtol=1e-4)


def test_captum_tracincp_model_with_other_layers(data):
    """A LayerNorm is outside captum's batched per-sample gradients: the adapter falls back to its loop."""
    pytest.importorskip("captum")
    train, test = data
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 10))
    got = anchors.captum_tracincp_scores(
        model, train, test, checkpoints=[model.state_dict()], learning_rates=[1.0]
    )
    _assert_close(got, _brute_force(model, train, test), rtol=1e-4)


# ------------------------------------------------------------------------------------------------- traker


def _trak_reference(models: list[nn.Module], train, test, proj_dim: int, lambda_reg: float,
                    damping_factor: float | None = None) -> np.ndarray:
    """TRAK written out: mean over checkpoints of φ_q (ΦᵀΦ + λI)⁻¹ Φᵀ (inverse scaled by its mean |entry|,
    as traker does), times the mean over checkpoints of 1 - p_i. Only the random matrix P comes from traker
    (its BasicProjector, seed 0, one seed per model id); gradients and algebra are computed here.
    `damping_factor`: λ_c = damping_factor · mean_i ‖φ_{c,i}‖² for each checkpoint instead of `lambda_reg`."""
    from trak.projectors import BasicProjector, ProjectionType

    total, weight = 0.0, 0.0
    for model_id, model in enumerate(models):
        query, _, margin, prob = _grads(model, train, test)
        dim = query.shape[1]
        projector = BasicProjector(
            grad_dim=dim, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.normal, device="cpu"
        )
        proj = projector.project(torch.eye(dim), model_id=model_id).double() / dim**0.5
        phi, phi_q = margin @ proj, query @ proj
        if damping_factor is not None:
            lambda_reg = damping_factor * float((phi**2).sum(1).mean())
        inverse = torch.linalg.inv(phi.T @ phi + lambda_reg * torch.eye(proj_dim, dtype=torch.float64))
        total = total + phi_q @ (inverse / inverse.abs().mean()) @ phi.T
        weight = weight + (1 - prob)
    return (total / len(models) * (weight / len(models))[None, :]).numpy()


@pytest.mark.parametrize(("proj_dim", "lambda_reg", "n_checkpoints"), [(32, 0.0, 2), (512, 1e3, 1)])
def test_traker_equals_trak_formula(data, tmp_path, proj_dim, lambda_reg, n_checkpoints):
    """traker's scores are positive for proponents already (∇L = -(1-p)∇m); no flip."""
    pytest.importorskip("trak")
    train, test = data
    models = [_mlp(seed) for seed in range(n_checkpoints)]
    before = copy.deepcopy(models[0].state_dict())
    got = anchors.traker_scores(
        models[0],
        train,
        test,
        checkpoints=[m.state_dict() for m in models],
        proj_dim=proj_dim,
        lambda_reg=lambda_reg,
        workdir=tmp_path,
    )
    _assert_close(got, _trak_reference(models, train, test, proj_dim, lambda_reg), rtol=1e-4)
    assert got[0, 0] > 0
    _assert_untouched(models[0], before)
    assert list(tmp_path.iterdir()) == []


def test_traker_damping_factor_per_checkpoint(data):
    """damping_factor sets each checkpoint's λ from its own features (sourcetrace's rule)."""
    pytest.importorskip("trak")
    train, test = data
    models = [_mlp(seed) for seed in range(2)]
    got = anchors.traker_scores(models[0], train, test, checkpoints=[m.state_dict() for m in models],
                                proj_dim=64, damping_factor=3.0)
    _assert_close(got, _trak_reference(models, train, test, 64, 0.0, damping_factor=3.0), rtol=1e-4)
    with pytest.raises(InvalidOptionError):
        anchors.traker_scores(models[0], train, test, checkpoints=[models[0].state_dict()], lambda_reg=1.0,
                              damping_factor=3.0)


def test_traker_large_damping_ranks_like_brute_force(data):
    """With λ ≫ ΦᵀΦ and a wide projection, TRAK reduces to the projected -∇m·∇L: its per-query ranking
    follows the brute-force one."""
    pytest.importorskip("trak")
    from scipy.stats import spearmanr

    train, test = data
    model = _mlp()
    got = anchors.traker_scores(
        model, train, test, checkpoints=[model.state_dict()], proj_dim=2048, lambda_reg=1e3
    )
    want = _brute_force(model, train, test)
    rho = np.mean([spearmanr(got[q], want[q])[0] for q in range(N_TEST)])
    assert rho > 0.5


def test_traker_warns_on_singular_default(data):
    pytest.importorskip("trak")
    train, test = data
    model = _mlp()
    with pytest.warns(RuntimeWarning, match="singular"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        anchors.traker_scores(model, train, test, checkpoints=[model.state_dict()], proj_dim=64)


# ------------------------------------------------------------------------------------------------- dattri


def _mean_loss_hessian(model: nn.Module, train) -> torch.Tensor:
    """Hessian of the *mean* cross-entropy over the training set, float64, flattened like _grads."""
    net = copy.deepcopy(model).double()
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    x, y = train

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return F.cross_entropy(torch.func.functional_call(net, params, (x.double(),)), y)

    return torch.func.hessian(mean_loss)(theta)


def _double(data):
    return data[0].double(), data[1]


def test_dattri_defaults_are_the_library_defaults():
    pytest.importorskip("dattri")
    import inspect

    import dattri.algorithm as algorithms
    from dattri.algorithm import tracin, trak
    from dattri.func.projection import random_project

    def default(cls, name):
        return inspect.signature(cls.__init__).parameters[name].default

    for method, argument in anchors._DATTRI_REGULARIZATION_ARGUMENT.items():
        assert default(getattr(algorithms, anchors.DATTRI_METHODS[method]), argument) == 0.0, method
    assert default(algorithms.IFAttributorLiSSA, "scaling") == anchors.DATTRI_LISSA_DEFAULT_SCALING
    projector = {k: v for k, v in anchors.DATTRI_PROJECTOR_DEFAULTS.items() if k != "proj_type"}
    assert projector == tracin.DEFAULT_PROJECTOR_KWARGS
    assert projector == trak.DEFAULT_PROJECTOR_KWARGS
    assert inspect.signature(random_project).parameters["proj_type"].default == "normal"


def test_dattri_explicit_large_regularization_equals_brute_force(data):
    """(H + λI)⁻¹ ≈ I/λ for λ far above the curvature: λ·scores → -∇m·∇L. dattri returns
    ∇L(i)ᵀ(H + λI)⁻¹∇m(q) (positive = up-weighting lowers m); the adapter negates it."""
    pytest.importorskip("dattri")
    train, test = data
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    got = anchors.dattri_scores(model, train, test, method="explicit", regularization=1e4)
    _assert_close(got * 1e4, _brute_force(model, train, test), rtol=1e-3)
    assert got[0, 0] > 0
    _assert_untouched(model, before)


def test_dattri_hessian_is_of_the_mean_loss(data):
    """dattri's damping convention: λ is added to the Hessian of the *mean* training loss (the adapter's
    loss_func averages, as dattri's examples do, and caches the whole training set as one batch)."""
    pytest.importorskip("dattri")
    train, test = data
    model = _mlp().double()
    query, loss, _, _ = _grads(model, train, test)
    hessian = _mean_loss_hessian(model, train)
    lam = 1.0  # the mean-loss Hessian of this model has eigenvalues in about [-0.6, 0.7]
    solved = torch.linalg.solve(hessian + lam * torch.eye(len(hessian), dtype=torch.float64), loss.T)
    want = -(query @ solved).numpy()
    explicit = anchors.dattri_scores(
        model, _double(train), _double(test), method="explicit", regularization=lam
    )
    _assert_close(explicit, want, rtol=1e-5)  # dattri accumulates the scores in float32
    # CG (dattri's default max_iter=10) on the same positive definite H + λI gives the same scores.
    cg = anchors.dattri_scores(model, _double(train), _double(test), method="cg", regularization=lam)
    _assert_close(cg, explicit, rtol=1e-5)
    # LiSSA solves (scaling·damping·I + H)⁻¹: the adapter passes damping = λ / scaling. A full batch per
    # step makes it deterministic; with scaling above the largest eigenvalue of H + λI it converges.
    lissa = anchors.dattri_scores(
        model,
        _double(train),
        _double(test),
        method="lissa",
        regularization=lam,
        lissa_batch_size=N_TRAIN,
        scaling=10.0,
        recursion_depth=200,
    )
    _assert_close(lissa, explicit, rtol=1e-4)


@pytest.mark.parametrize("method", ["datainf", "ekfac", "lissa"])
def test_dattri_curvature_methods_large_regularization(data, method):
    """DataInf's, EK-FAC's and LiSSA's damping all act as +λI: with λ large, λ·scores → -∇m·∇L."""
    pytest.importorskip("dattri")
    train, test = data
    model = _mlp()
    options = (
        {"lissa_batch_size": N_TRAIN, "scaling": 2e4, "recursion_depth": 50} if method == "lissa" else {}
    )
    got = anchors.dattri_scores(model, train, test, method=method, regularization=1e4, **options)
    _assert_close(got * 1e4, _brute_force(model, train, test), rtol=1e-3)


def test_dattri_datainf_default_is_not_finite(data):
    """dattri 0.3.0's DataInf defaults to regularization=0 and divides by it: library defaults give
    non-finite scores (the adapter passes dattri's default through unchanged)."""
    pytest.importorskip("dattri")
    train, test = data
    with np.errstate(all="ignore"):
        got = anchors.dattri_scores(_mlp(), train, test, method="datainf")
    assert not np.isfinite(got).all()


def test_dattri_arnoldi_runs_and_keeps_the_sign(data):
    """Arnoldi keeps only the top eigen-directions (no closed form to compare with); it must still rank
    the duplicate of a query as its proponent."""
    pytest.importorskip("dattri")
    train, test = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dattri warns when it drops negative eigenvalues
        got = anchors.dattri_scores(_mlp(), train, test, method="arnoldi", regularization=1.0, proj_dim=20)
    assert got.shape == (N_TEST, N_TRAIN) and np.isfinite(got).all()
    assert got[0, 0] > 0


def test_dattri_grad_dot_equals_brute_force(data):
    """TracIn with one checkpoint and weight 1 returns ∇L·∇m (negated by the adapter); with the identity
    projection it is exact. Projector options never leak into dattri's module-level defaults."""
    pytest.importorskip("dattri")
    from dattri.algorithm import tracin

    train, test = data
    model = _mlp()
    defaults = dict(tracin.DEFAULT_PROJECTOR_KWARGS)
    got = anchors.dattri_scores(
        model, train, test, method="grad-dot", projector_kwargs={"proj_type": "identity", "proj_dim": 7}
    )
    _assert_close(got, _brute_force(model, train, test), rtol=1e-4)
    assert defaults == tracin.DEFAULT_PROJECTOR_KWARGS
    projected = anchors.dattri_scores(model, train, test, method="grad-dot")  # dattri's 512-dim projection
    assert projected.shape == (N_TEST, N_TRAIN) and np.isfinite(projected).all()
    assert projected[0, 0] > 0


def test_dattri_trak_large_regularization_equals_brute_force(data):
    """dattri's TRAK: φ_q(ΦᵀΦ + λI)⁻¹φ_i·(1 - p_i) with φ = ∇m/√P (P parameters), positive for proponents
    already. With the identity projection and λ large, λ·P·scores → ∇m(q)·∇m(i)(1 - p_i) = -∇m·∇L."""
    pytest.importorskip("dattri")
    train, test = data
    model = _mlp()
    n_params = sum(p.numel() for p in model.parameters())
    got = anchors.dattri_scores(
        model, train, test, method="trak", regularization=1e4, projector_kwargs={"proj_type": "identity"}
    )
    _assert_close(got * 1e4 * n_params, _brute_force(model, train, test), rtol=1e-3)


def test_dattri_bad_options_raise(data):
    pytest.importorskip("dattri")
    train, test = data
    model = _mlp()
    for kwargs in (
        {"method": "tracin"},
        {"method": "cg", "regularization": -1.0},
        {"method": "cg", "lissa_batch_size": 4},
        {"method": "cg", "weights": [1.0]},
        {"method": "lissa", "regularization": 1.0, "damping": 0.1},
        {"method": "grad-dot", "regularization": 1.0},
        {"method": "cg", "checkpoints": []},
    ):
        with pytest.raises(InvalidOptionError):
            anchors.dattri_scores(model, train, test, **kwargs)
    with pytest.raises(ShapeError):
        anchors.dattri_scores(model, (train[0], train[1][:-1]), test)


# ------------------------------------------------------------------------------------ digits-mlp splits


def test_digits_reporting_split_queries_were_never_used_for_tuning():
    pytest.importorskip("sklearn")
    from sourcetrace.bench.digits import DigitsSetting
    from sourcetrace.bench.digits_mlp import _entries, _pairs

    tuning, reporting = DigitsSetting(), DigitsSetting(split="reporting", seed=1)

    def rows(x: torch.Tensor) -> set[bytes]:
        return {r.numpy().tobytes() for r in x}

    used = rows(tuning.x_train) | rows(tuning.x_query)
    assert not rows(reporting.x_query) & used  # neither trained on nor queried while tuning
    assert not rows(reporting.x_query) & rows(reporting.x_train)
    assert len(rows(reporting.x_train) ^ rows(tuning.x_train)) > 0  # another training draw
    assert tuning.fingerprint() != reporting.fingerprint()
    labels = {e[0] for e in _entries()}
    assert all(label in labels for pair in _pairs() for label in pair[1:])
    with pytest.raises(ValueError, match="split"):
        DigitsSetting(split="test")

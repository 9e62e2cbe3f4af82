"""Anchor adapters: run kronfluence, captum, traker and dattri on a classifier, in our sign convention.

Each adapter hands the model and data to the anchor library, lets the library do all of the computation,
and returns a numpy array [n_test, n_train] with sourcetrace's sign: a positive score means the training
example is a proponent (up-weighting it increases the query's measurement). For gradient dot products that
is ``-∇m(q)·∇L(i)``, with L the per-example cross-entropy and m the margin
``logit_y - logsumexp_{k≠y} logit_k``.

The libraries' own conventions, as verified by ``tests/test_bench_anchors.py``:

- kronfluence returns ``∇f(q)ᵀ P ∇L(i)`` (no leading minus; P its preconditioner): positive means
  up-weighting the example *decreases* the measurement f. We pass f = margin and negate.
- captum TracInCP returns ``Σ_c lr_c ∇ℓ_test(q)·∇ℓ(i)``; its test "loss" is ours to choose. We pass
  ``ℓ_test = -margin``, so its scores are already in our convention.
- traker returns ``φ(q)ᵀ(ΦᵀΦ + λI)⁻¹φ(i) · (1 - p_i)`` with φ the projected margin gradients, averaged over
  checkpoints: positive means proponent already, as ``∇L(i) = -(1 - p_i) ∇m(i)``. Its scale is arbitrary
  (traker rescales the inverse by its mean absolute entry).
- dattri's influence attributors return ``∇L(i)ᵀ(H + λI)⁻¹∇f(q)`` with H the Hessian of the training loss
  *as the loss function returns it* (the mean here) on the cached training batch, and TracIn (grad-dot)
  ``∇L(i)·∇f(q)``: positive means up-weighting decreases f. We pass f = margin and negate. dattri's TRAK,
  fed the margin on both sides as in its examples, is positive for proponents already.

Each call works on a deep copy of the model (the libraries wrap, freeze or reload it) and writes its files
into a fresh folder (under ``workdir`` when given) that is removed afterwards unless ``keep_files=True``:
kronfluence and traker silently reuse results found in an existing folder, which must never happen here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sourcetrace.errors import EmptyDataError, InvalidOptionError, MissingExtraError, ShapeError

#: Import name of each anchor package (key: the name on PyPI, as in the ``bench`` extra).
ANCHOR_MODULES: dict[str, str] = {
    "kronfluence": "kronfluence",
    "captum": "captum.influence",
    "traker": "trak",
    "dattri": "dattri",
}

#: ``kronfluence.ScoreArguments().damping_factor`` in kronfluence 1.0.1 (a test checks it still is).
KRONFLUENCE_DEFAULT_DAMPING = 1e-8

KRONFLUENCE_STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")

Data = tuple[Tensor, Tensor]


def available_anchors() -> dict[str, bool]:
    """Which anchor packages import in this environment (a broken install counts as missing)."""
    found = {}
    for name, module in ANCHOR_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - any failure to import means the anchor cannot run
            found[name] = False
        else:
            found[name] = True
    return found


def _require(name: str) -> None:
    try:
        importlib.import_module(ANCHOR_MODULES[name])
    except Exception as exc:  # noqa: BLE001
        raise MissingExtraError(
            f"the anchor '{name}' does not import ({exc}); install it with `pip install sourcetrace[bench]`"
        ) from exc


def _margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example margin ``logit_y - logsumexp_{k≠y} logit_k``, shape [B]."""
    index = labels.long().unsqueeze(1)
    correct = logits.gather(1, index).squeeze(1)
    others = logits.scatter(1, index, float("-inf"))
    return correct - others.logsumexp(dim=-1)


def _check_data(name: str, data: Data) -> tuple[Tensor, Tensor]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ShapeError(f"{name} must be a pair (inputs [N, ...], labels [N]); got {type(data).__name__}")
    x, y = data
    if len(x) == 0:
        raise EmptyDataError(f"{name} has no examples; pass at least one")
    if y.dim() != 1 or len(y) != len(x):
        raise ShapeError(f"{name} labels must have shape [{len(x)}]; got {tuple(y.shape)}")
    return x, y.long()


def _model_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode whose parameters all take gradients (the libraries differentiate them)."""
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


@contextlib.contextmanager
def _scratch(workdir: str | Path | None, prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh folder under ``workdir`` (or the system temp dir), removed on exit unless ``keep``."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=None if workdir is None else str(workdir)))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _quiet(*messages: str) -> Iterator[None]:
    """Silence the given known-harmless library warnings and undo traker's ``logging.basicConfig()``."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    with warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=message)
        try:
            yield
        finally:
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# --------------------------------------------------------------------------------------------- kronfluence


def kronfluence_scores(
    model: nn.Module,
    train: Data,
    test: Data,
    *,
    strategy: str = "identity",
    damping_factor: float | None = KRONFLUENCE_DEFAULT_DAMPING,
    heuristic_scale: float | None = None,
    batch_size: int = 64,
    workdir: str | Path | None = None,
    keep_files: bool = False,
    show_progress: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """kronfluence pairwise influence (Analyzer + Task), margin measurement, summed cross-entropy loss.

    ``strategy`` is kronfluence's factor strategy; ``damping_factor=None`` selects its heuristic,
    ``heuristic_scale`` × the mean eigenvalue of each module (kronfluence's own scale, 0.1, when
    ``heuristic_scale`` is None; another scale, e.g. sourcetrace's rule, is set for this call only and
    needs ``damping_factor=None``). Factors use kronfluence's defaults (true Fisher with labels sampled
    from the model, seeded by ``seed``; float32, or float64 for a float64 model). Only ``nn.Linear`` and
    ``nn.Conv2d`` parameters are tracked by kronfluence; other parameters are left out of the scores.
    """
    if strategy not in KRONFLUENCE_STRATEGIES:
        raise InvalidOptionError(f"strategy must be one of {KRONFLUENCE_STRATEGIES}; got {strategy!r}")
    if damping_factor is not None and damping_factor < 0:
        raise InvalidOptionError(f"damping_factor must be None or >= 0; got {damping_factor}")
    if heuristic_scale is not None and (damping_factor is not None or not heuristic_scale > 0):
        raise InvalidOptionError("heuristic_scale must be > 0 and needs damping_factor=None (the heuristic)")
    _require("kronfluence")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    x_train, y_train = _check_data("train", train)
    x_test, y_test = _check_data("test", test)
    generator = torch.Generator().manual_seed(seed)

    class _MarginTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            inputs, labels = batch
            logits = model(inputs)
            if sample:  # kronfluence's true Fisher: labels drawn from the model's own predictions
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().double(), dim=-1)
                    labels = torch.multinomial(probs.cpu(), 1, generator=generator).flatten()
                labels = labels.to(logits.device)
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            inputs, labels = batch
            return _margin(model(inputs), labels).sum()

    task = _MarginTask()
    prepared = prepare_model(copy.deepcopy(model), task)
    factor_args = FactorArguments(strategy=strategy)
    score_args = ScoreArguments(damping_factor=damping_factor)
    if _param_dtype(model) == torch.float64:
        for field in (
            "activation_covariance_dtype",
            "gradient_covariance_dtype",
            "per_sample_gradient_dtype",
            "lambda_dtype",
        ):
            setattr(factor_args, field, torch.float64)
        for field in (
            "per_sample_gradient_dtype",
            "precondition_dtype",
            "score_dtype",
            "query_gradient_svd_dtype",
        ):
            setattr(score_args, field, torch.float64)

    # kronfluence 1.0.1 builds a (disabled) torch.cuda.amp.GradScaler, which torch deprecates.
    with (
        _scratch(workdir, "kronfluence-", keep_files) as run_dir,
        _quiet(r".*torch\.cuda\.amp\.GradScaler"),
        _kronfluence_heuristic_scale(heuristic_scale),
    ):
        analyzer = Analyzer(
            analysis_name="anchor",
            model=prepared,
            task=task,
            cpu=True,
            disable_tqdm=not show_progress,
            output_dir=str(run_dir),
        )
        train_set = torch.utils.data.TensorDataset(x_train, y_train)
        test_set = torch.utils.data.TensorDataset(x_test, y_test)
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=train_set,
            per_device_batch_size=batch_size,
            factor_args=factor_args,
        )
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name=strategy,
            query_dataset=test_set,
            train_dataset=train_set,
            per_device_query_batch_size=batch_size,
            per_device_train_batch_size=batch_size,
            score_args=score_args,
        )
        raw = analyzer.load_pairwise_scores(scores_name="scores")["all_modules"]
        # kronfluence: ∇f(q)ᵀ P ∇L(i), positive = up-weighting decreases f; ours is the negative.
        return -raw.detach().cpu().double().numpy()


@contextlib.contextmanager
def _kronfluence_heuristic_scale(scale: float | None) -> Iterator[None]:
    """kronfluence 1.0.1 reads its heuristic's scale from a module constant when preconditioning; set it for
    one call (a test checks that the constant is still there, and restored)."""
    if scale is None:
        yield
        return
    import kronfluence.factor.config as config

    before = config.HEURISTIC_DAMPING_SCALE
    config.HEURISTIC_DAMPING_SCALE = float(scale)
    try:
        yield
    finally:
        config.HEURISTIC_DAMPING_SCALE = before


# ------------------------------------------------------------------------------------------------- captum


class _NegativeMarginLoss(nn.Module):
    """captum's test-side "loss": ``-margin``, reduced like the train loss (captum requires both to match)."""

    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.reduction = reduction  # captum reads this attribute to decide how to take per-example grads

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        values = -_margin(logits, labels)
        return values.sum() if self.reduction == "sum" else values


def _only_linear_and_conv(model: nn.Module) -> bool:
    """Whether every parameter belongs to an nn.Linear or nn.Conv2d (captum's batched per-sample grads)."""
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)) and type(module) not in (nn.Linear, nn.Conv2d):
            return False
    return True


def captum_tracincp_scores(
    model: nn.Module,
    train: Data,
    test: Data,
    *,
    checkpoints: Sequence[dict[str, Tensor]],
    learning_rates: Sequence[float],
    batch_size: int = 64,
    sample_wise_grads_per_batch: bool | None = None,
    workdir: str | Path | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """captum ``TracInCP``: ``Σ_c lr_c · (-∇m_c(q)·∇L_c(i))`` over the given checkpoints.

    The checkpoints are written as files that captum loads with ``checkpoints_load_func``, which returns
    each checkpoint's learning rate. Train side: cross-entropy; test side (``test_loss_fn``): ``-margin``.
    ``sample_wise_grads_per_batch=None`` uses captum's batched per-sample gradients when every parameter
    sits in an ``nn.Linear``/``nn.Conv2d`` (both losses then reduce by "sum"), else its per-example loop
    (both reduce by "none"); captum requires the train and test losses to have the same kind of reduction.
    """
    if len(checkpoints) == 0 or len(checkpoints) != len(learning_rates):
        raise InvalidOptionError(
            f"need one learning rate per checkpoint and at least one checkpoint; got {len(checkpoints)} "
            f"checkpoints and {len(learning_rates)} learning rates"
        )
    _require("captum")
    from captum.influence import TracInCP

    x_train, y_train = _check_data("train", train)
    x_test, y_test = _check_data("test", test)
    net = _model_copy(model)
    batched = (
        _only_linear_and_conv(net) if sample_wise_grads_per_batch is None else sample_wise_grads_per_batch
    )
    reduction = "sum" if batched else "none"

    def load_checkpoint(module: nn.Module, path: str) -> float:
        saved = torch.load(path, weights_only=True)
        module.load_state_dict(saved["state_dict"])
        module.eval()
        return float(saved["learning_rate"])

    # captum's batched per-sample gradients mark the inputs as requiring grad and warn about it.
    with (
        _scratch(workdir, "captum-") as run_dir,
        _quiet(r"Input Tensor \d+ did not already require gradients"),
    ):
        paths = []
        for index, (state, lr) in enumerate(zip(checkpoints, learning_rates, strict=True)):
            path = run_dir / f"checkpoint-{index}.pt"
            torch.save({"state_dict": dict(state), "learning_rate": float(lr)}, path)
            paths.append(str(path))
        tracin = TracInCP(
            net,
            torch.utils.data.TensorDataset(x_train, y_train),
            checkpoints=paths,
            checkpoints_load_func=load_checkpoint,
            loss_fn=nn.CrossEntropyLoss(reduction=reduction),
            test_loss_fn=_NegativeMarginLoss(reduction),
            batch_size=batch_size,
            sample_wise_grads_per_batch=batched,
        )
        queries = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x_test, y_test), batch_size=batch_size
        )
        scores = tracin.influence(queries, show_progress=show_progress)
        return scores.detach().cpu().double().numpy()


# ------------------------------------------------------------------------------------------------- traker


def traker_scores(
    model: nn.Module,
    train: Data,
    test: Data,
    *,
    checkpoints: Sequence[dict[str, Tensor]],
    proj_dim: int = 512,
    lambda_reg: float = 0.0,
    damping_factor: float | None = None,
    workdir: str | Path | None = None,
    batch_size: int = 64,
    seed: int = 0,
    keep_files: bool = False,
) -> np.ndarray:
    """traker ``TRAKer`` with its ``image_classification`` (margin) output, on CPU in float32.

    One model id per checkpoint (traker averages them); a ``BasicProjector`` with normal entries (traker's
    CUDA projector needs ``fast_jl``). With ``lambda_reg=0`` and ``proj_dim`` above the number of training
    examples, traker inverts a singular ΦᵀΦ and its scores are noise; a warning says so.
    ``damping_factor``: instead of one ``lambda_reg``, each checkpoint's λ_c = damping_factor · tr(Φ_cᵀΦ_c)/n
    from traker's own features (sourcetrace's TRAK rule applied to traker's unweighted ΦᵀΦ).
    """
    if len(checkpoints) == 0:
        raise InvalidOptionError("traker needs at least one checkpoint (a state_dict)")
    if damping_factor is not None and (lambda_reg != 0 or not damping_factor > 0):
        raise InvalidOptionError("give lambda_reg or damping_factor (> 0), not both")
    _require("traker")
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    x_train, y_train = _check_data("train", train)
    x_test, y_test = _check_data("test", test)
    if lambda_reg == 0 and damping_factor is None and proj_dim > len(x_train):
        warnings.warn(
            f"traker with proj_dim={proj_dim} > {len(x_train)} training examples and lambda_reg=0 inverts a "
            "singular matrix; pass lambda_reg > 0 or a smaller proj_dim",
            RuntimeWarning,
            stacklevel=2,
        )
    net = _model_copy(model).float()
    x_train, x_test = x_train.float(), x_test.float()
    grad_dim = sum(p.numel() for p in net.parameters())
    projector = BasicProjector(
        grad_dim=grad_dim,
        proj_dim=proj_dim,
        seed=seed,
        proj_type=ProjectionType.normal,
        device="cpu",
        dtype=torch.float32,
    )
    with _scratch(workdir, "traker-", keep_files) as run_dir, _quiet():
        traker = TRAKer(
            model=net,
            task="image_classification",
            train_set_size=len(x_train),
            save_dir=str(run_dir),
            device="cpu",
            projector=projector,
            proj_dim=proj_dim,
            use_half_precision=False,
            lambda_reg=lambda_reg,
            logging_level=logging.WARNING,
        )
        for model_id, state in enumerate(checkpoints):
            traker.load_checkpoint(state, model_id=model_id)
            for start in range(0, len(x_train), batch_size):
                stop = min(start + batch_size, len(x_train))
                traker.featurize(batch=(x_train[start:stop], y_train[start:stop]), num_samples=stop - start)
        if damping_factor is not None:
            # finalize_features hands each model id's features Φ to get_xtx, then inverts ΦᵀΦ + lambda_reg·I
            computer, get_xtx = traker.score_computer, traker.score_computer.get_xtx

            def xtx_setting_lambda(grads: Tensor) -> Tensor:
                computer.lambda_reg = damping_factor * float(grads.double().pow(2).sum()) / len(grads)
                return get_xtx(grads)

            computer.get_xtx = xtx_setting_lambda
        traker.finalize_features()
        if projector.num_blocks == 1 and not projector.proj_matrix_available:
            # traker 0.3.2 bug: finalize_features frees a one-block matrix that score() does not rebuild
            # when the model id is unchanged; rebuild it from the projector's own seeded generator state.
            projector.generate_sketch_matrix(projector.generator_states[0])
        for model_id, state in enumerate(checkpoints):
            traker.start_scoring_checkpoint(
                exp_name="anchor", checkpoint=state, model_id=model_id, num_targets=len(x_test)
            )
            for start in range(0, len(x_test), batch_size):
                stop = min(start + batch_size, len(x_test))
                traker.score(batch=(x_test[start:stop], y_test[start:stop]), num_samples=stop - start)
        scores = np.array(traker.finalize_scores(exp_name="anchor"), dtype=np.float64)  # [n_train, n_test]
        return scores.T.copy()


# ------------------------------------------------------------------------------------------------- dattri

#: ``method`` values of :func:`dattri_scores` and the dattri 0.3.0 class behind each.
DATTRI_METHODS: dict[str, str] = {
    "explicit": "IFAttributorExplicit",
    "cg": "IFAttributorCG",
    "lissa": "IFAttributorLiSSA",
    "arnoldi": "IFAttributorArnoldi",
    "datainf": "IFAttributorDataInf",
    "ekfac": "IFAttributorEKFAC",
    "grad-dot": "TracInAttributor",
    "trak": "TRAKAttributor",
}

#: dattri 0.3.0's ``DEFAULT_PROJECTOR_KWARGS`` of TracIn and TRAK, plus the ``proj_type`` that
#: ``random_project`` defaults to (a test checks both). The adapter passes a copy of these to each
#: attributor instead of letting dattri ``update()`` its module-level dict, which would leak one call's
#: projector options into every later call.
DATTRI_PROJECTOR_DEFAULTS: dict[str, Any] = {
    "proj_dim": 512,
    "proj_max_batch_size": 32,
    "proj_seed": 0,
    "proj_type": "normal",
    "device": "cpu",
}

#: The ``regularization`` of :func:`dattri_scores` becomes this constructor argument of each class.
#: LiSSA's ``damping`` d and ``scaling`` s solve ``(s·d·I + H)⁻¹``, so ``regularization`` λ becomes
#: ``damping = λ / scaling`` there.
_DATTRI_REGULARIZATION_ARGUMENT = {
    "explicit": "regularization",
    "cg": "regularization",
    "arnoldi": "regularization",
    "datainf": "regularization",
    "trak": "regularization",
    "lissa": "damping",
    "ekfac": "damping",
}

#: ``scaling`` of dattri 0.3.0's ``IFAttributorLiSSA`` (a test checks it still is).
DATTRI_LISSA_DEFAULT_SCALING = 50.0


@contextlib.contextmanager
def _dattri_progress(show: bool) -> Iterator[None]:
    """dattri's attributors draw tqdm bars with no switch to turn them off; hide them unless ``show``."""
    if show:
        yield
        return
    import dattri.algorithm.base
    import dattri.algorithm.tracin
    import dattri.algorithm.trak

    modules = (dattri.algorithm.base, dattri.algorithm.tracin, dattri.algorithm.trak)
    originals = [module.tqdm for module in modules]
    try:
        for module, original in zip(modules, originals, strict=True):
            module.tqdm = _silent(original)
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.tqdm = original


def _silent(tqdm_class: Any) -> Any:
    def make(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return tqdm_class(*args, **kwargs)

    return make


def dattri_scores(
    model: nn.Module,
    train: Data,
    test: Data,
    *,
    method: str = "cg",
    regularization: float | None = None,
    batch_size: int = 64,
    checkpoints: Sequence[dict[str, Tensor]] | None = None,
    weights: Sequence[float] | None = None,
    show_progress: bool = False,
    **method_options: Any,
) -> np.ndarray:
    """dattri's own attributors (``dattri.task.AttributionTask`` + ``dattri.algorithm``), in our sign.

    Train side: per-example cross-entropy (``loss_func``, reduced by the mean as in dattri's examples);
    test side: the margin (``target_func``). dattri's influence attributors return
    ``∇L(i)ᵀ(H + λI)⁻¹∇f(q)``, positive when up-weighting the example *decreases* f, so the scores are
    negated; ``grad-dot`` (TracIn, one checkpoint, weight 1) returns ``∇L(i)·∇f(q)`` and is negated too.
    ``trak`` uses the margin on both sides and ``1 - p_i`` (TRAK's own recipe, as in dattri's examples),
    which is positive for proponents already; its scale is arbitrary.

    H is the Hessian of the *mean* training loss: the influence attributors are cached with one batch
    holding the whole training set (dattri adds up ``(H_b + λI)⁻¹v`` over the batches of the cached loader,
    which is the Hessian of the mean only for a single batch). EK-FAC and DataInf use the empirical Fisher of
    the mean loss instead.

    ``regularization`` is λ in ``H + λI`` for every method: dattri's ``regularization`` argument, LiSSA's
    ``damping`` times its ``scaling`` (so ``damping = λ / scaling``) and EK-FAC's ``damping`` (added to
    its eigenvalues). ``None`` leaves dattri's default, 0 for all of them in 0.3.0 (DataInf then divides
    by zero and returns non-finite scores). ``method_options`` go to the attributor's constructor as they
    are (e.g. ``max_iter``, ``proj_dim``, ``recursion_depth``, ``projector_kwargs``), except
    ``lissa_batch_size``, which is LiSSA's own ``batch_size`` (``batch_size`` here is the loaders').

    ``checkpoints`` (state dicts; default: the model's own) are averaged by the influence attributors and
    TRAK and summed with ``weights`` (default ones) by ``grad-dot``; EK-FAC takes only one. dattri computes
    on CPU in the model's dtype and returns float32 scores.
    """
    if method not in DATTRI_METHODS:
        raise InvalidOptionError(f"method must be one of {tuple(DATTRI_METHODS)}; got {method!r}")
    if regularization is not None and regularization < 0:
        raise InvalidOptionError(f"regularization must be None or >= 0; got {regularization}")
    if batch_size < 1:
        raise InvalidOptionError(f"batch_size must be >= 1; got {batch_size}")
    if checkpoints is not None and len(checkpoints) == 0:
        raise InvalidOptionError("checkpoints must hold at least one state_dict (or be None)")
    if weights is not None and method != "grad-dot":
        raise InvalidOptionError(f"weights only apply to method='grad-dot'; got method={method!r}")
    _require("dattri")
    import dattri.algorithm as algorithms
    from dattri.task import AttributionTask

    x_train, y_train = _check_data("train", train)
    x_test, y_test = _check_data("test", test)
    net = _model_copy(model)
    dtype = _param_dtype(net)
    states = [copy.deepcopy(net.state_dict())] if checkpoints is None else [dict(s) for s in checkpoints]
    if weights is not None and len(weights) != len(states):
        raise InvalidOptionError(f"need one weight per checkpoint; got {len(weights)} for {len(states)}")

    def logits_of(params: dict[str, Tensor], x: Tensor) -> Tensor:
        if x.is_floating_point():
            x = x.to(dtype)  # LiSSA's collate function casts every tensor to float32
        return torch.func.functional_call(net, params, (x,))

    def batched(data: Any) -> tuple[Tensor, Tensor]:
        # dattri calls these on one example without a batch dimension (vmap over dim 0: TracIn, TRAK),
        # on one example with it (vmap over dim 1: influence functions) and on whole batches (Hessians).
        x, y = data
        if y.dim() == 0:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return x, y.long()

    def loss_func(params: dict[str, Tensor], data: Any) -> Tensor:
        x, y = batched(data)
        return F.cross_entropy(logits_of(params, x), y)

    def margin_func(params: dict[str, Tensor], data: Any) -> Tensor:
        x, y = batched(data)
        return _margin(logits_of(params, x), y).mean()

    def correct_probability(params: dict[str, Tensor], data: Any) -> Tensor:
        x, y = batched(data)
        return torch.softmax(logits_of(params, x), dim=-1).gather(1, y[:, None]).mean()

    options = dict(method_options)
    if "lissa_batch_size" in options:
        if method != "lissa":
            raise InvalidOptionError("lissa_batch_size only applies to method='lissa'")
        options["batch_size"] = options.pop("lissa_batch_size")
    if regularization is not None:
        argument = _DATTRI_REGULARIZATION_ARGUMENT.get(method)
        if argument is None:
            raise InvalidOptionError(f"method={method!r} has no regularization")
        if argument in options:
            raise InvalidOptionError(f"pass either regularization or {argument}, not both")
        if method == "lissa":
            options[argument] = regularization / options.get("scaling", DATTRI_LISSA_DEFAULT_SCALING)
        else:
            options[argument] = regularization

    train_set = torch.utils.data.TensorDataset(x_train, y_train)
    test_set = torch.utils.data.TensorDataset(x_test, y_test)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=batch_size)
    full_loader = torch.utils.data.DataLoader(train_set, batch_size=len(train_set))

    def task(loss: Any, target: Any) -> Any:
        return AttributionTask(loss_func=loss, model=net, checkpoints=states, target_func=target)

    with _dattri_progress(show_progress):
        if method in ("grad-dot", "trak"):
            projector = {**DATTRI_PROJECTOR_DEFAULTS, **(options.pop("projector_kwargs", None) or {})}
            if method == "grad-dot":
                attributor = algorithms.TracInAttributor(
                    task=task(loss_func, margin_func),
                    weight_list=torch.tensor([1.0] * len(states) if weights is None else list(weights)),
                    normalized_grad=options.pop("normalized_grad", False),
                    **options,
                )
            else:
                attributor = algorithms.TRAKAttributor(
                    task=task(margin_func, margin_func),
                    correct_probability_func=correct_probability,
                    **options,
                )
            attributor.projector_kwargs = projector  # instead of dattri's update() of its global dict
            if method == "grad-dot":
                raw = attributor.attribute(train_loader, test_loader)
                sign = -1.0
            else:
                attributor.cache(train_loader)
                raw = attributor.attribute(test_dataloader=test_loader)
                sign = 1.0
        elif method == "ekfac":
            # dattri 0.3.0's EK-FAC fits its factors on the task's *target* function, so the factors are
            # fitted with the loss as target and the scores computed with the margin as target.
            attributor = algorithms.IFAttributorEKFAC(task=task(loss_func, loss_func), **options)
            attributor.cache(full_loader)
            attributor.task = task(loss_func, margin_func)
            raw = attributor.attribute(train_loader, test_loader)
            sign = -1.0
        else:
            cls = getattr(algorithms, DATTRI_METHODS[method])
            attributor = cls(task=task(loss_func, margin_func), **options)
            attributor.cache(full_loader)
            raw = attributor.attribute(train_loader, test_loader)
            sign = -1.0
    # dattri: [n_train, n_test]; ours: [n_test, n_train].
    return sign * raw.detach().cpu().double().numpy().T.copy()

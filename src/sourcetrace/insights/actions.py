"""Actions on the training data with their simulated effect: remove, relabel, reweight, acquire.

Every action is a change of example weights over a *pool*: the training rows (weight 1), relabelled copies
of training rows and acquisition candidates (weight 0). Remove sets weights 1→0, reweight 1→c, relabel moves
a row's weight to its relabelled copy, acquire sets candidates 0→1. With scores of the queries against the
whole pool, the predicted change of query q's measurement is scale · Σ_j Δw_j · score(q, j), and a
behaviour's metric is re-evaluated at the predicted margins. `verify` retrains the `Setting` with the action
applied and reports the measured change beside the prediction.

Pool scores come from `pool_scores`: the attributor is fitted on the pool with the candidate rows' losses
multiplied by a tiny ε (and their columns divided by ε), so the candidates do not enter the curvature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import EmptyDataError, InvalidOptionError
from ..scores import Scores
from ..tasks import task_config
from .behaviour import Behaviour
from .setting import Setting

KINDS = ("remove", "relabel", "reweight", "acquire")
EPSILON = 1e-4


@dataclass(frozen=True)
class Action:
    """remove / reweight training rows `rows` (positions), relabel them to `labels`, or acquire pool rows."""

    kind: str
    rows: tuple[int, ...]
    labels: tuple[int, ...] = ()
    weight: float = 0.0
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidOptionError(f"unknown action {self.kind!r}; use one of {', '.join(KINDS)}")
        if not self.rows:
            raise EmptyDataError(f"the {self.kind} action names no rows")
        if self.kind == "relabel" and len(self.labels) != len(self.rows):
            raise InvalidOptionError("relabel needs one new label per row (labels=...)")
        if self.kind == "reweight" and self.weight < 0:
            raise InvalidOptionError("a weight must be non-negative")

    def describe(self) -> str:
        what = {
            "remove": "remove",
            "relabel": "relabel",
            "reweight": f"reweight to {self.weight:g}×",
            "acquire": "acquire",
        }[self.kind]
        return f"{what} {len(self.rows)} {'candidate' if self.kind == 'acquire' else 'training'} rows" + (
            f" ({self.note})" if self.note else ""
        )


@dataclass
class Pool:
    """Query scores against training rows, relabelled copies (row r with label c) and candidates."""

    scores: Scores  # columns: train rows, then (r, c) copies in `copies` order, then candidates
    n_train: int
    copies: list[tuple[int, int]]
    n_candidates: int
    scale: float  # margin change per unit of weight × score

    def column(self, kind: str, index: Any) -> int:
        if kind == "train":
            return int(index)
        if kind == "copy":
            return self.n_train + self.copies.index(tuple(index))
        return self.n_train + len(self.copies) + int(index)


class WeightedTask:
    """A task whose training loss is multiplied by each example's weight `w` (dict batches)."""

    def __init__(self, task: Any):
        self.task = task

    def train_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.task.train_loss(model, batch) * batch["w"]

    def measurement(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.task.measurement(model, batch)

    def outputs(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.task.outputs(model, batch)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.task.loss_from_outputs(outputs, batch) * batch["w"]

    def config(self) -> dict[str, Any]:
        return {"task": "weighted", "inner": task_config(self.task)}


def pool_scores(
    setting: Setting,
    model: torch.nn.Module,
    *,
    relabel: Sequence[tuple[int, int]] = (),
    method: str = "explicit",
    progress: bool = False,
    **options: Any,
) -> Pool:
    """Scores of the setting's queries (margins) against its training rows, relabelled copies `relabel`
    [(row, new label)] and all pool candidates, for a model trained with `setting.train()`.

    For influence with damping λ = setting.wd the scores predict weight changes exactly to first order;
    the curvature is the pool's mean, so λ is rescaled by n_train/n_pool and the scale is 1/n_pool.
    """
    from ..attributor import Attributor
    from ..tasks import ClassificationTask

    copies = [(int(r), int(c)) for r, c in relabel]
    xs = [setting.x_train] + ([setting.x_train[[r for r, _ in copies]]] if copies else []) + [setting.x_pool]
    ys = [setting.y_train] + ([np.array([c for _, c in copies])] if copies else []) + [setting.y_pool]
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int64)
    n_pool, n = len(y), setting.n_train
    w = np.full(n_pool, EPSILON)
    w[:n] = 1.0
    rows = [
        {
            "x": torch.from_numpy(x[i]),
            "y": torch.tensor(int(y[i])),
            "w": torch.tensor(float(w[i]), dtype=torch.float64),
        }
        for i in range(n_pool)
    ]
    if method in ("explicit", "cg", "lissa", "arnoldi", "influence"):
        options.setdefault("damping", setting.wd * n / n_pool)
    options.setdefault("store_dtype", "float64")
    attr = Attributor(model, WeightedTask(ClassificationTask()), method, progress=progress, **options)
    queries = [
        {
            "x": torch.from_numpy(setting.x_query[i]),
            "y": torch.tensor(int(setting.y_query[i])),
            "w": torch.tensor(1.0, dtype=torch.float64),
        }
        for i in range(len(setting.y_query))
    ]
    scores = attr.fit(rows).score(queries)
    matrix = scores.matrix.double() / torch.from_numpy(w)[None, :]  # type: ignore[union-attr]
    ids = (
        [f"train:{i}" for i in range(n)]
        + [f"copy:{r}:{c}" for r, c in copies]
        + [f"pool:{i}" for i in range(len(setting.y_pool))]
    )
    pooled = Scores(
        matrix,
        ids,
        list(range(len(setting.y_query))),
        method,
        {"removal_scale": 1.0 / n_pool, "kind": "pool"},
    )
    return Pool(pooled, n, copies, len(setting.y_pool), 1.0 / n_pool)


def weight_change(action: Action, pool: Pool) -> np.ndarray:
    """Δw over the pool's columns."""
    dw = np.zeros(pool.scores.shape[1])
    if action.kind == "acquire":
        for r in action.rows:
            dw[pool.column("candidate", r)] = 1.0
    elif action.kind == "relabel":
        for r, c in zip(action.rows, action.labels):
            dw[pool.column("train", r)] -= 1.0
            dw[pool.column("copy", (r, c))] += 1.0
    else:
        for r in action.rows:
            dw[pool.column("train", r)] = action.weight - 1.0 if action.kind == "reweight" else -1.0
    return dw


def predict_margins(action: Action, pool: Pool) -> np.ndarray:
    """Predicted change of every query's margin, [n_query]."""
    matrix = pool.scores.matrix.numpy()  # type: ignore[union-attr]
    return pool.scale * (matrix @ weight_change(action, pool))


def apply(setting: Setting, action: Action, seed: int = 0) -> torch.nn.Module:
    """Retrain the setting with the action applied."""
    weights, labels = np.ones(setting.n_train), setting.y_train.copy()
    extra = None
    rows = list(action.rows)
    if action.kind == "remove":
        weights[rows] = 0.0
    elif action.kind == "reweight":
        weights[rows] = action.weight
    elif action.kind == "relabel":
        labels[rows] = list(action.labels)
    else:
        extra = (setting.x_pool[rows], setting.y_pool[rows])  # type: ignore[index]
    return setting.train(weights=weights, labels=labels, extra=extra, seed=seed)


@dataclass(frozen=True)
class Effect:
    """A behaviour's metric before, predicted after and (when verified) measured after an action, with
    percentile-bootstrap intervals over the behaviour's queries for the predicted and actual changes."""

    action: Action
    behaviour: Behaviour
    before: float
    predicted_after: float
    actual_after: float | None = None
    error_before: float | None = None
    predicted_error_after: float | None = None
    actual_error_after: float | None = None
    predicted_ci: tuple[float, float] | None = None
    actual_ci: tuple[float, float] | None = None

    @property
    def predicted_change(self) -> float:
        return self.predicted_after - self.before

    @property
    def actual_change(self) -> float | None:
        return None if self.actual_after is None else self.actual_after - self.before

    def row(self) -> dict[str, Any]:
        return {
            "action": self.action.describe(),
            "behaviour": self.behaviour.name,
            "metric": self.behaviour.metric if self.behaviour.metric != "gap" else f"{self.behaviour.of} gap",
            "before": self.before,
            "predicted_after": self.predicted_after,
            "actual_after": self.actual_after,
            "predicted_change": self.predicted_change,
            "actual_change": self.actual_change,
            "predicted_ci": self.predicted_ci,
            "actual_ci": self.actual_ci,
            "error_before": self.error_before,
            "predicted_error_after": self.predicted_error_after,
            "actual_error_after": self.actual_error_after,
        }


def whatif(
    action: Action,
    behaviour: Behaviour,
    pool: Pool,
    margins: Any,
    *,
    setting: Setting | None = None,
    verify: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Effect:
    """Predict (and with `verify`, retrain and measure) the effect of `action` on `behaviour`.

    `margins` are the queries' current margins (from the model trained on the unchanged setting).
    """
    m = np.asarray(margins, dtype=np.float64)
    predicted = m + predict_margins(action, pool)
    actual = None
    if verify:
        if setting is None:
            raise InvalidOptionError("verify=True retrains the setting; pass setting=")
        actual = setting.margins(apply(setting, action, seed=seed))
    before, after = behaviour.value(m), behaviour.value(predicted)
    pci = _bootstrap(behaviour, m, predicted, n_bootstrap, seed)
    return Effect(
        action,
        behaviour,
        before,
        after,
        None if actual is None else behaviour.value(actual),
        behaviour.error(m),
        behaviour.error(predicted),
        None if actual is None else behaviour.error(actual),
        pci,
        None if actual is None else _bootstrap(behaviour, m, actual, n_bootstrap, seed),
    )


def _bootstrap(
    behaviour: Behaviour, before: np.ndarray, after: np.ndarray, n: int, seed: int
) -> tuple[float, float]:
    """95% percentile interval of the metric change, resampling the behaviour's queries (each slice apart)."""
    rng = np.random.default_rng(seed)
    a, b = np.array(behaviour.queries), np.array(behaviour.versus, dtype=np.int64)
    changes = np.empty(n)
    for t in range(n):
        qa = rng.choice(a, len(a))
        qb = rng.choice(b, len(b)) if len(b) else b
        resampled = Behaviour(
            behaviour.name,
            tuple(qa.tolist()),
            behaviour.metric,
            tuple(qb.tolist()),
            behaviour.of,
            behaviour.temperature,
        )
        changes[t] = resampled.value(after) - resampled.value(before)
    low, high = np.quantile(changes, [0.025, 0.975])
    return float(low), float(high)

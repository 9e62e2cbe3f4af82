"""What `sourcetrace whatif FOLDER` does: load a saved `Setting`, build the action and the behaviour from
command-line words, predict the effect and (with verify) retrain, and keep the result in FOLDER."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write_json
from ..errors import EmptyDataError, InvalidOptionError
from .actions import KINDS, Action, Effect, pool_scores, whatif
from .behaviour import Behaviour
from .setting import Setting


def make_example(folder: str | os.PathLike) -> Setting:
    """Save the planted tabular setting (`insights.planted`) in `folder` and return it."""
    from .planted import planted_tabular

    setting = planted_tabular().setting
    setting.save(folder)
    return setting


def _match(meta: dict[str, np.ndarray], spec: str, where: str) -> np.ndarray:
    if "=" not in spec:
        raise InvalidOptionError(f"give {where} as COLUMN=VALUE (columns: {', '.join(meta) or 'none'})")
    col, value = spec.split("=", 1)
    if col not in meta:
        raise InvalidOptionError(f"no column {col!r} in the {where}; columns: {', '.join(meta) or 'none'}")
    rows = np.flatnonzero(meta[col].astype(str) == value)
    if rows.size == 0:
        raise EmptyDataError(f"no {where} row has {col}={value}")
    return rows


def run_whatif(
    folder: str | os.PathLike,
    *,
    action: str = "remove",
    rows: str | None = None,
    group: str | None = None,
    label: int | None = None,
    weight: float = 0.0,
    slice_: str | None = None,
    errors_only: bool = False,
    metric: str = "margin",
    verify: bool = False,
) -> Effect:
    """Predict (and verify) one action's effect on a behaviour of the setting saved in `folder`.

    rows: comma-separated positions (training rows; pool rows for acquire), or group: COLUMN=VALUE of the
    training metadata (pool metadata for acquire). relabel sends rows to `label` (default: the model's
    predicted class). The behaviour is the queries of slice COLUMN=VALUE (default: all), only the
    misclassified ones with errors_only, measured by `metric` (margin, loss or accuracy).
    """
    if action not in KINDS:
        raise InvalidOptionError(f"unknown action {action!r}; use one of {', '.join(KINDS)}")
    if (rows is None) == (group is None):
        raise InvalidOptionError(
            "name the rows to act on with --rows 1,2,3 or --group COLUMN=VALUE (one of them)"
        )
    setting = Setting.load(folder)
    model = setting.train()
    margins = setting.margins(model)
    meta = setting.pool_meta if action == "acquire" else setting.train_meta
    n = len(setting.y_pool) if action == "acquire" else setting.n_train  # type: ignore[arg-type]
    if rows is not None:
        try:
            picked = np.array([int(r) for r in rows.split(",") if r.strip()], dtype=np.int64)
        except ValueError:
            raise InvalidOptionError(f"--rows takes comma-separated row numbers; got {rows!r}") from None
        if picked.size == 0 or picked.min() < 0 or picked.max() >= n:
            raise InvalidOptionError(f"--rows must lie in 0..{n - 1}")
    else:
        picked = _match(meta, group, "pool" if action == "acquire" else "training data")  # type: ignore[arg-type]
    relabel: list[tuple[int, int]] = []
    labels: tuple[int, ...] = ()
    if action == "relabel":
        predicted = model(setting.examples(setting.x_train[picked], setting.y_train[picked])[0]).argmax(1)
        labels = tuple(int(label) if label is not None else int(c) for c in predicted)
        relabel = list(zip(picked.tolist(), labels))
    act = Action(action, tuple(picked.tolist()), labels, weight, note=group or "")
    queries = (
        np.ones(len(margins), dtype=bool)
        if slice_ is None
        else np.isin(np.arange(len(margins)), _match(setting.query_meta, slice_, "queries"))
    )
    if errors_only:
        queries &= margins < 0
    if not queries.any():
        raise EmptyDataError("the behaviour has no queries (no errors in that slice?)")
    behaviour = Behaviour(slice_ or "all queries", tuple(np.flatnonzero(queries).tolist()), metric)
    pool = pool_scores(setting, model, relabel=relabel)
    effect = whatif(act, behaviour, pool, margins, setting=setting, verify=verify)
    atomic_write_json(Path(folder) / "whatif" / f"{action}-{len(act.rows)}.json", effect.row())
    return effect


def effect_table(e: Effect):  # -> rich.table.Table
    """Predicted and retrained values side by side, for the terminal."""
    from rich.table import Table

    verified = e.actual_after is not None
    table = Table(
        "",
        "predicted",
        "retrained" if verified else "retrained (use --verify)",
        title=f"{e.action.describe()} → {e.behaviour.name} ({e.behaviour.metric})",
    )

    def cell(v: float | None, ci: tuple[float, float] | None = None) -> str:
        if v is None:
            return "–"
        return f"{v:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")

    table.add_row("metric before", cell(e.before), cell(e.before))
    table.add_row("metric after", cell(e.predicted_after), cell(e.actual_after))
    table.add_row(
        "change [95% CI]", cell(e.predicted_change, e.predicted_ci), cell(e.actual_change, e.actual_ci)
    )
    table.add_row("error rate before", cell(e.error_before), cell(e.error_before))
    table.add_row("error rate after", cell(e.predicted_error_after), cell(e.actual_error_after))
    return table

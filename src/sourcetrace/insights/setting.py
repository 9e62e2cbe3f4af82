"""A small saved setting where every insight can be checked by retraining: tabular data, a linear (or
one-hidden-layer) classifier trained to convergence, metadata columns that define groups and slices.

Training minimises `Σ_i w_i · CE_i / n_train + wd/2 · ‖θ‖²` in float64 with L-BFGS, where n_train counts the
original training rows. Example weights enter linearly, so removing (w: 1→0), reweighting, relabelling
(remove the row, add it with another label) and acquiring (add rows, w: 0→1) are all weight changes, and
influence with damping `wd` predicts each of them to first order with scale 1/n_train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..artifacts import atomic_write, atomic_write_json, read_json
from ..errors import InvalidOptionError, ShapeError


@dataclass(eq=False)
class Setting:
    """Training rows, query rows and candidate rows (for `acquire`), their metadata, and how to train.

    `train_meta` / `query_meta` / `pool_meta` map a column name to one value per row (groups and slices
    are chosen by column and value). `hidden=0` trains a softmax regression (convex: retraining is exact and
    seed-free); `hidden>0` a one-hidden-layer tanh network.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_query: np.ndarray
    y_query: np.ndarray
    x_pool: Any = None  # [n_pool, d]; empty when None
    y_pool: Any = None
    train_meta: dict[str, np.ndarray] = field(default_factory=dict)
    query_meta: dict[str, np.ndarray] = field(default_factory=dict)
    pool_meta: dict[str, np.ndarray] = field(default_factory=dict)
    n_classes: int = 0
    hidden: int = 0
    wd: float = 1e-3
    max_iter: int = 500
    name: str = "setting"

    def __post_init__(self) -> None:
        self.x_train = np.asarray(self.x_train, dtype=np.float64)
        self.x_query = np.asarray(self.x_query, dtype=np.float64)
        self.y_train = np.asarray(self.y_train, dtype=np.int64)
        self.y_query = np.asarray(self.y_query, dtype=np.int64)
        if self.x_train.ndim != 2 or len(self.x_train) != len(self.y_train):
            raise ShapeError(
                f"x_train {self.x_train.shape} and y_train {self.y_train.shape}: give a matrix "
                "[n, d] and one label per row"
            )
        if (
            self.x_query.ndim != 2
            or self.x_query.shape[1] != self.x_train.shape[1]
            or len(self.x_query) != len(self.y_query)
        ):
            raise ShapeError(
                f"x_query {self.x_query.shape} must have the columns of x_train "
                f"{self.x_train.shape} and one label per row"
            )
        if self.x_pool is None:
            self.x_pool = np.zeros((0, self.x_train.shape[1]))
            self.y_pool = np.zeros(0, dtype=np.int64)
        self.x_pool = np.asarray(self.x_pool, dtype=np.float64)
        self.y_pool = np.asarray(self.y_pool, dtype=np.int64)
        if not self.n_classes:
            self.n_classes = (
                int(
                    max(
                        self.y_train.max(),
                        self.y_query.max(),
                        -1 if not len(self.y_pool) else self.y_pool.max(),
                    )
                )
                + 1
            )
        for name, meta, n in (
            ("train_meta", self.train_meta, len(self.y_train)),
            ("query_meta", self.query_meta, len(self.y_query)),
            ("pool_meta", self.pool_meta, len(self.y_pool)),
        ):
            for key, values in meta.items():
                if len(values) != n:
                    raise ShapeError(f"{name}[{key!r}] has {len(values)} values for {n} rows")
                meta[key] = np.asarray(values)

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    # ---- training --------------------------------------------------------------------------------------
    def model(self, seed: int = 0) -> nn.Module:
        """An untrained model of this setting's architecture (float64); a linear one starts at zero."""
        torch.manual_seed(seed)
        d, c = self.x_train.shape[1], self.n_classes
        if self.hidden:
            return nn.Sequential(nn.Linear(d, self.hidden), nn.Tanh(), nn.Linear(self.hidden, c)).double()
        linear = nn.Linear(d, c)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        return linear.double()

    def train(
        self,
        weights: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        extra: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
    ) -> nn.Module:
        """Train on the training rows with per-row `weights` (default 1) and `labels` (default y_train),
        plus `extra` rows (x, y) with weight 1; the loss is normalised by n_train in every case."""
        x, y = self.x_train, self.y_train if labels is None else np.asarray(labels, dtype=np.int64)
        w = np.ones(self.n_train) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (self.n_train,) or y.shape != (self.n_train,):
            raise ShapeError(f"give one weight and one label per training row ({self.n_train})")
        if extra is not None and len(extra[1]):
            x = np.concatenate([x, np.asarray(extra[0], dtype=np.float64)])
            y = np.concatenate([y, np.asarray(extra[1], dtype=np.int64)])
            w = np.concatenate([w, np.ones(len(extra[1]))])
        return fit_weighted(
            self.model(seed),
            torch.from_numpy(x),
            torch.from_numpy(y),
            torch.from_numpy(w),
            n=self.n_train,
            wd=self.wd,
            max_iter=self.max_iter,
        )

    def margins(
        self, model: nn.Module, x: np.ndarray | None = None, y: np.ndarray | None = None
    ) -> np.ndarray:
        """Margins (log-odds of the true class) of rows x, y (default: the queries)."""
        x = self.x_query if x is None else x
        y = self.y_query if y is None else y
        with torch.no_grad():
            logits = model(torch.as_tensor(np.asarray(x, dtype=np.float64)))
        return margins_from_logits(logits, torch.as_tensor(np.asarray(y, dtype=np.int64))).numpy()

    def features(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        """The representation the classifier's last layer sees (the inputs for a linear model)."""
        if not self.hidden:
            return np.asarray(x, dtype=np.float64)
        with torch.no_grad():
            return model[1](model[0](torch.as_tensor(x, dtype=torch.float64))).numpy()  # type: ignore[index]

    def examples(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as the (inputs, labels) pair an `Attributor` takes."""
        return torch.as_tensor(np.asarray(x, dtype=np.float64)), torch.as_tensor(
            np.asarray(y, dtype=np.int64)
        )

    # ---- persistence -----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write `folder/setting.npz` and `folder/setting.json` (atomically)."""
        folder = Path(folder)
        arrays = {
            "x_train": self.x_train,
            "y_train": self.y_train,
            "x_query": self.x_query,
            "y_query": self.y_query,
            "x_pool": self.x_pool,
            "y_pool": self.y_pool,
        }
        for prefix, meta in (
            ("train_meta", self.train_meta),
            ("query_meta", self.query_meta),
            ("pool_meta", self.pool_meta),
        ):
            arrays.update({f"{prefix}:{k}": v.astype(str) for k, v in meta.items()})

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)  # type: ignore[arg-type]

        atomic_write(folder / "setting.npz", write)
        atomic_write_json(
            folder / "setting.json",
            {
                "kind": "sourcetrace-setting",
                "name": self.name,
                "n_classes": self.n_classes,
                "hidden": self.hidden,
                "wd": self.wd,
                "max_iter": self.max_iter,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Setting:
        folder = Path(folder)
        if not (folder / "setting.json").exists():
            raise FileNotFoundError(
                f"{folder} holds no setting (setting.json is missing); make one with "
                "Setting(...).save(folder) or `sourcetrace whatif FOLDER --example`"
            )
        info = read_json(folder / "setting.json")
        if info.get("kind") != "sourcetrace-setting":
            raise InvalidOptionError(f"{folder}/setting.json is not a sourcetrace setting")
        with np.load(folder / "setting.npz") as data:
            arrays = {k: data[k] for k in data.files}
        metas: dict[str, dict[str, np.ndarray]] = {"train_meta": {}, "query_meta": {}, "pool_meta": {}}
        for key in list(arrays):
            if ":" in key:
                prefix, col = key.split(":", 1)
                metas[prefix][col] = arrays.pop(key)
        return cls(
            **arrays,
            **metas,  # type: ignore[arg-type]
            n_classes=info["n_classes"],
            hidden=info["hidden"],
            wd=info["wd"],
            max_iter=info["max_iter"],
            name=info["name"],
        )


def margins_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logit_y − logsumexp_{k≠y} logit_k, the measurement of `ClassificationTask` (margin)."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def fit_weighted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    *,
    n: int,
    wd: float,
    max_iter: int = 500,
) -> nn.Module:
    """Minimise Σ w_i CE_i / n + wd/2 ‖θ‖² with L-BFGS (strong Wolfe line search) to tight tolerance."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * F.cross_entropy(model(x), y, reduction="none")).sum() / n
        loss = loss + 0.5 * wd * sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)
    model.eval()
    return model

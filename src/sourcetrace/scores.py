"""Scores: attribution scores of queries against training examples, with their ids.

Sign convention, for every method in sourcetrace: **a positive score means the training example is a
proponent of the query** — up-weighting it would increase the query's measurement (a margin, a
log-probability; a loss enters as its negative). For gradient methods this makes
`score(q, i) = -∇m(q) · P ∇L(i)`, with P the method's preconditioner (identity for grad-dot): one
gradient step on example i with step size η changes m(q) by about η · score(q, i).

Scores are dense ([n_query, n_train]) or, when scored with `top_k`, hold only the k highest and k lowest
scores of each query.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifacts import atomic_write, atomic_write_json
from .data import Ids, plain_id
from .errors import InvalidOptionError, MissingExtraError, ScoresError, ShapeError


@dataclass(frozen=True)
class Attribution:
    """One training example's score for one query."""

    train_id: Any
    index: int
    score: float


@dataclass
class Scores:
    """Scores of `query_ids` (rows) against `train_ids` (columns); see the module docstring for the sign."""

    matrix: torch.Tensor | None
    train_ids: Sequence[Any]  # a list, or `data.Ids` (compact: no Python object per example)
    query_ids: Sequence[Any]
    method: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    self_influence: torch.Tensor | None = None
    top_values: torch.Tensor | None = None  # [n_query, k], descending, when only the extremes are kept
    top_indices: torch.Tensor | None = None
    bottom_values: torch.Tensor | None = None  # [n_query, k], ascending
    bottom_indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        nq, nt = len(self.query_ids), len(self.train_ids)
        if self.matrix is not None and tuple(self.matrix.shape) != (nq, nt):
            raise ShapeError(f"score matrix of shape {tuple(self.matrix.shape)} for {nq} queries and "
                             f"{nt} training examples")
        if self.matrix is None and self.top_values is None:
            raise ShapeError("Scores need a matrix or top/bottom values")
        if self.self_influence is not None and self.self_influence.shape != (nt,):
            raise ShapeError(f"self-influence of shape {tuple(self.self_influence.shape)}, expected ({nt},)")

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.query_ids), len(self.train_ids)

    @property
    def is_dense(self) -> bool:
        """Whether every score is kept (`matrix`), not only each query's top and bottom k."""
        return self.matrix is not None

    @property
    def dense(self) -> bool:
        """Deprecated name of `is_dense` (a bool; the scores themselves are `matrix`)."""
        warnings.warn("Scores.dense is renamed is_dense (a bool: whether every score is kept); the score "
                      "matrix is Scores.matrix", DeprecationWarning, stacklevel=2)
        return self.is_dense

    def _dense(self, what: str) -> torch.Tensor:
        if self.matrix is None:
            raise ScoresError(f"{what} needs every score, but these scores keep only the top "
                              f"{self.top_values.shape[1]} per query; score again without top_k")  # type: ignore
        return self.matrix

    def _row(self, query: Any = None, row: int | None = None, query_id: Any = None) -> int:
        given = [name for name, v in (("query", query), ("row", row), ("query_id", query_id))
                 if v is not None]
        if len(given) > 1:
            raise ScoresError(f"give one of query, row and query_id; got {' and '.join(given)}")
        n = len(self.query_ids)
        if row is not None or not given:
            position = _position(0 if row is None else row)
            if position is None or not 0 <= position < n:
                raise ScoresError(f"row must be a position in [0, {n}); got {row!r}")
            return position
        if query_id is not None:
            return self._row_of_id(query_id)
        position = _position(query)
        is_position = position is not None and 0 <= position < n
        if query in self.query_ids:
            r = self._row_of_id(query)
            if is_position and r != position:
                raise ScoresError(f"query={query!r} is ambiguous: it is the id of row {r} and also the "
                                  f"position of row {query}; say query_id={query!r} or row={query!r}")
            return r
        if is_position:
            return position  # type: ignore[return-value]
        raise ScoresError(f"no query {query!r}; give a query id (e.g. {self.query_ids[0]!r}) or row=position "
                          f"< {n}")

    def _row_of_id(self, query_id: Any) -> int:
        try:
            return self.query_ids.index(query_id)
        except ValueError:
            raise ScoresError(f"no query with id {query_id!r}; ids are e.g. {self.query_ids[:3]!r}") from None

    def top(self, query: Any = None, k: int = 10, *, row: int | None = None, query_id: Any = None
            ) -> list[Attribution]:
        """The k strongest proponents of a query, highest score first.

        `query` is a query id, or a position where no query has that id (an int that is both an id and
        another row's position is refused as ambiguous); `row=` is always a position, `query_id=` always
        an id. Without any, the first query.
        """
        return self._extreme(self._row(query, row, query_id), k, largest=True)

    def bottom(self, query: Any = None, k: int = 10, *, row: int | None = None, query_id: Any = None
               ) -> list[Attribution]:
        """The k strongest opponents of a query, lowest score first (query, row, query_id as in `top`)."""
        return self._extreme(self._row(query, row, query_id), k, largest=False)

    def _extreme(self, r: int, k: int, largest: bool) -> list[Attribution]:
        check_k(k, "k")
        if self.matrix is not None:
            k = min(k, self.matrix.shape[1])
            values, idx = torch.topk(self.matrix[r], k, largest=largest)
        else:
            kept_v, kept_i = (self.top_values, self.top_indices) if largest else \
                             (self.bottom_values, self.bottom_indices)
            assert kept_v is not None and kept_i is not None
            if k > kept_v.shape[1]:
                raise ScoresError(f"only the top {kept_v.shape[1]} were kept; score with a larger top_k")
            values, idx = kept_v[r, :k], kept_i[r, :k]
        return [Attribution(self.train_ids[int(i)], int(i), float(v)) for v, i in zip(values, idx)]

    def group_by(self, labels: Sequence[Any] | Mapping[Any, Any]) -> Scores:
        """Score mass per group: a Scores whose columns are the groups (summed scores of their members).

        `labels` gives each training example's group, in training order or as {train id: group}.
        """
        matrix = self._dense("group_by")
        if isinstance(labels, Mapping):
            missing = [i for i in self.train_ids if i not in labels]
            if missing:
                raise ShapeError(f"no group for training ids {missing[:5]}")
            labels = [labels[i] for i in self.train_ids]
        labels = list(labels)
        if len(labels) != len(self.train_ids):
            raise ShapeError(f"{len(labels)} labels for {len(self.train_ids)} training examples")
        groups = sorted(set(labels), key=str)
        where = {g: j for j, g in enumerate(groups)}
        onehot = torch.zeros(len(labels), len(groups), dtype=matrix.dtype)
        onehot[torch.arange(len(labels)), torch.tensor([where[g] for g in labels])] = 1
        return Scores(matrix @ onehot, groups, list(self.query_ids), self.method,
                      {**self.metadata, "grouped": True, "group_sizes": onehot.sum(0).tolist()})

    def removal_effect(self, train_ids: Sequence[Any], scale: float | None = None) -> torch.Tensor:
        """Predicted change of each query's measurement if the training examples `train_ids` were removed
        and the model retrained: −scale · Σ of their scores, one value per query.

        scale: what one unit of summed score is worth in the measurement. `replay` scores are derivatives
        of the measurement with respect to each example's weight, so their scale is 1 (exact to first
        order for a few examples); other methods' scores rank examples but are not effect sizes (damping,
        projections, normalisation): fit their scale on retraining with `evaluate.calibrate(scores, truth)`.
        """
        matrix = self._dense("removal_effect")
        if scale is None:
            scale = self.metadata.get("removal_scale")
        if scale is None:
            raise ScoresError(f"{self.method or 'these'} scores rank training examples but are not effect "
                              "sizes; pass scale=evaluate.calibrate(scores, ground_truth).scale (fitted on "
                              "retrained models), or attribute with method='replay'")
        where = {i: k for k, i in enumerate(self.train_ids)}
        missing = [i for i in train_ids if i not in where]
        if missing:
            raise ScoresError(f"no training examples with ids {missing[:5]}")
        columns = torch.tensor(sorted({where[i] for i in train_ids}), dtype=torch.long)
        return -float(scale) * matrix[:, columns].double().sum(1)

    def to_pandas(self) -> Any:
        """A DataFrame with one row per query and one column per training example."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise MissingExtraError("to_pandas needs pandas; install it with `pip install pandas`") from exc
        return pd.DataFrame(self._dense("to_pandas").numpy(), index=self.query_ids, columns=self.train_ids)

    # ---- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write `path/scores.safetensors` and `path/scores.json` (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        for ids, what in ((self.train_ids, "training"), (self.query_ids, "query")):
            if not isinstance(ids, Ids):  # an Ids holds plain ids only
                for i in ids:
                    plain_id(i, f"{what} ids")  # refuses ids that JSON would turn into something else
        tensors = {k: v.contiguous() for k, v in self._tensors().items() if v is not None}
        atomic_write(path / "scores.safetensors", lambda tmp: save_file(tensors, tmp))
        atomic_write_json(path / "scores.json", {"format": 1, "method": self.method,
                                                 "metadata": self.metadata, "train_ids": list(self.train_ids),
                                                 "query_ids": list(self.query_ids)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "scores.json").exists():
            raise FileNotFoundError(f"{path} holds no saved scores (scores.json is missing)")
        meta = json.loads((path / "scores.json").read_text())
        tensors = load_file(path / "scores.safetensors")
        return cls(train_ids=[_id_from_json(i) for i in meta["train_ids"]],
                   query_ids=[_id_from_json(i) for i in meta["query_ids"]], method=meta["method"],
                   metadata=meta["metadata"], **{k: tensors.get(k) for k in cls._tensor_fields()})

    @staticmethod
    def _tensor_fields() -> tuple[str, ...]:
        return ("matrix", "self_influence", "top_values", "top_indices", "bottom_values", "bottom_indices")

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {k: getattr(self, k) for k in self._tensor_fields()}

    def __repr__(self) -> str:
        kind = "dense" if self.is_dense else f"top {self.top_values.shape[1]}"  # type: ignore[union-attr]
        return f"Scores({self.method or 'scores'}, {self.shape[0]} queries × {self.shape[1]} train, {kind})"


def _id_from_json(value: Any) -> Any:
    """JSON has no tuples: an id saved as a tuple comes back as a list, made a tuple again here."""
    return tuple(_id_from_json(v) for v in value) if isinstance(value, list) else value


def check_k(k: Any, name: str = "k", optional: bool = False) -> int | None:
    """Refuse a count of results that is not a positive int (k=-1, k="5"); None passes when optional."""
    if k is None and optional:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidOptionError(f"{name} must be a positive int; got {k!r}")
    return k


def _position(value: Any) -> int | None:
    """An int, numpy integer or 0-d integer tensor as an int; None for anything else (ids, bools)."""
    if isinstance(value, (bool, float)) or not hasattr(value, "__index__"):
        return None
    try:
        return value.__index__()
    except TypeError:  # e.g. a floating-point tensor
        return None

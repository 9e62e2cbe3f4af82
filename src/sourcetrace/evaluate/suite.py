"""An evaluation suite with quanda's metric definitions, runnable on any Scores [n_query, n_train].

Each metric is written from quanda's definition, tested against a hand computation, and compared with
quanda's own code on the same scores where quanda is installed (`tests/test_quanda_agreement.py`,
`benchmarks/practitioner-tasks.md`):
- class detection: share of queries whose top-1 training row has the query's label.
- subclass detection: the same with subclass labels (the model is trained on the coarse classes).
- shortcut detection: mean over the selected queries of the average precision of the query's scores at
  finding the shortcut rows (quanda: torcheval's binary_auprc, per query, then the mean).
- model randomization: mean over queries of the Spearman correlation between the scores of the trained
  model and those of a model with re-initialised parameters (lower is better).
- top-k cardinality: distinct training rows among all queries' top-k lists / (n_query · k) (higher: the
  explanations depend on the query).
- mislabeling detection and LDS: `evaluate.mislabel` and `evaluate.lds`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from ..errors import EmptyDataError, ShapeError
from .lds import score_matrix
from .mislabel import average_precision, quanda_score


def class_detection(scores: Any, train_labels: Any, query_labels: Any) -> float:
    """Share of queries whose highest-scored training row carries the query's label."""
    m = score_matrix(scores)
    tl, ql = np.asarray(train_labels), np.asarray(query_labels)
    if tl.shape != (m.shape[1],) or ql.shape != (m.shape[0],):
        raise ShapeError(f"give one label per training row ({m.shape[1]}) and per query ({m.shape[0]})")
    return float((tl[m.argmax(1)] == ql).mean())


def subclass_detection(scores: Any, train_subclasses: Any, query_subclasses: Any) -> float:
    """Class detection on subclass labels (Hanawa et al. 2021, as in quanda)."""
    return class_detection(scores, train_subclasses, query_subclasses)


def shortcut_detection(scores: Any, shortcut_rows: Any, queries: Any = None) -> float:
    """Mean average precision of each selected query's scores at finding the shortcut rows.

    quanda selects the queries not of the shortcut class that the model predicts as the shortcut class;
    pass their positions as `queries` (default: all).
    """
    m = score_matrix(scores)
    rows = np.asarray(queries if queries is not None else range(m.shape[0]), dtype=np.int64)
    if rows.size == 0:
        return 0.0  # quanda's value when no query is selected
    return float(np.mean([average_precision(m[q], shortcut_rows) for q in rows]))


def model_randomization(scores: Any, randomized_scores: Any) -> float:
    """Mean per-query Spearman correlation of two score matrices of the same queries."""
    a, b = score_matrix(scores), score_matrix(randomized_scores)
    if a.shape != b.shape:
        raise ShapeError(f"score matrices of shapes {a.shape} and {b.shape}; score the same queries")
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return float(np.mean(np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1.0), 0.0)))


def randomize_model(model: torch.nn.Module, seed: int = 42) -> torch.nn.Module:
    """A copy of `model` with every layer that has `reset_parameters` re-initialised (seeded), as quanda."""
    out = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in out.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and any(True for _ in module.parameters(recurse=False)):
            reset()
    return out


def top_k_cardinality(scores: Any, k: int = 1) -> float:
    """Distinct rows among every query's top-k / (n_query · k)."""
    m = score_matrix(scores)
    k = min(int(k), m.shape[1])
    if k < 1:
        raise EmptyDataError("k must be at least 1")
    top = np.argsort(-m, axis=1, kind="stable")[:, :k]
    return float(len(np.unique(top)) / top.size)


def evaluation_suite(
    scores: Any,
    *,
    train_labels: Sequence[Any] | None = None,
    query_labels: Sequence[Any] | None = None,
    train_subclasses: Sequence[Any] | None = None,
    query_subclasses: Sequence[Any] | None = None,
    shortcut_rows: Sequence[int] | None = None,
    shortcut_queries: Sequence[int] | None = None,
    shortcut_scores: Any = None,
    randomized_scores: Any = None,
    self_influence: Any = None,
    flipped: Sequence[int] | None = None,
    ground_truth: Any = None,
    k: int = 10,
) -> dict[str, float]:
    """Every metric whose inputs are given, by name (quanda's names); top-k cardinality always.

    `shortcut_scores` are scores of the shortcut queries (default: `scores` with `shortcut_queries`
    selecting rows); `self_influence` is the per-row ranking used for mislabeling detection.
    """
    out = {"top_k_cardinality": top_k_cardinality(scores, k)}
    if train_labels is not None and query_labels is not None:
        out["class_detection"] = class_detection(scores, train_labels, query_labels)
    if train_subclasses is not None and query_subclasses is not None:
        out["subclass_detection"] = subclass_detection(scores, train_subclasses, query_subclasses)
    if shortcut_rows is not None:
        target = scores if shortcut_scores is None else shortcut_scores
        out["shortcut_detection"] = shortcut_detection(target, shortcut_rows, shortcut_queries)
    if randomized_scores is not None:
        out["model_randomization"] = model_randomization(scores, randomized_scores)
    if self_influence is not None and flipped is not None:
        out["mislabeling_detection"] = quanda_score(self_influence, flipped)
    if ground_truth is not None:
        from .lds import lds

        out["lds"] = lds(scores, ground_truth).mean
    return out

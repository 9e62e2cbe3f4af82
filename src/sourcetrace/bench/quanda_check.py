"""quanda's own metric code run on sourcetrace's scores, beside `evaluate.suite`.

quanda's package `__init__` imports its benchmarks, which import torchvision; the registry's torchvision
does not import beside this CPU torch. Its metric modules do not need torchvision: `load()` imports them
with quanda's three package-level `__init__` files (`quanda`, `quanda.utils`, `quanda.explainers`)
replaced by empty packages whose `__path__` is quanda's own folder. Every function that runs is quanda's
code; a module that needed a name from a skipped `__init__` would fail to import rather than run a
substitute, and `load()` refuses to go on if torchvision got imported anyway.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Any

import numpy as np
import torch

SKIPPED_INITS = ("quanda", "quanda.utils", "quanda.explainers")


def load() -> types.SimpleNamespace | None:
    """quanda's metric classes and correlation function, or None when quanda is not installed."""
    spec = importlib.util.find_spec("quanda") if "quanda" not in sys.modules else None
    if "quanda" not in sys.modules:
        if spec is None or not spec.submodule_search_locations:
            return None
        root = list(spec.submodule_search_locations)[0]
        for name in SKIPPED_INITS:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
            sys.modules[name] = pkg
    try:
        de = importlib.import_module("quanda.metrics.downstream_eval")
        corr = importlib.import_module("quanda.utils.functions.correlations")
    except ImportError:
        return None
    if "torchvision" in sys.modules:
        raise RuntimeError(
            "quanda's metric modules imported torchvision: the comparison would not be quanda's")
    return types.SimpleNamespace(
        ClassDetection=de.ClassDetectionMetric,
        ShortcutDetection=de.ShortcutDetectionMetric,
        MislabelingDetection=de.MislabelingDetectionMetric,
        TopKCardinality=importlib.import_module("quanda.metrics.heuristics").TopKCardinalityMetric,
        spearman=corr.spearman_rank_corr,
    )


def _stand_in_model() -> torch.nn.Module:
    """quanda's metrics take a model only to find the device (and to filter queries, which we do not ask)."""
    return torch.nn.Linear(1, 1)


def suite_by_quanda(
    q: types.SimpleNamespace,
    scores: np.ndarray,
    *,
    train_labels: Any,
    query_labels: Any,
    train_subclasses: Any,
    query_subclasses: Any,
    shortcut_scores: np.ndarray,
    shortcut_rows: Any,
    shortcut_class: int,
    randomized_scores: np.ndarray,
    k: int = 10,
) -> dict[str, float]:
    """The suite's metrics (`evaluate.suite` names) computed by quanda's classes on the same inputs.

    Class detection at quanda's top-1 (`s=1`); shortcut detection on queries already selected by quanda's
    filters (the caller applies them, as the suite's caller does); model randomization with quanda's
    Spearman function on the two score matrices.
    """
    model = _stand_in_model()
    expl = torch.as_tensor(np.asarray(scores, dtype=np.float64))

    def detection(train: Any, query: Any) -> float:
        # quanda compares integer targets: labels of any kind become their index among all labels
        codes = np.unique(np.concatenate([np.asarray(train), np.asarray(query)]), return_inverse=True)[1]
        data = [(0, int(t)) for t in codes[: len(train)]]
        metric = q.ClassDetection(model=model, train_dataset=data, s=1)
        metric.update(expl, torch.as_tensor(codes[len(train):].astype(np.int64)))
        return float(metric.compute()["score"])

    labels = [int(t) for t in train_labels]
    short = q.ShortcutDetection(
        model=model,
        train_dataset=[(0, t) for t in labels],
        shortcut_indices=[int(i) for i in shortcut_rows],
        shortcut_cls=int(shortcut_class),
        filter_by_non_shortcut=False,
        filter_by_shortcut_pred=False,
    )
    sc = torch.as_tensor(np.asarray(shortcut_scores, dtype=np.float64))
    if len(sc):
        short.update(sc)
    card = q.TopKCardinality(model=model, train_dataset=labels, top_k=k)
    card.update(expl)
    rho = q.spearman(expl, torch.as_tensor(np.asarray(randomized_scores, dtype=np.float64)))
    return {
        "class_detection": detection(train_labels, query_labels),
        "subclass_detection": detection(train_subclasses, query_subclasses),
        "shortcut_detection": float(short.compute()["score"]) if len(sc) else 0.0,
        "model_randomization": float(torch.as_tensor(rho).double().mean()),
        "top_k_cardinality": float(card.compute()["score"]),
    }


def mislabeling_by_quanda(
    q: types.SimpleNamespace, suspicion: np.ndarray, flipped: Any
) -> dict[str, float]:
    """quanda's mislabeling-detection score of one suspicion vector: as shipped, and on the order alone.

    quanda adds 1e-4 × row index to the self-influence before ranking (a tie-break that also reorders rows
    whose suspicion differs by less than that); `order_only` feeds it the ranks × n, so only the order of
    the suspicion scores counts, as in `evaluate.mislabel.quanda_score`.
    """
    s = np.asarray(suspicion, dtype=np.float64)
    n = len(s)

    def score(values: np.ndarray) -> float:
        metric = q.MislabelingDetection(
            model=_stand_in_model(),
            train_dataset=list(range(n)),
            mislabeling_indices=[int(i) for i in flipped],
            precomputed_self_influence=torch.as_tensor(values),
        )
        return float(metric.compute()["score"])

    order = np.empty(n)
    order[np.argsort(-s, kind="stable")] = np.arange(n, 0, -1)  # higher suspicion, higher value
    return {"as_shipped": score(s), "order_only": score(order * n)}


def differences(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, Any]:
    """Per metric: the suite's value, quanda's, and their absolute difference."""
    return {k: {"suite": ours[k], "quanda": theirs[k], "abs_diff": abs(ours[k] - theirs[k])} for k in theirs}

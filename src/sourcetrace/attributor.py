"""Attributor: the one entry point of the gradient family — fit on training data, score queries."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .artifacts import check_manifest
from .data import Examples, check_batch_size, model_fingerprint
from .errors import InvalidOptionError, SourcetraceError
from .methods import build
from .methods.base import Context
from .scores import Scores, check_k
from .tasks import CausalLMTask, Task, check_task, task_config


class Attributor:
    """Attribute a model's outputs to its training data.

    `method` is a name from `available_methods()`; its options are keyword arguments (each has a default
    that works untuned). Artifacts go to `workdir` (a temporary folder if none), under a manifest recording
    the method, its options, the model and the data: a rerun with the same settings reuses or resumes them,
    a rerun with other settings is refused unless `overwrite=True`. A model wrapped in DistributedDataParallel
    or FSDP is unwrapped (`distributed.unwrap`: FSDP's full parameters are gathered into a plain copy).
    """

    def __init__(self, model: nn.Module, task: Task, method: str = "grad-dot",
                 workdir: str | os.PathLike | None = None, *, overwrite: bool = False, progress: bool = True,
                 **options: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        check_task(task)
        model = distributed.unwrap(model)
        if "batch_size" in options:
            check_batch_size(options["batch_size"])
        self.method = build(method, options)
        if isinstance(task, CausalLMTask):
            self.method = compact_for_lm(method, options, self.method)
        self._options = self.method.options.manifest()  # as given (a method may expand them when fitting)
        self.model, self.task = model, task
        persist = workdir is not None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sourcetrace-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.ctx = Context(model, task, self.workdir, progress=progress, overwrite=overwrite,
                           persist=persist)
        self._fitted = False

    def fit(self, train: Any, ids: list[Any] | None = None) -> Attributor:
        """Collect what the method needs from the training data (cached in workdir, resumable)."""
        examples = Examples(train, ids, name="training data")
        manifest = {"method": self.method.name, "options": self._options,
                    "model": model_fingerprint(self.model), "task": task_config(self.task),
                    "data": examples.fingerprint(), "n_train": len(examples)}
        check_manifest(self.workdir, manifest, overwrite=self.ctx.overwrite)
        self.method.fit(self.ctx, examples)
        self.train = examples
        self._fitted = True
        return self

    @property
    def is_fitted(self) -> bool:
        """Whether `fit` has run (scoring needs it)."""
        return self._fitted

    def score(self, queries: Any, ids: list[Any] | None = None, *, top_k: int | None = None) -> Scores:
        """Scores [n_query, n_train] (positive = proponent); with `top_k`, only each query's extremes."""
        self._require_fit()
        check_k(top_k, "top_k", optional=True)
        examples = Examples(queries, ids, name="queries")
        return self.method.score(self.ctx, examples, top_k=top_k)

    def score_by_module(self, queries: Any, ids: list[Any] | None = None) -> dict[str, Scores]:
        """Scores split by module (e.g. per layer); they add up to `score(queries)`."""
        self._require_fit()
        by_module = getattr(self.method, "score_by_module", None)
        if by_module is None:
            raise SourcetraceError(f"method {self.method.name!r} has no per-module scores")
        return by_module(self.ctx, Examples(queries, ids, name="queries"))

    def self_influence(self) -> torch.Tensor:
        """Each training example's influence on its own loss (high = unusual or mislabeled)."""
        self._require_fit()
        values = self.method.self_influence(self.ctx)
        if values is None:
            raise SourcetraceError(f"method {self.method.name!r} defines no self-influence; use grad-dot "
                                   "or tracin")
        return values

    def _require_fit(self) -> None:
        if not self._fitted:
            raise SourcetraceError("call fit(train_data) before scoring")

    def __repr__(self) -> str:
        return f"Attributor(method={self.method.name!r}, workdir={str(self.workdir)!r})"


#: curvatures that compose with Kronecker-projected features, the language-model default
KRONECKER_CURVATURES = ("identity", "ekfac", "kfac")
#: options that choose the features: given any of them, the language-model default does not apply
FEATURE_OPTIONS = {"features", "query_rank", "proj_dim", "rank", "projection"}


def compact_for_lm(name: str, options: dict[str, Any], method: Any) -> Any:
    """Language models store Kronecker-projected gradients (LoGra-style) unless the features are chosen.

    A 0.8M-parameter GPT-2 has 3 MB of gradient per document; `features="kronecker"` stores rank² numbers
    per layer instead. TRAK's dense projection becomes `structured` (Kronecker, then the dense projection
    of those rows), whose matrix is small enough to keep. Full gradients only when asked
    (`features="identity"`) or where the method needs them (SOURCE fits its segment curvatures on
    unprojected gradients; the store-size warning still applies).
    """
    o = getattr(method, "options", None)
    if FEATURE_OPTIONS & set(options):
        return method
    features, curvature = getattr(o, "features", None), getattr(o, "curvature", None)
    compact = {"identity": "kronecker" if curvature in KRONECKER_CURVATURES else None,
               "random": "structured"}.get(str(features))
    if compact is None:
        return method
    try:
        return build(name, {**options, "features": compact})
    except InvalidOptionError:  # the method refuses projected features: keep its full gradients
        return method


def available_methods() -> list[str]:
    """Names accepted by `Attributor(method=...)`."""
    from .methods import available_methods as names

    return names()

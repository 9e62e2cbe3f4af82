"""What every method provides, and the context the Attributor hands it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..data import Examples
from ..scores import Scores
from ..tasks import Task


@dataclass
class Context:
    """What a method works with: the model, the task, where to keep artifacts, and how to report."""

    model: nn.Module
    task: Task
    workdir: Path
    progress: bool = True
    overwrite: bool = False
    persist: bool = True  # False for a throwaway workdir: large artifacts stay in memory


@dataclass(frozen=True)
class Options:
    """Base of the method option dataclasses (frozen: options are data, saved beside the artifacts)."""

    def manifest(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


class Method:
    """A way to attribute queries to training data: `fit` on the training set, then `score` queries."""

    Options: ClassVar[type] = Options

    def __init__(self, name: str, options: Any):
        self.name = name
        self.options = options

    def fit(self, ctx: Context, train: Examples) -> None:
        raise NotImplementedError

    def score(self, ctx: Context, queries: Examples, top_k: int | None = None) -> Scores:
        raise NotImplementedError

    def self_influence(self, ctx: Context) -> torch.Tensor | None:
        """Each training example's score on itself, where the method defines one."""
        return None


def _jsonable(value: Any) -> Any:
    from ..data import state_fingerprint
    from ..trajectory import Trajectory

    if isinstance(value, Trajectory):
        return {"trajectory": str(value.workdir), "fingerprint": value.fingerprint()}

    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return {"state_dict": state_fingerprint(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value

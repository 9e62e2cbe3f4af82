"""What every method provides, the context the Attributor hands it, and the checkpoint helpers they share."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..data import Examples, state_fingerprint
from ..errors import InvalidOptionError
from ..grads.capture import evaluating
from ..scores import Scores
from ..tasks import Task
from ..trajectory import Trajectory


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


@contextlib.contextmanager
def at_checkpoint(model: nn.Module, state: dict[str, torch.Tensor] | None) -> Iterator[nn.Module]:
    """The model at a checkpoint (a copy; None: the model itself), in eval mode, left as it was after."""
    model = model if state is None else copy.deepcopy(model)
    if state is not None:
        model.load_state_dict(state)
    with evaluating(model):
        yield model


def load_state(checkpoint: Any) -> dict[str, torch.Tensor]:
    """A checkpoint given as a state_dict, a model or the path of a saved state_dict, as a state_dict."""
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    if not isinstance(checkpoint, dict):
        raise InvalidOptionError("a checkpoint is a state_dict, a model, or the path of a saved state_dict")
    return checkpoint


def to_device(batch: Any, model: nn.Module) -> Any:
    """The batch's tensors on the model's device."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def example_shapes(batch: Any) -> Any:
    """The shapes of a one-example batch without its batch axis, for error messages."""
    return tree_map(lambda t: tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else type(t).__name__, batch)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Trajectory):
        return {"trajectory": str(value.workdir), "fingerprint": value.fingerprint()}
    if isinstance(value, Examples):
        return {"examples": len(value), "fingerprint": value.fingerprint()}
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return {"state_dict": state_fingerprint(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value

"""What a curvature (a preconditioner) is: fitted on the training data, applied to flat gradient rows.

Every curvature works in the flat layout of `GradientCapture.flat`: parameters in `capture.params` order,
each flattened row-major. `apply(v)` returns approximately `(C + λI)⁻¹ v` for each row v, where C is the
curvature of the *mean* training loss (Hessian, Gauss-Newton or Fisher) and λ the damping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..data import Examples
from ..grads import GradientCapture
from ..tasks import Task, collate


@dataclass
class CurvatureContext:
    """The model at one checkpoint, its task, its training data and where to cache what is fitted."""

    model: nn.Module
    task: Task
    capture: GradientCapture
    train: Examples
    batch_size: int = 64
    folder: Path | None = None
    progress: bool = True
    seed: int = 0
    store: Any = None  # the method's GradientStore of training-loss gradients, when it has one

    def batches(self, examples: Examples | None = None) -> Iterator[Any]:
        """Collated batches of the training data (or of `examples`), on the model's device."""
        examples = self.train if examples is None else examples
        p = next(self.model.parameters())
        for _, items in examples.batches(self.batch_size):
            yield tree_map(lambda t: t.to(p.device) if isinstance(t, torch.Tensor) else t,
                           collate(self.task, items))

    def layout(self) -> list[tuple[str, tuple[int, ...], slice]]:
        """(parameter name, shape, slice of the flat row) for every parameter, in flat order."""
        out, start = [], 0
        for name, shape in self.capture.shapes.items():
            size = int(torch.Size(shape).numel())
            out.append((name, shape, slice(start, start + size)))
            start += size
        return out


class Curvature:
    """Base of the curvature approximations; subclasses register themselves in CURVATURES."""

    def __init__(self, damping: float | None = None, **options: Any):
        self.damping = damping
        self.options = options

    def fit(self, ctx: CurvatureContext) -> None:
        raise NotImplementedError

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Approximately (C + λI)⁻¹ v for each row of `vectors` [n, dim]."""
        raise NotImplementedError


CURVATURES: dict[str, Callable[..., Curvature]] = {}


def register_curvature(name: str) -> Callable[[type[Curvature]], type[Curvature]]:
    def wrap(cls: type[Curvature]) -> type[Curvature]:
        CURVATURES[name] = cls
        return cls

    return wrap

"""The Preconditioner protocol: `fit` on the training stream at one checkpoint, then `apply` to feature rows.

`apply(v)` returns approximately `(C + λI)⁻¹ v` for each row v, where C is the curvature of the *mean*
training loss (Hessian, Gauss-Newton or Fisher) in the space of the stored features and λ the damping.
`FEATURES` lists the feature maps (`grads.features`) a preconditioner works on; the Attributor refuses any
other pairing before a pass over the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..data import Examples
from ..grads import GradientCapture
from ..tasks import Task, collate
from .damping import check_damping


@dataclass
class CurvatureContext:
    """The model at one checkpoint, its task, its training data, the stored features and a cache folder."""

    model: nn.Module
    task: Task
    capture: GradientCapture
    train: Examples
    batch_size: int = 64
    folder: Path | None = None
    progress: bool = True
    seed: int = 0
    store: Any = None  # the GradientStore of the training rows, when the method has one
    features: Any = None  # the bound feature map of those rows (None: the flat gradient)
    row_weights: torch.Tensor | None = None  # ∂²L_i/∂f_i² when the rows are gradients of an output f (TRAK)
    batch_offset: int = 0  # the index of the first batch in the whole training set (a torchrun rank's slice)

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

    def feature_kind(self) -> str:
        return "identity" if self.features is None else self.features.feature_kind


class Preconditioner:
    """Base of the preconditioners; subclasses register themselves in CURVATURES."""

    FEATURES: ClassVar[tuple[str, ...]] = ("identity",)

    def __init__(self, damping: float | None = None, damping_factor: float | None = None):
        check_damping(damping, damping_factor)  # refused when built, before any pass over the data
        self.damping, self.damping_factor = damping, damping_factor

    def fit(self, ctx: CurvatureContext) -> None:
        raise NotImplementedError

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Approximately (C + λI)⁻¹ v for each row of `vectors` [n, dim]."""
        raise NotImplementedError


CURVATURES: dict[str, Callable[..., Preconditioner]] = {}


def register_curvature(name: str) -> Callable[[type[Preconditioner]], type[Preconditioner]]:
    def wrap(cls: type[Preconditioner]) -> type[Preconditioner]:
        CURVATURES[name] = cls
        return cls

    return wrap


@register_curvature("identity")
class Identity(Preconditioner):
    """No preconditioning (grad-dot, TracIn)."""

    FEATURES = ("identity", "random", "kronecker", "structured")

    def __init__(self) -> None:
        super().__init__()

    def fit(self, ctx: CurvatureContext) -> None:
        pass

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors

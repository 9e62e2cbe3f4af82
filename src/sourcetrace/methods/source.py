"""SOURCE: approximate unrolled differentiation (Bae, Lin, Lorraine & Grosse 2024, arXiv 2405.12186).

Training is cut into L segments of consecutive checkpoints. Within segment l the curvature H̄_l (an EK-FAC
averaged over the segment's checkpoints, plus the weight decay) and each example's gradient ḡ_l(i) (its
mean over those checkpoints) are held fixed for the segment's K_l steps at the mean learning rate η̄_l, so
unrolling SGD through the segment gives (paper §3.3, eqs. 13-15):

    Jacobian  S_l = exp(−η̄_l K_l H̄_l)          residual  r_l(i) = (I − exp(−η̄_l K_l H̄_l)) H̄_l⁻¹ ḡ_l(i)
    score(q, i) = −Σ_l (S_{l+1} ⋯ S_L ∇m(q, θ_final))ᵀ r_l(i)

with every matrix function applied elementwise to the eigenvalues in the Kronecker eigenbasis.

Scale: the paper's r_l carries 1/N (the response to example i's weight in the summed loss). Here, as for
influence functions and TracIn in sourcetrace, the score is the response to adding ε·L_i to the mean loss of
every step, i.e. N × the paper's score; under multi-stage training a segment of a stage that trained on N_s
examples is scaled by N/N_s, and examples outside that stage's data contribute nothing to it. SGD momentum β
enters as the effective learning rate η/(1−β) (paper §3.4).

Adam (paper App. D): a step is θ ← θ − η P (∇L + …) with the diagonal preconditioner P = 1/(√v̂ + ε)
(capped: see `adam_preconditioner`), held at its mean over the segment's checkpoints. With H̃ = P^½ H P^½
the segment's Jacobian is exp(−η̄KPH) = P^½ exp(−η̄KH̃) P^-½ and its residual is
(PH)⁻¹(I − exp(−η̄KPH)) P ḡ = P^½ f(H̃) P^½ ḡ, so the query is scaled by P^½ on each side of the same
functions of an EK-FAC fitted to P^½-scaled gradients (P taken in its nearest Kronecker form per layer).
AdamW's decoupled weight decay λ shifts H̃ by λ exactly; Adam's L2 term λP is approximated by λ·mean(P).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..curvature import CurvatureContext
from ..data import Examples
from ..errors import InvalidOptionError
from ..grads import GradientCapture
from ..trajectory import adam_preconditioner, source_options
from . import register
from .base import at_checkpoint
from .gradient import GradientMethod, GradientOptions
from .parts import Combination

SEGMENT_CURVATURES = ("ekfac", "kfac", "explicit")


@dataclass(frozen=True)
class SourceOptions(GradientOptions):
    """Options of SOURCE (besides those of the gradient methods).

    checkpoints / learning_rates / steps: the saved models (state_dicts or paths), the learning rate in force
    at each and the number of optimizer steps done when each was saved; checkpoint j stands for the steps
    since checkpoint j−1. The model given to the Attributor is the final model, where queries are measured.
    segments: how many segments (default 3, at least one per stage, at most one per checkpoint), or the
    number of checkpoints in each segment, in order. stages: the stage of each checkpoint (0, 0, 1, ...);
    segments never cross a stage boundary. stage_examples: per stage, the indices of the training examples
    it trained on (None: all). momentum: SGD momentum β. weight_decay: L2 coefficient of the optimizer,
    added to the curvature. curvature: "ekfac" (default), "kfac" or "explicit" (exact GGN, small models).
    preconditioners: for Adam-like optimizers, per checkpoint {parameter name: the diagonal preconditioner
    P = 1/(√v̂ + ε), a tensor of the parameter's shape}; decoupled_weight_decay: the decay is AdamW's.
    `trajectory_options` fills both from a recorded Adam/AdamW run.
    """

    steps: tuple[int, ...] | list[int] | None = None
    segments: int | tuple[int, ...] | list[int] = 3
    stages: tuple[int, ...] | list[int] | None = None
    stage_examples: tuple[Any, ...] | list[Any] | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    preconditioners: tuple[Any, ...] | list[Any] | None = None
    decoupled_weight_decay: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.features != "identity":
            raise InvalidOptionError("source fits its segment curvatures on unprojected gradients; leave "
                                     "features= out")
        if self.curvature not in SEGMENT_CURVATURES:
            raise InvalidOptionError(f"source's curvature must be one of {', '.join(SEGMENT_CURVATURES)}; "
                                     f"got {self.curvature!r}")
        if self.trajectory is not None:  # the rest is read from it when fitting, and checked then
            return
        if not self.checkpoints or self.learning_rates is None or self.steps is None:
            raise InvalidOptionError("source needs trajectory=... recorded with TrajectoryRecorder, or "
                                     "checkpoints=[state_dict or path, ...] saved during "
                                     "training, learning_rates=[...] in force at each and steps=[...] "
                                     "(optimizer steps done when each was saved)")
        if len(self.steps) != len(self.checkpoints):
            raise InvalidOptionError("give one step count per checkpoint")
        if any(b < a for a, b in zip(self.steps, self.steps[1:])) or min(self.steps) < 0:
            raise InvalidOptionError(f"steps must be non-negative and non-decreasing; got {list(self.steps)}")
        if self.stages is not None:
            if len(self.stages) != len(self.checkpoints):
                raise InvalidOptionError("give one stage per checkpoint")
            if list(self.stages) != sorted(self.stages) or self.stages[0] != 0 or any(
                    b - a > 1 for a, b in zip(self.stages, self.stages[1:])):
                raise InvalidOptionError(f"stages must count up from 0 (e.g. [0, 0, 1, 1]); "
                                         f"got {list(self.stages)}")
        n_stages = 1 if self.stages is None else int(self.stages[-1]) + 1
        if self.stage_examples is not None and len(self.stage_examples) != n_stages:
            raise InvalidOptionError(f"stage_examples needs one entry per stage ({n_stages}); "
                                     f"got {len(self.stage_examples)}")
        if not 0 <= self.momentum < 1:
            raise InvalidOptionError(f"momentum must be in [0, 1); got {self.momentum}")
        if not self.weight_decay >= 0:
            raise InvalidOptionError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if self.preconditioners is not None and len(self.preconditioners) != len(self.checkpoints):
            raise InvalidOptionError("give one preconditioner {parameter name: tensor} per checkpoint")
        plan_segments(self.steps, self.learning_rates, self.stages, self.segments)  # validates segments


@dataclass
class Segment:
    """Consecutive checkpoints treated as one stationary stretch of training: K steps at mean rate lr."""

    checkpoints: list[int]
    stage: int
    steps: int
    lr: float
    curvature: Any = None  # fitted: has apply_fn(v, f)
    scale: torch.Tensor | None = None  # P^½ of the segment's mean preconditioner, flat (Adam)
    shift: float = 0.0  # added to the curvature's eigenvalues (weight decay)

    @property
    def horizon(self) -> float:
        """η̄K, the time the segment's gradient flow runs for."""
        return self.lr * self.steps


def plan_segments(steps: Sequence[int], learning_rates: Sequence[float], stages: Sequence[int] | None,
                  segments: int | Sequence[int]) -> list[Segment]:
    """Group checkpoints into segments within stages; K_l and the step-weighted mean learning rate of each."""
    n = len(steps)
    stage_of = [0] * n if stages is None else [int(s) for s in stages]
    n_stages = stage_of[-1] + 1
    per_stage = [stage_of.count(s) for s in range(n_stages)]
    if isinstance(segments, (int, np.integer)):
        if segments < 1:
            raise InvalidOptionError(f"segments must be at least 1; got {segments}")
        alloc = [1] * n_stages  # one per stage, the rest to the stage with most checkpoints per segment
        for _ in range(min(int(segments), n) - n_stages):
            open_ = [s for s in range(n_stages) if alloc[s] < per_stage[s]]
            best = max(open_, key=lambda s: per_stage[s] / alloc[s])
            alloc[best] += 1
        sizes = [len(part) for s in range(n_stages)
                 for part in np.array_split(np.arange(per_stage[s]), alloc[s])]
    else:
        sizes = [int(k) for k in segments]
        if any(k < 1 for k in sizes) or sum(sizes) != n:
            raise InvalidOptionError(f"segment sizes {sizes} must be positive and sum to the {n} checkpoints")
    out, lo = [], 0
    for k in sizes:
        members = list(range(lo, lo + k))
        lo += k
        if len({stage_of[c] for c in members}) > 1:
            raise InvalidOptionError(f"segment of checkpoints {members} crosses a stage boundary")
        deltas = [steps[c] - (steps[c - 1] if c > 0 else 0) for c in members]
        total = sum(deltas)
        if total <= 0:
            raise InvalidOptionError(f"the segment of checkpoints {members} covers no optimizer steps "
                                     f"(steps {[steps[c] for c in members]}); check steps=[...]")
        lr = sum(d * float(learning_rates[c]) for d, c in zip(deltas, members)) / total
        out.append(Segment(members, stage_of[members[0]], int(total), lr))
    return out


def flow_residual(horizon: float, shift: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """λ ↦ (1 − exp(−T(λ+s)))/(λ+s), computed as T·(−expm1(−x)/x) with x = T(λ+s) (→ T as λ+s → 0)."""

    def f(eig: torch.Tensor) -> torch.Tensor:
        x = horizon * (eig.clamp_min(0) + shift)
        safe = torch.where(x > 0, x, torch.ones_like(x))
        return horizon * torch.where(x > 0, -torch.expm1(-safe) / safe, torch.ones_like(x))

    return f


def flow_jacobian(horizon: float, shift: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """λ ↦ exp(−T(λ+s)): the Jacobian of a segment of gradient flow of duration T."""
    return lambda eig: torch.exp(-horizon * (eig.clamp_min(0) + shift))


class Segments(Combination):
    """SOURCE's combination: per checkpoint, weight N/N_s/|segment|, its stage's examples as a column mask,
    and query features walked back from the final model through the segments' flows (module doc)."""

    name = "segments"
    preconditions = False
    has_self_influence = False  # SOURCE measures queries at the final model only

    def check(self) -> None:
        pass

    def trajectory_options(self, trajectory: Any, train: Examples) -> dict[str, Any]:
        return source_options(trajectory, train.ids)

    def fit(self, method: Any, ctx: Any, train: Examples) -> None:
        o = self.options
        self.segments = plan_segments(list(o.steps or []), list(o.learning_rates or []), o.stages, o.segments)
        members = _stage_members(o, len(train))
        n_train = len(train)
        self.weights = [0.0] * len(method.stores)
        self.columns: list[torch.Tensor | None] = [None] * len(method.stores)
        for seg in self.segments:
            mask = members[seg.stage]
            n_stage = n_train if mask is None else int(mask.sum())
            for c in seg.checkpoints:  # mean over the segment's checkpoints; N/N_s for the stage's loss
                self.weights[c] = n_train / n_stage / len(seg.checkpoints)
                self.columns[c] = None if mask is None else mask.double()
            data = train if mask is None else _subset(train, mask)
            with contextlib.ExitStack() as stack:
                ctxs = []
                for c in seg.checkpoints:
                    model = stack.enter_context(at_checkpoint(ctx.model, method.states[c]))
                    ctxs.append(CurvatureContext(model, ctx.task, GradientCapture(model, o.modules,
                                                                                  fallback=o.fallback),
                                                 data, batch_size=o.batch_size, progress=ctx.progress))
                seg.curvature = method.new_preconditioner()
                scale = self._segment_scale(seg)
                seg.curvature.fit_average(ctxs, scale=scale)
            seg.shift = o.weight_decay
            if scale is not None:
                seg.scale = torch.cat([seg.curvature.scales[n] for n, _, _ in ctxs[0].layout()])
                if not o.decoupled_weight_decay:  # Adam's L2 term λP, approximated by λ·mean(P)
                    seg.shift = o.weight_decay * float(torch.cat([t.reshape(-1) for t in scale.values()]
                                                                 ).double().pow(2).mean())

    def _segment_scale(self, seg: Segment) -> dict[str, torch.Tensor] | None:
        """P^½ of the mean of the segment's checkpoints' preconditioners (None without preconditioners)."""
        pre = self.options.preconditioners
        if pre is None:
            return None
        names = set.intersection(*(set(pre[c]) for c in seg.checkpoints))
        return {n: torch.stack([torch.as_tensor(pre[c][n]).double() for c in seg.checkpoints]).mean(0).sqrt()
                for n in names}

    def query_features(self, method: Any, ctx: Any, queries: Examples) -> list[torch.Tensor]:
        """Per checkpoint: f_l(H̄_l) S_{l+1}⋯S_L ∇m(q) for its segment l (the final query gradient walked
        back through the later segments, then through the residual's function of the curvature)."""
        o = self.options
        v = _final_rows(method, ctx, queries).double()
        feats: list[torch.Tensor] = [v] * len(method.stores)
        dtype = torch.float64 if method.stores[0].dtype == "float64" else torch.float32
        for seg in reversed(self.segments):
            horizon = seg.horizon / (1 - o.momentum)
            s = None if seg.scale is None else seg.scale.to(v.device, v.dtype)
            u = v if s is None else s * v  # Adam: P^½ f(H̃) P^½ for the residual, P^-½ e^{−TH̃} P^½ back
            p = seg.curvature.apply_fn(u, flow_residual(horizon, seg.shift))
            p = (p if s is None else s * p).to(dtype)
            for c in seg.checkpoints:
                feats[c] = p
            v = seg.curvature.apply_fn(u, flow_jacobian(horizon, seg.shift))
            v = v if s is None else v / s
        return feats


def _final_rows(method: Any, ctx: Any, queries: Examples) -> torch.Tensor:
    """The queries' measurement gradients at the final model (the Attributor's), [n_query, dim]."""
    states, method.states = method.states, [None] * len(method.states)
    try:
        return method.query_rows(ctx, len(method.stores) - 1, queries)
    finally:
        method.states = states


def _stage_members(o: SourceOptions, n_train: int) -> list[torch.Tensor | None]:
    n_stages = 1 if o.stages is None else int(o.stages[-1]) + 1
    out: list[torch.Tensor | None] = []
    for s, idx in enumerate(o.stage_examples or [None] * n_stages):
        if idx is None:
            out.append(None)
            continue
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n_train:
            raise InvalidOptionError(f"stage_examples[{s}] must be non-empty indices into the {n_train} "
                                     "training examples")
        mask = torch.zeros(n_train, dtype=torch.bool)
        mask[idx] = True
        out.append(mask)
    return out


class Source(GradientMethod):
    """SOURCE: per-segment curvature flows applied to the final query gradient (see the module doc)."""

    Options = SourceOptions

    def __init__(self, name: str, options: SourceOptions):
        super().__init__(name, options)
        self.combination = Segments(options)
        if options.relatif:
            raise InvalidOptionError("relatif=True needs a self-influence, which source does not define")


def _subset(train: Examples, mask: torch.Tensor) -> Examples:
    idx = mask.nonzero().flatten().tolist()
    return Examples([train[i] for i in idx], ids=[train.ids[i] for i in idx], name="stage data")


trajectory_options = source_options  # the name SOURCE's users know
register("source", Source, fixed=("combination",), combination="segments", curvature="ekfac")

__all__ = ["Segment", "Source", "SourceOptions", "adam_preconditioner", "flow_jacobian", "flow_residual",
           "plan_segments", "trajectory_options"]

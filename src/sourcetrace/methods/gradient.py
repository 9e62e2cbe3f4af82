"""Gradient similarity methods: grad-dot, grad-cos and TracIn.

All three are one computation: per-example training-loss gradients are collected into a GradientStore
per checkpoint; a query's measurement gradient q is compared with every stored row g as
`score = -Σ_c w_c · sim(q_c, g_c)`, where sim is the dot product (grad-dot, TracIn) or the cosine
(grad-cos), and w_c is the learning rate of checkpoint c (TracIn) or 1 (the current model).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..data import Examples, state_fingerprint
from ..errors import InvalidOptionError, ShapeError
from ..grads import GradientCapture
from ..grads.store import GradientStore
from ..scores import Scores
from ..tasks import collate
from ..trajectory import Trajectory, as_trajectory
from . import register
from .base import Context, Method, Options

SHARD_BYTES = 256 * 2**20  # a shard is read into memory whole while scoring


@dataclass(frozen=True)
class GradientOptions(Options):
    """Options of the gradient methods.

    modules: fnmatch patterns of module names to attribute through (default: every trainable parameter).
    batch_size: examples per backward pass. fallback: use torch.func for parameters outside supported
    layers. store_dtype: precision of the stored gradients. checkpoints / learning_rates: TracIn's saved
    models (state_dicts or paths) and the learning rate in force at each. trajectory: instead of those, a
    run recorded with `TrajectoryRecorder` (a `Trajectory` or its workdir): its checkpoints after the start
    with their mean learning rates (with dda=True, every checkpoint from the start on).
    dda: Debias and Denoise Attribution for fine-tuned models: give `checkpoints=[base, ..., fine-tuned]`;
    each checkpoint's scores are standardized per query and weighted by how far that checkpoint is from
    fitting the query (1 − p), so the base model, where a new fact is unfitted, carries the signal; each
    training example's column is then divided by its root-mean-square over the queries scored together
    (see `sourcetrace.methods.dda` and benchmarks/facts-lm.md; give checkpoints dense early in training).
    relatif: divide each training example's scores by the square root of its self-influence (RelatIF,
    Barshan et al. 2020), so that examples with large, unusual gradients do not dominate every query.
    """

    modules: tuple[str, ...] | list[str] | None = None
    batch_size: int = 64
    fallback: bool = True
    store_dtype: str = "float32"
    checkpoints: tuple[Any, ...] | list[Any] | None = None
    learning_rates: tuple[float, ...] | list[float] | None = None
    dda: bool = False
    relatif: bool = False
    trajectory: Any = None

    def __post_init__(self) -> None:
        if self.trajectory is not None:
            if self.checkpoints is not None:
                raise InvalidOptionError("give trajectory=... or checkpoints=[...], not both")
            object.__setattr__(self, "trajectory", as_trajectory(self.trajectory))
        if self.batch_size < 1:
            raise InvalidOptionError("batch_size must be at least 1")
        if self.store_dtype not in ("float32", "float64", "float16"):
            raise InvalidOptionError("store_dtype must be 'float32', 'float64' or 'float16'")
        if self.learning_rates is not None and (
                self.checkpoints is None or len(self.learning_rates) != len(self.checkpoints)):
            raise InvalidOptionError("give one learning rate per checkpoint")


@register("grad-dot", "grad-cos", "tracin")
class GradientSimilarity(Method):
    """grad-dot / grad-cos on the current model; TracIn summed over checkpoints weighted by learning rate."""

    Options = GradientOptions
    options: GradientOptions

    def __init__(self, name: str, options: GradientOptions):
        super().__init__(name, options)
        if name == "tracin" and not options.checkpoints and options.trajectory is None:
            raise InvalidOptionError("tracin needs checkpoints=[state_dict or path, ...] saved during "
                                     "training and learning_rates=[...] in force at each, or trajectory=... "
                                     "recorded with sourcetrace.TrajectoryRecorder")
        if options.trajectory is not None and not self.multi_checkpoint(name):
            raise InvalidOptionError(f"{name} uses one model; trajectory= is for tracin, source, replay "
                                     "and dda=True")
        if not self.multi_checkpoint(name) and options.checkpoints and len(options.checkpoints) > 1:
            raise InvalidOptionError(f"{name} uses one model; for several checkpoints use method='tracin'")
        self.normalize = name == "grad-cos"
        self.stores: list[GradientStore] = []

    # ---- checkpoints ---------------------------------------------------------------------------------
    def multi_checkpoint(self, name: str) -> bool:
        """Whether the method `name` combines several checkpoints (TracIn sums them; DDA weighs them)."""
        return name == "tracin" or self.options.dda

    def _states(self) -> list[tuple[dict[str, torch.Tensor] | None, float]]:
        o = self.options
        if not o.checkpoints:
            return [(None, 1.0)]
        rates = o.learning_rates or [1.0] * len(o.checkpoints)
        return [(_load_state(c), float(lr)) for c, lr in zip(o.checkpoints, rates)]

    @contextlib.contextmanager
    def _at(self, ctx: Context, state: dict[str, torch.Tensor] | None) -> Iterator[nn.Module]:
        """The model at a checkpoint, in eval mode (the user's model is left as it was)."""
        model = ctx.model if state is None else copy.deepcopy(ctx.model)
        if state is not None:
            model.load_state_dict(state)
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


    # ---- fit and score -------------------------------------------------------------------------------
    def trajectory_options(self, trajectory: Trajectory, train: Examples) -> dict[str, Any]:
        """The options that `trajectory=` stands for."""
        if self.options.dda:  # from the base model (the start of the run) on
            return {"checkpoints": trajectory.checkpoint_states()}
        return trajectory.checkpoint_options("tracin")

    def resolve_trajectory(self, train: Examples) -> None:
        """Replace `trajectory=` by the options it stands for (done when fitting: SOURCE needs the data)."""
        if self.options.trajectory is not None:
            self.options = replace(self.options, trajectory=None,
                                   **self.trajectory_options(self.options.trajectory, train))

    def fit(self, ctx: Context, train: Examples) -> None:
        self.resolve_trajectory(train)
        o = self.options
        self.train_ids = train.ids
        self.train_shapes = _shapes(collate(ctx.task, [train[0]]))
        self.stores, self.weights, self.states = [], [], []
        self.shapes: dict[str, tuple[int, ...]] = {}  # parameter layout of a stored row
        for c, (state, weight) in enumerate(self._states()):
            with self._at(ctx, state) as model:
                capture = GradientCapture(model, o.modules, fallback=o.fallback)
                self.shapes = dict(capture.shapes)
                dim = self.feature_dim(c, capture)
                itemsize = 8 if o.store_dtype == "float64" else 4
                shard = max(1, min(8192, SHARD_BYTES // (dim * itemsize)))
                key = {"checkpoint": state_fingerprint(model.state_dict()), "modules": o.modules}
                store = GradientStore(ctx.workdir / f"train-grads-{c}", len(train), dim,
                                      dtype=o.store_dtype, shard_size=shard, key=key, overwrite=ctx.overwrite,
                                      persist=ctx.persist)

                def rows(lo: int, hi: int, c: int = c, model: nn.Module = model,
                         capture: GradientCapture = capture) -> torch.Tensor:
                    batch = _to(collate(ctx.task, [train[i] for i in range(lo, hi)]), _device(model))
                    return self.train_rows(ctx, c, capture, batch)

                desc = "train gradients" + (f" (checkpoint {c + 1})" if o.checkpoints else "")
                store.fill(rows, batch_size=o.batch_size, progress=ctx.progress, desc=desc)
                self.fit_curvature(ctx, c, model, capture, train, store)
            self.stores.append(store)
            self.weights.append(weight)
            self.states.append(state)

    def query_features(self, ctx: Context, queries: Examples) -> list[torch.Tensor]:
        """Measurement gradients of the queries at each checkpoint, [n_query, dim] each."""
        feats: list[torch.Tensor] = []
        for store, state in zip(self.stores, self.states):
            with self._at(ctx, state) as model:
                capture = GradientCapture(model, self.options.modules, fallback=self.options.fallback)
                c = len(feats)
                if self.feature_dim(c, capture) != store.dim:
                    raise ShapeError(f"query features have {self.feature_dim(c, capture)} entries but the "
                                     f"training store has {store.dim}; queries must go through the same "
                                     "model")
                try:
                    rows = [self.query_rows(ctx, c, capture, _to(collate(ctx.task, items), _device(model)))
                            for _, items in queries.batches(self.options.batch_size)]
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError as exc:  # torch's own shape errors, e.g. "mat1 and mat2 shapes ..."
                    raise ShapeError(
                        f"the model failed on the queries ({str(exc).splitlines()[0]}); queries must have "
                        f"the training data's shape: a training example has {self.train_shapes}, a query has "
                        f"{_shapes(collate(ctx.task, [queries[0]]))}") from exc
            q = torch.cat(rows).to(torch.float64 if store.dtype == "float64" else torch.float32)
            feats.append(self.precondition(c, q))
        return feats

    # ---- what other methods override: features, curvature, preconditioning ---------------------------
    cheap_self_influence = True  # self-influence is attached to every dense Scores

    def feature_dim(self, c: int, capture: GradientCapture) -> int:
        """Width of a stored row at checkpoint `c` (the number of parameters, unless projected)."""
        return capture.dim

    def train_rows(self, ctx: Context, c: int, capture: GradientCapture, batch: Any) -> torch.Tensor:
        """Stored rows of a training batch: per-example training-loss gradients [B, feature_dim]."""
        return capture.flat(ctx.task.train_loss, batch)

    def query_rows(self, ctx: Context, c: int, capture: GradientCapture, batch: Any) -> torch.Tensor:
        """Rows of a query batch: per-example measurement gradients [B, feature_dim]."""
        return capture.flat(ctx.task.measurement, batch)

    def fit_curvature(self, ctx: Context, c: int, model: nn.Module, capture: GradientCapture,
                      train: Examples, store: GradientStore) -> None:
        """Fit what `precondition` needs at checkpoint `c` (nothing for plain gradient similarity)."""

    def precondition(self, c: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows [n, dim] times the inverse curvature at checkpoint `c` (the identity here)."""
        return rows

    def _blocks(self, feats: list[torch.Tensor], only: int | None = None
                ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Scores against each shard of the training stores, in order: (lo, hi, [n_query, hi-lo]).

        Summed over checkpoints with their weights, or of checkpoint `only` alone (unweighted).
        """
        chosen = range(len(self.stores)) if only is None else [only]
        stores = [self.stores[c] for c in chosen]
        weights = [self.weights[c] if only is None else 1.0 for c in chosen]
        feats = [feats[c] for c in chosen]
        if self.normalize:
            feats = [q / q.norm(dim=1, keepdim=True).clamp_min(1e-12) for q in feats]
            norms = [s.sqnorms().sqrt().clamp_min(1e-12) for s in stores]
        for parts in zip(*(s.shards() for s in stores)):
            lo, hi = parts[0][0], parts[0][1]
            total = None
            for c, (q, w, (_, _, g)) in enumerate(zip(feats, weights, parts)):
                block = q @ g.to(q.dtype).T
                if self.normalize:
                    block /= norms[c][lo:hi].to(q.dtype)
                block *= -w
                total = block if total is None else total + block
            assert total is not None
            yield lo, hi, total

    def score(self, ctx: Context, queries: Examples, top_k: int | None = None) -> Scores:
        feats = self.query_features(ctx, queries)
        blocks = self._dda_blocks(ctx, queries, feats) if self.options.dda else self._blocks(feats)
        if self.options.relatif:
            blocks = self._relatif(ctx, blocks)
        parts = reduce_blocks(blocks, len(queries), len(self.train_ids), top_k)
        meta = {"options": self.options.manifest()}
        attach = top_k is None and self.cheap_self_influence
        return Scores(train_ids=self.train_ids, query_ids=queries.ids, method=self.name, metadata=meta,
                      self_influence=self.self_influence(ctx) if attach else None, **parts)

    def score_by_module(self, ctx: Context, queries: Examples) -> dict[str, Scores]:
        """Scores split by module: Σ over modules of -(P q)_module · g_module equals the total score."""
        if self.options.dda or self.options.relatif or type(self)._blocks is not GradientSimilarity._blocks \
                or any(s.dim != sum(int(torch.Size(v).numel()) for v in self.shapes.values())
                       for s in self.stores):
            raise InvalidOptionError(f"per-module scores need unprojected gradients; {self.name!r} with "
                                     "these options stores other features")
        feats = self.query_features(ctx, queries)
        spans: dict[str, list[slice]] = {}
        start = 0
        for name, shape in self.shapes.items():
            size = int(torch.Size(shape).numel())
            module = name.rsplit(".", 1)[0] if "." in name else ""
            spans.setdefault(module, []).append(slice(start, start + size))
            start += size
        out = {}
        for module, slices in spans.items():
            cols = torch.cat([torch.arange(s.start, s.stop) for s in slices])
            parts = {"matrix": torch.zeros(len(queries), len(self.train_ids), dtype=feats[0].dtype)}
            for c, (q, w) in enumerate(zip(feats, self.weights)):
                for lo, hi, g in self.stores[c].shards():
                    parts["matrix"][:, lo:hi] -= w * (q[:, cols] @ g[:, cols].to(q.dtype).T)
            out[module] = Scores(train_ids=self.train_ids, query_ids=queries.ids, method=self.name,
                                 metadata={"module": module, "options": self.options.manifest()}, **parts)
        return out

    def _relatif(self, ctx: Context, blocks: Iterator[tuple[int, int, torch.Tensor]]
                 ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Blocks divided column-wise by √(self-influence) of their training examples."""
        influence = self.self_influence(ctx)
        if influence is None:
            raise InvalidOptionError(f"relatif=True needs a self-influence, which {self.name!r} does not "
                                     "define")
        scale = influence.double().clamp_min(1e-30).sqrt()
        for lo, hi, block in blocks:
            yield lo, hi, block / scale[lo:hi].to(block.dtype)

    def _dda_blocks(self, ctx: Context, queries: Examples, feats: list[torch.Tensor]
                    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """DDA's default (`dda.dda`): per-checkpoint scores, z-scored per query, weighted by the query's
        fitting error, then each training column divided by its root-mean-square over the queries."""
        from .dda import column_rms_normalize, fitting_errors, zscore

        if type(self)._blocks is not GradientSimilarity._blocks:
            raise InvalidOptionError(f"dda=True is not available for method {self.name!r}; use it with "
                                     "grad-dot, grad-cos, tracin or an influence method")
        errors = []
        for state in self.states:
            with self._at(ctx, state) as model:
                errors.append(fitting_errors([model], ctx.task, queries.items,
                                             batch_size=self.options.batch_size)[:, 0])
        weights = torch.stack(errors, 1)  # [n_query, C]
        total = torch.zeros(len(queries), len(self.train_ids), dtype=torch.float64)
        for c in range(len(self.stores)):
            matrix = reduce_blocks(self._blocks(feats, only=c), len(queries), len(self.train_ids), None)
            total += weights[:, c:c + 1] * zscore(matrix["matrix"].double())  # type: ignore[union-attr]
        yield 0, len(self.train_ids), column_rms_normalize(total)  # train-side normalisation

    def self_influence(self, ctx: Context) -> torch.Tensor | None:
        """Σ_c w_c ∇L_c(i)ᵀ P_c ∇L_c(i) (P = I for grad-dot and TracIn); undefined for grad-cos (always 1)."""
        if self.normalize:
            return None
        total = torch.zeros(len(self.train_ids), dtype=torch.float64)
        if type(self).precondition is GradientSimilarity.precondition:  # gᵀg was saved with the store
            for store, w in zip(self.stores, self.weights):
                total += w * store.sqnorms()
            return total if self.stores[0].dtype == "float64" else total.float()
        for c, (store, w) in enumerate(zip(self.stores, self.weights)):
            for lo, hi, g in store.shards():
                g = g.double()
                total[lo:hi] += w * (self.precondition(c, g).double() * g).sum(1)
        return total if self.stores[0].dtype == "float64" else total.float()


def reduce_blocks(blocks: Iterator[tuple[int, int, torch.Tensor]], n_query: int, n_train: int,
                  top_k: int | None) -> dict[str, torch.Tensor | None]:
    """Assemble streamed score blocks into a dense matrix, or keep only each query's top and bottom k."""
    if top_k is None:
        matrix = None
        for lo, hi, block in blocks:
            if matrix is None:  # the blocks' precision: float64 scores from a float64 store
                matrix = torch.empty(n_query, n_train, dtype=block.dtype)
            matrix[:, lo:hi] = block
        return {"matrix": matrix}
    if top_k < 1:
        raise InvalidOptionError("top_k must be at least 1")
    k = min(top_k, n_train)
    empty = torch.empty(n_query, 0)
    top_v, top_i, bot_v, bot_i = empty, empty.long(), empty, empty.long()
    for lo, hi, block in blocks:
        idx = torch.arange(lo, hi).expand(n_query, -1)
        top_v, j = torch.cat([top_v, block], 1).topk(min(k, top_v.shape[1] + hi - lo), dim=1)
        top_i = torch.cat([top_i, idx], 1).gather(1, j)
        bot_v, j = torch.cat([bot_v, block], 1).topk(min(k, bot_v.shape[1] + hi - lo), dim=1,
                                                     largest=False)
        bot_i = torch.cat([bot_i, idx], 1).gather(1, j)
    return {"matrix": None, "top_values": top_v, "top_indices": top_i, "bottom_values": bot_v,
            "bottom_indices": bot_i}


def _load_state(checkpoint: Any) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    if not isinstance(checkpoint, dict):
        raise InvalidOptionError("a checkpoint is a state_dict, a model, or the path of a saved state_dict")
    return checkpoint


def _shapes(batch: Any) -> Any:
    """The shapes of a one-example batch without its batch axis, for error messages."""
    return tree_map(lambda t: tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else type(t).__name__, batch)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)

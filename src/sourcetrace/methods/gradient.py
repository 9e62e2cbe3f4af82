"""The one gradient pipeline: features × preconditioner × checkpoint combination × post-processing.

Per checkpoint c, the training rows g_c(i) (per-example gradients through a `FeatureMap`) go to a
`GradientStore`; a `Preconditioner` is fitted on them; a query's measurement rows q_c are preconditioned,
and one streaming loop scores them against every shard:

    score(q, i) = post_i · Σ_c w_c · std_c(-(P_c q_c)ᵀ g_c(i) · col_c(i))

(`methods.parts`: w_c and col_c from the Combination, std_c a per-query z-score for DDA, post_i from the
PostProcess). The same loop gives top-k, per-module scores and the DDA reference statistics; self-influence
is Σ_c w_c col_c(i)² g_c(i)ᵀ P_c g_c(i). grad-dot is score(q, i) = -∇m(q)·∇L(i).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import distributed
from ..curvature import CurvatureContext, build_curvature
from ..curvature.base import Preconditioner
from ..data import Examples, state_fingerprint
from ..errors import InvalidOptionError, ShapeError
from ..grads import GradientCapture
from ..grads.features import FEATURE_MAPS, KINDS, FeatureMap
from ..grads.store import GradientStore
from ..scores import Scores
from ..tasks import collate
from ..trajectory import as_trajectory
from . import register
from .base import Context, Method, Options, at_checkpoint, example_shapes, to_device
from .parts import COMBINATIONS, Combination, Cosine, DDANormalize, RelatIF

SHARD_BYTES = 256 * 2**20  # a shard is read into memory whole while scoring
STORE_WARN_BYTES = 2**30  # a fit whose stored rows would pass this is warned about before its first pass
#: which options belong to which part, and the values of that part they apply to
APPLIES = {"proj_dim": ("features", ("random", "structured")),
           "rank": ("features", ("kronecker", "structured")),
           "projection": ("features", ("random", "kronecker", "structured")),
           "query_rank": ("features", ("identity",)),
           "out_to_loss": ("combination", ("ensemble",)), "dda_reference": ("dda", (True,))}


@dataclass(frozen=True)
class GradientOptions(Options):
    """Options of the gradient methods, by part (each method sets its own defaults; see the README table).

    Data: modules (fnmatch patterns of module names; default every trainable parameter), batch_size,
    fallback (torch.func for parameters outside supported layers), store_dtype.
    features: "identity", "random" (proj_dim, projection 'gaussian' | 'rademacher' | 'none', seed) or
    "kronecker" (rank per side, projection, seed) or "structured" (kronecker, then proj_dim).
    query_rank: keep the top singular directions of each
    weight block of the preconditioned query (identity features).
    curvature: a name from `sourcetrace.curvature` ("identity", "ekfac", "cg", "gauss-newton", ...);
    damping (λ added to the mean-loss curvature) or damping_factor (× the preconditioner's scale);
    curvature_options: the preconditioner's own options (e.g. {"rank": 50} for arnoldi).
    combination: "single", "tracin" (checkpoints, learning_rates), "ensemble" (checkpoints, out_to_loss
    'mean' | 'per-model'); trajectory: a run recorded with `TrajectoryRecorder` instead of checkpoints.
    cosine: grad-cos. relatif: divide by √self-influence. dda: Debias and Denoise Attribution (checkpoints
    from the base model on, fitting-error weights; with `dda_reference` (queries like yours, or a number of
    training examples) also a train-side normalisation over them; this project's reading of the paper, see
    `methods.dda`).
    """

    modules: tuple[str, ...] | list[str] | None = None
    batch_size: int = 64
    fallback: bool = True
    store_dtype: str = "float32"
    features: str = "identity"
    proj_dim: int = 2048
    projection: str = "gaussian"
    rank: int = 32
    seed: int = 0
    query_rank: int | None = None
    curvature: str = "identity"
    damping: float | None = None
    damping_factor: float | None = None
    curvature_options: dict[str, Any] = field(default_factory=dict)
    combination: str = "single"
    checkpoints: tuple[Any, ...] | list[Any] | None = None
    learning_rates: tuple[float, ...] | list[float] | None = None
    trajectory: Any = None
    out_to_loss: str = "mean"
    cosine: bool = False
    relatif: bool = False
    dda: bool = False
    dda_reference: Any = None

    def __post_init__(self) -> None:
        if self.trajectory is not None:
            if self.checkpoints is not None:
                raise InvalidOptionError("give trajectory=... or checkpoints=[...], not both")
            object.__setattr__(self, "trajectory", as_trajectory(self.trajectory))
        if self.dda_reference is not None and not isinstance(self.dda_reference, (int, float)):
            object.__setattr__(self, "dda_reference", Examples(self.dda_reference, name="dda_reference"))
        checks = [
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an integer >= 1",
             self.batch_size),
            (self.store_dtype in ("float32", "float64", "float16", "bfloat16"),
             "store_dtype must be 'float32', 'float64', 'float16' or 'bfloat16'", self.store_dtype),
            (self.features in FEATURE_MAPS, f"features must be one of {', '.join(FEATURE_MAPS)}",
             self.features),
            (self.proj_dim >= 1, "proj_dim must be at least 1", self.proj_dim),
            (self.rank >= 1, "rank must be at least 1", self.rank),
            (self.projection in (*KINDS, "none"), f"projection must be one of {', '.join((*KINDS, 'none'))}",
             self.projection),
            (self.query_rank is None or self.query_rank >= 1, "query_rank must be at least 1",
             self.query_rank),
            (self.combination in (*COMBINATIONS, "segments"),
             f"combination must be one of {', '.join(COMBINATIONS)}", self.combination),
            (self.out_to_loss in ("mean", "per-model"), "out_to_loss must be 'mean' or 'per-model'",
             self.out_to_loss),
            (self.dda_reference is None or isinstance(self.dda_reference, Examples)
             or (type(self.dda_reference) is int and self.dda_reference >= 1),
             "dda_reference must be reference queries (a dataset) or a number >= 1 of training examples",
             self.dda_reference),
            (self.learning_rates is None or (self.checkpoints is not None and len(self.learning_rates)
                                             == len(self.checkpoints)),
             "give one learning rate per checkpoint", self.learning_rates),
        ]
        for ok, message, value in checks:
            if not ok:
                raise InvalidOptionError(f"{message}; got {value!r}")


class GradientMethod(Method):
    """A composition of the four parts, scored by one streaming loop."""

    Options = GradientOptions
    options: GradientOptions

    def __init__(self, name: str, options: GradientOptions):
        super().__init__(name, options)
        o = options
        combination = "fitting-error" if o.dda else o.combination
        if o.dda and o.combination not in ("single", "tracin"):
            raise InvalidOptionError(f"dda=True replaces the checkpoint combination; {name!r} combines "
                                     f"checkpoints as {o.combination!r}")
        self.combination = COMBINATIONS.get(combination, Combination)(o)  # SOURCE sets its own
        if combination in COMBINATIONS:
            self.combination.check()
        self.featuremap = FeatureMap(o.features, o.proj_dim, o.projection, o.rank, o.seed)
        self.new_preconditioner()  # unknown names and options, and impossible pairings, fail here
        if o.relatif and (o.cosine or not self.combination.has_self_influence):
            raise InvalidOptionError(f"relatif=True needs a self-influence, which {name!r} with these "
                                     "options does not define")

    def check_given(self, given: set[str]) -> None:
        """Refuse options given for a part this composition does not use."""
        o = self.options
        values = {"features": o.features, "combination": o.combination, "dda": o.dda}
        for key in sorted(given):
            if key in APPLIES and values[APPLIES[key][0]] not in APPLIES[key][1]:
                part, uses = APPLIES[key]
                raise InvalidOptionError(f"{key}= applies to {part}={' or '.join(map(repr, uses))}; method "
                                         f"{self.name!r} has {part}={values[part]!r}")

    def new_preconditioner(self) -> Preconditioner:
        o = self.options
        damping = {k: v for k, v in (("damping", o.damping), ("damping_factor", o.damping_factor))
                   if v is not None}
        return build_curvature(o.curvature, o.features, **damping, **o.curvature_options)

    # ---- fit ----------------------------------------------------------------------------------------
    def resolve_trajectory(self, train: Examples) -> None:
        """Replace `trajectory=` by the options it stands for (when fitting: SOURCE needs the data)."""
        if self.options.trajectory is not None:
            extra = self.combination.trajectory_options(self.options.trajectory, train)
            self.options = dataclasses.replace(self.options, trajectory=None, **extra)
            self.combination.options = self.options

    def fit(self, ctx: Context, train: Examples) -> None:
        self.resolve_trajectory(train)
        o, comb = self.options, self.combination
        self.train_ids = train.ids
        # under torchrun each rank collects and scores its own slice (`sourcetrace.distributed`)
        distributed.check_supported(o.curvature, dda=o.dda, relatif=o.relatif, combination=comb)
        distributed.barrier()  # every rank has checked the workdir's manifest before any rank writes in it
        lo, hi = distributed.shard_bounds(len(train), o.batch_size)
        rank, size = distributed.world()
        self.offset, suffix = lo, ("" if size == 1 else f"-rank{rank}of{size}")
        part = train if size == 1 else Examples(torch.utils.data.Subset(train.items, range(lo, hi)),
                                                ids=train.ids[lo:hi], name="this rank's training data")
        self.train_shapes = example_shapes(collate(ctx.task, [train[0]]))
        self.states = comb.states()
        with at_checkpoint(ctx.model, self.states[-1]) as model:
            probe = to_device(collate(ctx.task, [train[i] for i in range(min(2, len(train)))]), model)
            self.featuremap.prepare(model, o.modules, ctx.task.train_loss, probe)
        fn = comb.train_function(ctx.task)
        self.stores: list[GradientStore] = []
        self.preconditioners: list[Preconditioner] = []
        self.bound: list[Any] = []  # the feature map bound at each checkpoint
        for c, state in enumerate(self.states):
            with at_checkpoint(ctx.model, state) as model:
                capture = GradientCapture(model, o.modules, fallback=o.fallback)
                features = self.featuremap.bind(capture, c)
                itemsize = 8 if o.store_dtype == "float64" else 4
                if c == 0:
                    warn_store_size(len(train), features.dim, itemsize, len(self.states), o.features)
                shard = max(1, min(8192, SHARD_BYTES // max(1, features.dim * itemsize)))
                key = {"checkpoint": state_fingerprint(model.state_dict()), "modules": o.modules,
                       "features": [o.features, o.proj_dim, o.projection, o.rank, o.seed]}
                store = GradientStore(ctx.workdir / f"train-grads-{c}{suffix}", len(part), features.dim,
                                      dtype=o.store_dtype, shard_size=shard, key=key, overwrite=ctx.overwrite,
                                      persist=ctx.persist)

                def rows(lo: int, hi: int, model: Any = model, features: Any = features) -> torch.Tensor:
                    batch = collate(ctx.task, [part[i] for i in range(lo, hi)])
                    return features(fn, to_device(batch, model))

                desc = "train gradients" + (f" (checkpoint {c + 1})" if len(self.states) > 1 else "")
                store.fill(rows, batch_size=o.batch_size, progress=ctx.progress and rank == 0, desc=desc)
                row_weights = comb.fit_checkpoint(ctx, c, model, part)
                pre = self.new_preconditioner()
                if comb.preconditions:
                    pre.fit(CurvatureContext(model, ctx.task, capture, part, batch_size=o.batch_size,
                                             folder=ctx.workdir / f"curvature-{c}{suffix}",
                                             progress=ctx.progress and rank == 0, store=store,
                                             features=features, row_weights=row_weights,
                                             batch_offset=lo // o.batch_size))
            self.stores.append(store)
            self.preconditioners.append(pre)
            self.bound.append(features)
        self.shapes, self.slices = dict(capture.shapes), dict(features.slices)
        comb.fit(self, ctx, train)
        self.post: list[Any] = [Cosine()] if o.cosine else []
        self.columns = [col for col in comb.columns]
        for p in self.post:
            self.columns = [p.checkpoint_column(self, c) * (1 if col is None else col)
                            for c, col in enumerate(self.columns)]
        self._self_influence: torch.Tensor | None = None
        self.final: torch.Tensor | None = None
        normalise = o.dda and o.dda_reference is not None
        finals = ([RelatIF()] if o.relatif else []) + ([DDANormalize()] if normalise else [])
        scale = [p.fit(self, ctx, train) for p in finals]
        self.final = torch.stack(scale).prod(0) if scale else None

    # ---- queries ------------------------------------------------------------------------------------
    def query_rows(self, ctx: Context, c: int, queries: Examples) -> torch.Tensor:
        """The queries' measurement rows at checkpoint c, [n_query, dim], in the store's precision."""
        o, store = self.options, self.stores[c]
        with at_checkpoint(ctx.model, self.states[c]) as model:
            features = self.featuremap.bind(GradientCapture(model, o.modules, fallback=o.fallback), c)
            if features.dim != store.dim:
                raise ShapeError(f"query features have {features.dim} entries but the training store has "
                                 f"{store.dim}; queries must go through the same model")
            try:
                rows = [features(ctx.task.measurement, to_device(collate(ctx.task, items), model))
                        for _, items in queries.batches(o.batch_size)]
            except RuntimeError as exc:  # a shape error only when the queries' shapes differ from training's
                shapes = example_shapes(collate(ctx.task, [queries[0]]))
                if shapes == self.train_shapes:
                    raise
                raise ShapeError(f"the model failed on the queries ({str(exc).splitlines()[0]}); queries "
                                 "must have the training data's shape: a training example has "
                                 f"{self.train_shapes}, a query has {shapes}") from exc
        return torch.cat(rows).to(torch.float64 if store.dtype == "float64" else torch.float32)

    def precondition(self, c: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows [n, dim] times the inverse curvature of checkpoint c."""
        return self.preconditioners[c].apply(rows).to(rows.dtype)

    def query_features(self, ctx: Context, queries: Examples) -> list[torch.Tensor]:
        """Each checkpoint's preconditioned query rows (cut to query_rank, unit length for cosine)."""
        feats = self.combination.query_features(self, ctx, queries)
        if self.options.query_rank is not None:
            feats = [low_rank(q, self.shapes, self.options.query_rank) for q in feats]
        for p in self.post:
            feats = [p.query(q) for q in feats]
        return feats

    # ---- the scoring loop ---------------------------------------------------------------------------
    def blocks(self, feats: list[torch.Tensor], query_weights: torch.Tensor | None = None,
               cols: torch.Tensor | None = None, final: bool = True
               ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Score blocks (lo, hi, [n_query, hi - lo]) shard by shard; `cols`: only these feature columns."""
        if cols is not None:
            feats = [q[:, cols] for q in feats]
        stats = self._row_stats(feats) if self.combination.standardize else None
        for parts in zip(*(s.shards() for s in self.stores)):
            lo, hi, total = parts[0][0], parts[0][1], None
            for c, (q, (_, _, g)) in enumerate(zip(feats, parts)):
                s = self._block(c, q, g if cols is None else g[:, cols], lo, hi)
                if stats is not None:
                    s = (s.double() - stats[c][0]) / stats[c][1]
                w = self.combination.weights[c] if query_weights is None else query_weights[:, c:c + 1]
                s = s * (w if isinstance(w, float) else w.to(s.dtype))
                total = s if total is None else total + s
            assert total is not None
            if final and self.final is not None:
                total = total * self.final[lo:hi].to(total.dtype)
            yield lo, hi, total

    def _block(self, c: int, q: torch.Tensor, g: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        block = -(q @ g.to(q.dtype).T)
        col = self.columns[c]
        return block if col is None else block * col[lo:hi].to(block.dtype)

    def _row_stats(self, feats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per checkpoint, each query's mean and standard deviation over the training set (two passes)."""
        out = []
        for c, q in enumerate(feats):
            total = torch.zeros(q.shape[0], dtype=torch.float64)
            for lo, hi, g in self.stores[c].shards():
                total += self._block(c, q, g, lo, hi).double().sum(1)
            mean = (total / self.stores[c].n)[:, None]
            total = torch.zeros(q.shape[0], dtype=torch.float64)
            for lo, hi, g in self.stores[c].shards():
                total += (self._block(c, q, g, lo, hi).double() - mean).pow(2).sum(1)
            out.append((mean, (total / self.stores[c].n).sqrt().clamp_min(1e-300)[:, None]))
        return out

    def score(self, ctx: Context, queries: Examples, top_k: int | None = None) -> Scores:
        feats = [distributed.broadcast(q) for q in self.query_features(ctx, queries)]
        weights = self.combination.query_weights(self, ctx, queries)
        parts = self.reduce(self.blocks(feats, weights), len(queries), top_k)
        attach = top_k is None and self.options.curvature == "identity" and not self.options.cosine
        return Scores(train_ids=self.train_ids, query_ids=queries.ids, method=self.name,
                      metadata={"options": self.options.manifest()},
                      self_influence=self.self_influence(ctx) if attach else None, **parts)

    def reduce(self, blocks: Iterator[tuple[int, int, torch.Tensor]], n_query: int, top_k: int | None
               ) -> dict[str, torch.Tensor | None]:
        """`reduce_blocks` over this process's rows, merged across processes under torchrun."""
        parts = reduce_blocks(blocks, n_query, self.stores[0].n, top_k)
        if distributed.world()[1] == 1:
            return parts
        return distributed.merge_parts(distributed.all_gather_objects((self.offset, parts)),
                                       len(self.train_ids), top_k)

    def score_by_module(self, ctx: Context, queries: Examples) -> dict[str, Scores]:
        """Scores split by module (by feature block: a parameter, or a projected weight); they add up."""
        if self.combination.standardize or self.options.features == "random":
            raise InvalidOptionError(f"per-module scores need features that keep modules apart and no "
                                     f"per-query standardisation; {self.name!r} with these options lacks one")
        feats = self.query_features(ctx, queries)
        spans: dict[str, list[slice]] = {}
        for name, sl in self.slices.items():
            spans.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(sl)
        out = {}
        for module, slices in spans.items():
            cols = torch.cat([torch.arange(s.start, s.stop) for s in slices])
            parts = self.reduce(self.blocks(feats, cols=cols), len(queries), None)
            out[module] = Scores(train_ids=self.train_ids, query_ids=queries.ids, method=self.name,
                                 metadata={"module": module, "options": self.options.manifest()}, **parts)
        return out

    def self_influence(self, ctx: Context) -> torch.Tensor | None:
        """Σ_c w_c col_c(i)² g_c(i)ᵀ P_c g_c(i); undefined for cosine and per-query weights."""
        if self.options.cosine or not self.combination.has_self_influence:
            return None
        if self._self_influence is None:
            total = torch.zeros(self.stores[0].n, dtype=torch.float64)
            for c, (store, w, col) in enumerate(zip(self.stores, self.combination.weights,
                                                    self.combination.columns)):
                if self.options.curvature == "identity":  # gᵀg was saved with the store
                    values = store.sqnorms()
                else:
                    values = torch.cat([(self.precondition(c, g.double()).double() * g.double()).sum(1)
                                        for _, _, g in store.shards()])
                total += w * (values if col is None else col.double() ** 2 * values)
            if distributed.world()[1] > 1:
                total = torch.cat(distributed.all_gather_objects(total))
            self._self_influence = total if self.stores[0].dtype == "float64" else total.float()
        return self._self_influence


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
    if not isinstance(top_k, int) or top_k < 1:
        raise InvalidOptionError(f"top_k must be an integer >= 1; got {top_k!r}")
    k = min(top_k, n_train)
    empty = torch.empty(n_query, 0)
    top_v, top_i, bot_v, bot_i = empty, empty.long(), empty, empty.long()
    for lo, hi, block in blocks:
        idx = torch.arange(lo, hi).expand(n_query, -1)
        top_v, j = torch.cat([top_v.to(block.dtype), block], 1).topk(min(k, top_v.shape[1] + hi - lo), dim=1)
        top_i = torch.cat([top_i, idx], 1).gather(1, j)
        bot_v, j = torch.cat([bot_v.to(block.dtype), block], 1).topk(min(k, bot_v.shape[1] + hi - lo), dim=1,
                                                                     largest=False)
        bot_i = torch.cat([bot_i, idx], 1).gather(1, j)
    return {"matrix": None, "top_values": top_v, "top_indices": top_i, "bottom_values": bot_v,
            "bottom_indices": bot_i}


def low_rank(rows: torch.Tensor, shapes: dict[str, tuple[int, ...]], rank: int) -> torch.Tensor:
    """Each row with every weight's block (as a [shape[0], rest] matrix) cut to its top `rank` SVD terms."""
    out, start = rows.clone(), 0
    for shape in shapes.values():
        size = int(torch.Size(shape).numel())
        if len(shape) >= 2 and min(shape[0], size // shape[0]) > rank:
            block = rows[:, start:start + size].reshape(rows.shape[0], shape[0], -1)
            u, s, vh = torch.linalg.svd(block, full_matrices=False)
            out[:, start:start + size] = ((u[..., :rank] * s[:, None, :rank]) @ vh[:, :rank]).reshape(
                rows.shape[0], -1)
        start += size
    return out


def warn_store_size(n: int, dim: int, itemsize: int, checkpoints: int, features: str) -> None:
    """Warn, before the first pass, when the stored rows (n × dim × bytes per checkpoint) pass 1 GB."""
    size = n * dim * itemsize * checkpoints
    if size > STORE_WARN_BYTES:
        hint = ("features='kronecker' (LoGra's projection, rank=...) or features='random' (proj_dim=...)"
                if features == "identity" else "a smaller rank= or proj_dim=")
        warnings.warn(f"the training store will take about {size / 2**30:.1f} GB ({n} examples x {dim} "
                      f"features x {itemsize} bytes x {checkpoints} checkpoint(s)); for a compact store use "
                      f"{hint}, or modules=[...] to attribute through fewer layers", stacklevel=4)


register("grad-dot", GradientMethod, fixed=("curvature", "cosine"), curvature="identity", cosine=False)
register("grad-cos", GradientMethod, fixed=("curvature", "cosine"), curvature="identity", cosine=True)
register("tracin", GradientMethod, fixed=("combination",), combination="tracin")

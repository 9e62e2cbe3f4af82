"""Exact unrolled differentiation by replay (as in MAGIC, Ilyas & Engstrom 2025): `method="replay"`.

A recorded training run (`TrajectoryRecorder`) is a chain of updates z_t = F_t(z_{t-1}, w) over the state
z = (parameters, optimizer state), where step t minimises Σ_{i∈B_t} w_i ℓ_i(θ) / |B_t| (or the sum, as
recorded) at w = 1. The score of training example i for query q is the exact derivative dm_q(θ_T)/dw_i
(= dm/dε_i with w_i = 1 + ε_i), summed over every step that used i: positive = up-weighting i raises the
measurement, the library's sign convention. Reverse mode: a_T = (∇m(θ_T), 0), a_{t-1} = a_tᵀ ∂F_t/∂z,
dm/dw_{B_t} += a_tᵀ ∂F_t/∂w (vector-Jacobian products through the update, second order in the loss).
Forward states are recomputed from the recorded checkpoints, a segment at a time, with at most about
2√K states of a K-step segment in memory (two-level recomputation), so memory does not grow with the run.
Several queries share one reverse pass (their adjoints are vmapped).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vjp, vmap
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from ..artifacts import atomic_write
from ..data import Examples
from ..errors import InvalidOptionError, ShapeError, SourcetraceError
from ..scores import Scores
from ..tasks import Task, collate
from ..trajectory import OptimizerSpec, Trajectory, as_trajectory, model_signature
from . import register
from .base import Context, Method, Options
from .gradient import reduce_blocks

State = dict[str, Any]  # {"params": {name: t}, "opt": {"buf"|"m"|"v": {name: t}}}


@dataclass(frozen=True)
class ReplayOptions(Options):
    """Options of exact replay.

    trajectory: the recorded run (a `Trajectory` or its workdir). query_batch: queries that share one reverse
    pass (their adjoints are vmapped; memory grows with it). max_states: states of a segment kept in memory
    (default ~2√K for a K-step segment). dtype: replay precision ("float64" for a reference; default: the
    model's). check_tol: relative distance allowed between the replayed final parameters and the model's.
    at: the example weight w where the derivative is taken. 1 (default): the recorded run itself. 0.5: the
    run with every example at half weight (same order, same initialisation), the centre of the random
    halves that LDS removes: a midpoint-rule average of the derivative along the path from w = 1 to w = 0.
    orders: average the derivative over this many data orders, the recorded one and `orders - 1`
    re-shuffles (within each stage, examples trade batch slots with examples used as often; seeded by
    `order_seed`; same batch sizes, rates, optimizer and starting state), each replayed from the first
    checkpoint: what retraining with a fresh seed would do, which one recorded order cannot show. To
    predict retraining on random halves with new seeds (LDS), use at=0.5 and orders=8; the default is the
    exact derivative of the recorded run.
    """

    trajectory: Any = None
    query_batch: int = 32
    max_states: int | None = None
    dtype: str | None = None
    check_tol: float = 1e-3
    at: float = 1.0
    orders: int = 1
    order_seed: int = 0

    def __post_init__(self) -> None:
        if self.trajectory is None:
            raise InvalidOptionError("replay needs trajectory=<workdir or Trajectory> recorded while "
                                     "training with sourcetrace.TrajectoryRecorder")
        object.__setattr__(self, "trajectory", as_trajectory(self.trajectory))
        if self.query_batch < 1:
            raise InvalidOptionError("query_batch must be at least 1")
        if self.max_states is not None and self.max_states < 2:
            raise InvalidOptionError("max_states must be at least 2")
        if self.orders < 1:
            raise InvalidOptionError("orders must be at least 1 (1 = the recorded order only)")
        if not 0.0 <= self.at <= 1.0:
            raise InvalidOptionError("at must lie in [0, 1] (1 = the recorded run)")
        if self.dtype not in (None, "float32", "float64"):
            raise InvalidOptionError("dtype must be None, 'float32' or 'float64'")


class _Bound(nn.Module):
    """`fn(model, batch)` as a module, so that functional_call can swap the model's parameters in."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(self.model, batch)


class Replayer:
    """Reverse-mode differentiation of a recorded run; `derivatives(queries)` gives dm_q/dw_i [Q, n_train]."""

    def __init__(self, model: nn.Module, task: Task, trajectory: Trajectory, train: Examples, *,
                 max_states: int | None = None, dtype: torch.dtype | None = None, progress: bool = False,
                 at: float = 1.0, reshuffle: int | None = None):
        self.traj, self.task, self.train = trajectory, task, train
        self.model = model
        _check_deterministic(model)
        self.max_states = max_states
        self.progress = progress
        p0 = next(model.parameters())
        self.device = p0.device
        self.dtype = dtype or p0.dtype
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        position = {i: k for k, i in enumerate(train.ids)}
        missing = [i for ids in trajectory.batch_ids for i in ids if i not in position]
        if missing:
            raise ShapeError(f"the trajectory trained on ids missing from the training data, e.g. "
                             f"{sorted(set(map(str, missing)))[:5]}; pass the training set that was used")
        self.positions = [torch.tensor([position[i] for i in ids]) for ids in trajectory.batch_ids]
        self.reshuffled = reshuffle is not None
        if reshuffle is not None:
            self.positions = reshuffled(self.positions, [s.start for s in trajectory.stages], reshuffle)
        self.loss_fn = _Bound(model, task.train_loss)
        self.measure_fn = _Bound(model, task.measurement)
        self.final_params: dict[str, torch.Tensor] | None = None
        self.at = float(at)
        self._starts: dict[int, tuple[State, dict[str, torch.Tensor], int, bool]] = {}

    # ---- states --------------------------------------------------------------------------------------
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def _load(self, step: int) -> tuple[State, dict[str, torch.Tensor], int, bool]:
        """State after checkpoint `step`, for the optimizer of step `step + 1`: (z, constants, k, has_buf)."""
        model_state, opt_state = self.traj.checkpoint(step)
        params = {n: self._cast(model_state[n]) for n in self.trainable}
        consts = {n: self._cast(v) for n, v in model_state.items() if n not in params}
        spec = self.traj.optimizer_at(step + 1) if step < self.traj.n_steps else self.traj.optimizers[-1]
        opt, k, has_buf = _opt_state(spec, params, opt_state)
        return {"params": params, "opt": opt}, consts, k, has_buf

    def _weights(self, t: int) -> torch.Tensor:
        return torch.full((len(self.positions[t - 1]),), self.at, device=self.device, dtype=self.dtype)

    def _start(self, step: int) -> tuple[State, dict[str, torch.Tensor], int, bool]:
        """The state at checkpoint `step`: recorded (at = 1, recorded order), or replayed from the start."""
        if self.at == 1.0 and not self.reshuffled:
            return self._load(step)
        if not self._starts:  # one forward pass at the scaled weights, keeping each segment's start
            z, consts, k, has_buf = self._load(0)
            bounds = sorted(c for c in self.traj.checkpoints if c < self.traj.n_steps)
            new_opt = {o.start for o in self.traj.optimizers}
            for a, b in zip(bounds, [*bounds[1:], self.traj.n_steps]):
                if a in new_opt and a > 0:  # a new optimizer: its recorded (fresh) state, our parameters
                    fresh, _, k, has_buf = self._load(a)
                    z = {"params": z["params"], "opt": fresh["opt"]}
                self._starts[a] = (z, consts, k, has_buf)
                _, z, k, has_buf = self._forward(z, consts, k, has_buf, a, b, b - a + 1)
        return self._starts[step]

    def _batch(self, t: int) -> Any:
        items = [self.train[int(i)] for i in self.positions[t - 1]]
        return self._inputs(collate(self.task, items))

    def _inputs(self, batch: Any) -> Any:
        """A batch on the replay's device, floating inputs in its precision."""
        def cast(t: Any) -> Any:
            return self._cast(t) if isinstance(t, torch.Tensor) else t

        return tree_map(cast, batch)

    def _update(self, t: int, consts: dict[str, torch.Tensor], k: int, has_buf: bool
                ) -> Callable[[State, torch.Tensor], State]:
        """F_t(z, w): step t (1-based) of the recorded optimizer as a pure function."""
        spec = self.traj.optimizer_at(t)
        rates = self.traj.lrs[t - 1]
        batch = self._batch(t)
        denom = float(len(self.positions[t - 1])) if self.traj.reduction == "mean" else 1.0
        group_of = spec.group_of()

        def loss(params: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
            losses = functional_call(self.loss_fn, {**_prefix(params), **_prefix(consts)}, (batch,))
            return (w * losses).sum() / denom

        def step(z: State, w: torch.Tensor) -> State:
            g = grad(loss)(z["params"], w)
            return _optimizer_step(spec, group_of, rates, z, g, k, has_buf)

        return step

    def _forward(self, z: State, consts: dict[str, torch.Tensor], k: int, has_buf: bool, lo: int, hi: int,
                 keep: int) -> tuple[dict[int, tuple[State, int, bool]], State, int, bool]:
        """Run steps lo+1..hi from z (at lo); keep the state at lo and every `keep`-th step after it."""
        kept = {}
        for t in range(lo + 1, hi + 1):
            if (t - 1 - lo) % keep == 0:
                kept[t - 1] = (z, k, has_buf)
            k_next = k + 1
            w = self._weights(t)
            with torch.no_grad():
                z = _detach(self._update(t, consts, k_next, has_buf)(z, w))
            k, has_buf = k_next, True
        return kept, z, k, has_buf

    def derivatives(self, queries: Examples, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """dm_q(θ_T)/dw_i for queries lo..hi, summed over the steps that used i: [n_query, n_train]."""
        hi = len(queries) if hi is None else hi
        traj = self.traj
        T = traj.n_steps
        bounds = sorted({c for c in traj.checkpoints if c < T}) + [T]
        if bounds[0] != 0:
            raise SourcetraceError("the trajectory has no checkpoint before its first step")
        q_batch = self._inputs(collate(self.task, [queries[i] for i in range(lo, hi)]))
        nq = hi - lo
        out = torch.zeros(nq, len(self.train), dtype=self.dtype, device=self.device)
        adj: State | None = None
        bar = tqdm(total=T, desc="replay (reverse)", disable=not self.progress, leave=False)
        for j in range(len(bounds) - 2, -1, -1):
            start, end = bounds[j], bounds[j + 1]
            z0, consts, k0, buf0 = self._start(start)
            K = end - start
            stride = self._stride(K)
            kept, zT, _, _ = self._forward(z0, consts, k0, buf0, start, end, stride)
            if adj is None:  # the last segment: the final parameters are known now
                self.final_params = zT["params"]
                adj = {"params": self._measurement_grads(zT["params"], consts, q_batch), "opt": {}}
            for a in sorted(kept, reverse=True):
                b = min(a + stride, end)
                z, k, has_buf = kept[a]
                inner, _, _, _ = self._forward(z, consts, k, has_buf, a, b, 1)
                for t in range(b, a, -1):
                    z_prev, k_prev, buf_prev = inner[t - 1]
                    adj = self._reverse_step(t, z_prev, consts, k_prev + 1, buf_prev, adj, out)
                    bar.update(1)
            # crossing to the previous segment: a new optimizer starts from a state of its own
            if start in {o.start for o in traj.optimizers} and start > 0:
                adj = {"params": adj["params"], "opt": {}}
        bar.close()
        return out

    def _stride(self, K: int) -> int:
        if self.max_states is None:
            return max(1, math.ceil(math.sqrt(K)))
        # kept ≈ K / s outer states + s inner states ≤ max_states
        for s in range(1, K + 1):
            if math.ceil(K / s) + s <= self.max_states:
                return s
        return max(1, math.ceil(math.sqrt(K)))

    def _measurement_grads(self, params: dict[str, torch.Tensor], consts: dict[str, torch.Tensor],
                           batch: Any) -> dict[str, torch.Tensor]:
        def meas(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(self.measure_fn, {**_prefix(p), **_prefix(consts)}, (batch,))

        return {n: g.detach() for n, g in jacrev(meas)(params).items()}

    def _reverse_step(self, t: int, z: State, consts: dict[str, torch.Tensor], k: int, has_buf: bool,
                      adj: State, out: torch.Tensor) -> State:
        """One vector-Jacobian product through step t for every query's adjoint; adds dm/dw to `out`."""
        w = self._weights(t)
        z_new, vjp_fn = vjp(self._update(t, consts, k, has_buf), z, w)  # type: ignore[misc]
        nq = out.shape[0]
        # the adjoint has the output's structure; optimizer state it does not cover (the end, a new
        # optimizer) has a zero adjoint
        have = adj["opt"]
        cot = {"params": adj["params"],
               "opt": {key: {n: have[key][n] if key in have else x.new_zeros((nq, *x.shape))
                             for n, x in v.items()} for key, v in z_new["opt"].items()}}
        try:
            dz, dw = vmap(vjp_fn)(cot)
        except (RuntimeError, NotImplementedError):  # an op without a batching rule: one query at a time
            parts = [vjp_fn(_index(cot, r)) for r in range(nq)]
            dz = _stack([p[0] for p in parts])
            dw = torch.stack([p[1] for p in parts])
        out.index_add_(1, self.positions[t - 1].to(out.device), dw.detach())
        return _detach(dz)


def reshuffled(positions: list[torch.Tensor], stage_starts: list[int], seed: int) -> list[torch.Tensor]:
    """Another data order: within each stage, examples trade the batch slots they filled with examples the
    stage used as often (so each keeps its count, and an epoch's structure stays)."""
    gen = torch.Generator().manual_seed(seed)
    starts = sorted({0, *stage_starts})
    out = []
    for a, b in zip(starts, [*starts[1:], len(positions)]):
        if a >= b:
            continue
        used, counts = torch.unique(torch.cat(positions[a:b]), return_counts=True)
        mapping = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
        for c in torch.unique(counts):
            same = used[counts == c]
            mapping[same] = same[torch.randperm(len(same), generator=gen)]
        out += [mapping[p] for p in positions[a:b]]
    return out


class _Lazy:
    """A value made by `make()` on first use, then kept."""

    def __init__(self, make: Callable[[], Any]):
        self.make, self.value = make, None

    def get(self) -> Any:
        if self.value is None:
            self.value = self.make()
        return self.value


def _prefix(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in d.items()}


def _detach(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    return tree.detach() if isinstance(tree, torch.Tensor) else tree


def _index(tree: Any, r: int) -> Any:
    if isinstance(tree, dict):
        return {k: _index(v, r) for k, v in tree.items()}
    return tree[r]


def _stack(trees: list[Any]) -> Any:
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return torch.stack(trees)


def _check_deterministic(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise InvalidOptionError(f"module {name!r} is dropout; replay re-runs the training steps and "
                                     "needs them deterministic (train without dropout, or set p=0)")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            raise InvalidOptionError(f"module {name!r} is batch norm with running statistics, which replay "
                                     "does not track; use LayerNorm/GroupNorm or track_running_stats=False")


def _opt_state(spec: OptimizerSpec, params: dict[str, torch.Tensor],
               recorded: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, dict[str, torch.Tensor]], int,
                                                                      bool]:
    """The recorded optimizer state in replay's form: (tensors, Adam step count, whether SGD has a buffer)."""
    def get(name: str, key: str) -> torch.Tensor:
        entry = recorded.get(name, {})
        if key in entry:
            return entry[key].to(params[name].device, params[name].dtype)
        return torch.zeros_like(params[name])

    if spec.kind == "SGD":
        if not any(g["momentum"] for g in spec.groups):
            return {}, 0, False
        has = all("momentum_buffer" in recorded.get(n, {}) for n in params)
        return {"buf": {n: get(n, "momentum_buffer") for n in params}}, 0, has
    steps = {int(recorded[n]["step"].item()) for n in params if "step" in recorded.get(n, {})}
    if len(steps) > 1:
        raise SourcetraceError(f"parameters are at different Adam step counts {sorted(steps)}; replay needs "
                               "every parameter updated at every step")
    k = steps.pop() if steps else 0
    moments = {"m": {n: get(n, "exp_avg") for n in params}, "v": {n: get(n, "exp_avg_sq") for n in params}}
    return moments, k, True


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """√v with derivative 0 where v = 0 (a coordinate whose gradient has always been exactly 0)."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def _optimizer_step(spec: OptimizerSpec, group_of: dict[str, int], rates: list[float], z: State,
                    g: dict[str, torch.Tensor], k: int, has_buf: bool) -> State:
    """torch.optim's SGD / Adam / AdamW update (single-tensor form) as a pure function of (z, g).

    SGD: d = g + λθ; b = μb + (1-τ)d (b = d on the first step); d = d + μb (Nesterov) or b; θ -= η d.
    Adam: d = g + λθ (AdamW: θ *= 1 - ηλ instead); m, v moving averages of d, d²;
    θ -= η/(1-β1^k) · m / (√v/√(1-β2^k) + eps)   (torch/optim/sgd.py, adam.py).
    """
    params, opt = z["params"], z["opt"]
    new_p: dict[str, torch.Tensor] = {}
    new_o: dict[str, dict[str, torch.Tensor]] = {key: {} for key in opt}
    for name, p in params.items():
        h = spec.groups[group_of[name]]
        lr = rates[group_of[name]]
        d = -g[name] if h.get("maximize") else g[name]
        wd = h.get("weight_decay") or 0.0
        if spec.kind == "SGD":
            if wd:
                d = d + wd * p
            mu = h.get("momentum") or 0.0
            if mu:
                buf = mu * opt["buf"][name] + (1 - (h.get("dampening") or 0.0)) * d if has_buf else d
                new_o["buf"][name] = buf
                d = d + mu * buf if h.get("nesterov") else buf
            new_p[name] = p - lr * d
            continue
        decoupled = spec.kind == "AdamW" or h.get("decoupled_weight_decay")
        if wd and decoupled:
            p = p * (1 - lr * wd)
        elif wd:
            d = d + wd * p
        b1, b2 = h["betas"]
        m = b1 * opt["m"][name] + (1 - b1) * d
        v = b2 * opt["v"][name] + (1 - b2) * d * d
        new_o["m"][name], new_o["v"][name] = m, v
        bc1, bc2 = 1 - b1 ** k, 1 - b2 ** k
        new_p[name] = p - (lr / bc1) * m / (_safe_sqrt(v) / math.sqrt(bc2) + h["eps"])
    return {"params": new_p, "opt": new_o}


class Replay(Method):
    """Exact derivative of each query's measurement w.r.t. each training example's weight in a recorded
    run."""

    Options = ReplayOptions
    options: ReplayOptions

    def fit(self, ctx: Context, train: Examples) -> None:
        o = self.options
        self.trajectory = o.trajectory
        if model_signature(ctx.model) != self.trajectory.model_signature:
            raise ShapeError(f"the trajectory {self.trajectory.workdir} was recorded for a model with other "
                             "parameters (names, shapes or dtypes); attribute the model that was recorded")
        dtype = getattr(torch, o.dtype) if o.dtype else None

        def replayer(reshuffle: int | None) -> Replayer:
            return Replayer(ctx.model, ctx.task, self.trajectory, train, max_states=o.max_states, dtype=dtype,
                            progress=ctx.progress, at=o.at, reshuffle=reshuffle)

        self.replayer = replayer(None)
        # the other orders, built when first scored; each keeps its segments' starting states in memory
        seeds = [1000 * o.order_seed + r for r in range(1, o.orders)]
        self.reshuffles = [_Lazy(functools.partial(replayer, seed)) for seed in seeds]
        self.train_ids = train.ids
        self._checked = False

    def score(self, ctx: Context, queries: Examples, top_k: int | None = None) -> Scores:
        from safetensors.torch import load_file, save_file

        o = self.options
        folder = ctx.workdir / "replay" / queries.fingerprint()
        blocks = []
        n = len(queries)
        for lo in range(0, n, o.query_batch):
            hi = min(lo + o.query_batch, n)
            path = folder / f"queries-{lo:08d}-{hi:08d}.safetensors"
            if path.exists() and not ctx.overwrite:
                block = load_file(path)["scores"]
            else:
                block = self.replayer.derivatives(queries, lo, hi).cpu()
                self._check_final(ctx)
                for other in tqdm(self.reshuffles, desc="replay (other orders)", leave=False,
                                  disable=not ctx.progress or not self.reshuffles):
                    block += other.get().derivatives(queries, lo, hi).cpu()
                block /= 1 + len(self.reshuffles)
                data = {"scores": block.contiguous()}

                def write(tmp: str, data: dict[str, torch.Tensor] = data) -> None:
                    save_file(data, tmp)

                atomic_write(path, write)
            blocks.append(block)
        matrix = torch.cat(blocks)

        def rows() -> Iterator[tuple[int, int, torch.Tensor]]:
            yield 0, len(self.train_ids), matrix

        parts = reduce_blocks(rows(), n, len(self.train_ids), top_k)
        # derivatives of the measurement in each example's weight: removing i is w_i: 1 → 0; an effect
        # size (scale 1) only for the recorded run itself (at=1, one order), not for at/orders variants
        exact = o.at == 1 and o.orders == 1
        return Scores(train_ids=self.train_ids, query_ids=queries.ids, method=self.name,
                      metadata={"options": o.manifest(), "removal_scale": 1.0 if exact else None}, **parts)

    def _check_final(self, ctx: Context) -> None:
        """Warn when the model being attributed is not where the recorded run ends."""
        final = self.replayer.final_params
        if self._checked or final is None or self.options.at != 1.0:
            return
        self._checked = True
        own = dict(ctx.model.named_parameters())
        num = sum(float((final[n].double() - own[n].detach().double().to(final[n].device)).norm() ** 2)
                  for n in final)
        den = sum(float(own[n].detach().double().norm() ** 2) for n in final)
        rel = math.sqrt(num / max(den, 1e-300))
        if rel > self.options.check_tol:
            warnings.warn(f"the replayed run ends {rel:.2e} (relative) away from the model's parameters; "
                          "the scores are derivatives at the replayed end point. Record the run that trained "
                          "this model, with a fixed data order and the loss the task computes",
                          RuntimeWarning, stacklevel=3)


register("replay", Replay)

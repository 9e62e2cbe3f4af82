"""Recording how a model was trained: checkpoints, learning rates, data order, optimizer and stages.

The user's training loop calls `recorder.step(model, optimizer, batch_ids)` after every optimizer step;
the recorder keeps the ids of the examples the step used, its learning rate, and at chosen steps a
checkpoint of the model and the optimizer state (SGD with momentum, Adam, AdamW). `recorder.stage(name)`
marks a stage boundary (pre-training, then fine-tuning). Everything is written atomically into a workdir
under a manifest; a restarted run continues from the last checkpoint (`resume`), a different run is
refused. `Trajectory.load(workdir)` reads it back for TracIn, SOURCE and exact replay (`methods/replay.py`).

Layout of the workdir: `manifest.json` (what run this is), `checkpoints/step-NNNNNNNN.safetensors` (model
and optimizer state by parameter name; its metadata also holds the steps recorded since the previous
commit and the record's index, so a checkpoint is one durable write), `trajectory.json` (the index, written
when the run finishes or resumes), `steps/NNNNNNNN.json` (steps N+1, ... written outside a checkpoint).
The newest commit (highest `seq`) among trajectory.json and the checkpoints is the record.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .artifacts import atomic_write_bytes, atomic_write_json, check_manifest, read_json
from .data import state_fingerprint
from .errors import InvalidOptionError, SourcetraceError, WorkdirMismatchError

FORMAT = 1
CHUNK = 1000  # steps recorded between checkpoints are also written out every CHUNK steps
REDUCTIONS = ("mean", "sum")

# hyper-parameters that define each supported optimizer's update (lr is recorded per step instead)
_HYPER = {
    "SGD": ("momentum", "dampening", "nesterov", "weight_decay", "maximize"),
    "Adam": ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"),
    "AdamW": ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"),
}


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer in force from step `start + 1` on: its kind, and per parameter group the parameter
    names and hyper-parameters (without lr, which is recorded per step)."""

    start: int
    kind: str
    groups: tuple[dict[str, Any], ...]

    def group_of(self) -> dict[str, int]:
        return {name: g for g, group in enumerate(self.groups) for name in group["params"]}

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "kind": self.kind, "groups": list(self.groups)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> OptimizerSpec:
        return cls(int(obj["start"]), obj["kind"], tuple(obj["groups"]))

    def same_update(self, other: OptimizerSpec) -> bool:
        return self.kind == other.kind and self.groups == other.groups


@dataclass(frozen=True)
class Stage:
    """A named stage of training that starts after step `start` (its first step is `start + 1`)."""

    name: str
    start: int


def optimizer_spec(model: nn.Module, optimizer: torch.optim.Optimizer, start: int) -> OptimizerSpec:
    """Describe `optimizer` by parameter names; refuse optimizers whose update replay cannot reproduce."""
    kind = type(optimizer).__name__
    if kind not in _HYPER:
        raise InvalidOptionError(f"the trajectory recorder supports torch.optim SGD, Adam and AdamW; "
                                 f"got {kind}")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise InvalidOptionError("the optimizer holds parameters that are not the model's; pass the "
                                     "model the optimizer was built for")
        hyper = {k: _plain(group.get(k)) for k in _HYPER[kind]}
        if hyper.get("amsgrad"):
            raise InvalidOptionError("amsgrad=True is not supported (its max() update has no useful "
                                     "derivative)")
        groups.append({"params": [names[id(p)] for p in group["params"]], **hyper})
    return OptimizerSpec(start, kind, tuple(groups))


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def model_signature(model: nn.Module) -> dict[str, Any]:
    """Names, shapes and dtypes of the model's state: what must match to resume or replay a trajectory."""
    return {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()}


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer state as flat tensors `optim/<param name>/<key>`."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if value is None:
                continue
            t = torch.as_tensor(value)
            out[f"optim/{names[id(p)]}/{key}"] = t.detach().to("cpu", copy=True).contiguous()
    return out


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put a recorded optimizer state ({param name: {key: tensor}}) into `optimizer`."""
    params = dict(model.named_parameters())
    optimizer.state.clear()
    for name, entries in state.items():
        p = params[name]
        optimizer.state[p] = {k: (v.clone() if k == "step" else v.to(p.device, p.dtype, copy=True))
                              for k, v in entries.items()}


class TrajectoryRecorder:
    """Record a training run into `workdir`, called from the user's loop.

    `recorder.step(model, optimizer, batch_ids, lr)` after each optimizer step (lr: the rate that step used;
    default: read from the optimizer, so call it before `scheduler.step()`). Checkpoints are taken after
    every `checkpoint_every`-th step, or after the steps in `at_steps`, and always before the first step.
    `reduction` says how the step's loss combined its examples' losses ("mean": Σ ℓ_i / |B|, "sum").
    `config` is anything identifying the run (seeds, data version); a workdir recorded with another config,
    schedule or model shape is refused unless `overwrite=True`. Checkpoint files are written by a background
    thread, so recording costs the training loop little; `finish()` waits for them.
    """

    def __init__(self, workdir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 checkpoint_every: int | None = None, at_steps: Sequence[int] | None = None,
                 reduction: str = "mean", config: dict[str, Any] | None = None, overwrite: bool = False):
        if (checkpoint_every is None) == (at_steps is None):
            raise InvalidOptionError("give exactly one of checkpoint_every=N or at_steps=[...]")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise InvalidOptionError("checkpoint_every must be at least 1")
        if reduction not in REDUCTIONS:
            raise InvalidOptionError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
        self.workdir = Path(workdir)
        self.checkpoint_every = checkpoint_every
        self.at_steps = None if at_steps is None else sorted({int(s) for s in at_steps})
        self.reduction = reduction
        manifest = {"kind": "trajectory", "format": FORMAT, "checkpoint_every": checkpoint_every,
                    "at_steps": self.at_steps, "reduction": reduction, "config": config or {},
                    "model": model_signature(model)}
        if overwrite:  # start over even when the settings are the same
            _remove_record(self.workdir)
        check_manifest(self.workdir, manifest, overwrite=overwrite, what="trajectory workdir")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sourcetrace-trajectory")
        self._pending: list[Future] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._optimizer_id = id(optimizer)
        meta = _latest_meta(self.workdir)
        if meta is not None:
            self.n_steps = int(meta["n_steps"])
            self.checkpoints: list[int] = list(meta["checkpoints"])
            self.stages = [Stage(s["name"], int(s["start"])) for s in meta["stages"]]
            self.optimizers = [OptimizerSpec.from_json(o) for o in meta["optimizers"]]
            self._chunks: list[dict[str, Any]] = list(meta["chunks"])
            self._seq = int(meta["seq"])
            self._ids, self._lrs = _read_steps(self.workdir, self.n_steps, self._chunks)
            self._flushed = self.n_steps
            self._resumed = self.n_steps == 0
            spec = optimizer_spec(model, optimizer, 0)
            if not any(spec.same_update(o) for o in self.optimizers):
                recorded = ", ".join(f"{o.kind} from step {o.start + 1}" for o in self.optimizers)
                raise WorkdirMismatchError(
                    f"trajectory workdir {self.workdir} was recorded with another optimizer ({recorded}; "
                    f"now {spec.kind} {spec.groups[0]}); use a new workdir or overwrite=True")
            if self.n_steps == 0:  # nothing but the start was recorded: start again from this model
                self._checkpoint(model, optimizer)
        else:
            self.n_steps, self.checkpoints, self.stages = 0, [], []
            self.optimizers = [optimizer_spec(model, optimizer, 0)]
            self._ids, self._lrs = [], []
            self._chunks = []
            self._seq = 0
            self._flushed = 0
            self._resumed = True
            self._checkpoint(model, optimizer)
        self._dirty = False

    # ---- the training loop's calls ------------------------------------------------------------------
    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             batch_ids: Sequence[Any] | torch.Tensor | np.ndarray,
             lr: float | Sequence[float] | None = None) -> None:
        """Record one optimizer step: the ids of the examples it used and its learning rate(s)."""
        if self._error is not None or not self._resumed:
            self._require_resumed()
        if id(optimizer) != self._optimizer_id:
            raise SourcetraceError("the optimizer changed; call recorder.stage(name, model, optimizer) "
                                   "before the first step with a new optimizer")
        groups = optimizer.param_groups
        if lr is None:
            rates = [g["lr"] for g in groups]
        elif isinstance(lr, (int, float)):
            rates = [float(lr)] * len(groups)
        else:
            rates = [float(r) for r in lr]
        if len(rates) != len(groups):
            raise InvalidOptionError(f"{len(rates)} learning rates for {len(groups)} parameter groups")
        if self._lrs and rates == self._lrs[-1]:
            rates = self._lrs[-1]  # a constant rate is kept once, not once per step
        # kept as given (ints, strings, numpy or tensor scalars); made JSON-plain by the writer thread
        ids = batch_ids.tolist() if isinstance(batch_ids, (torch.Tensor, np.ndarray)) else list(batch_ids)
        if not len(ids):
            raise InvalidOptionError("batch_ids is empty; give the ids of the examples this step trained on")
        self._ids.append(ids)
        self._lrs.append(rates)
        self.n_steps += 1
        self._dirty = True
        if self._due(self.n_steps):
            self._checkpoint(model, optimizer)
        elif self.n_steps - self._flushed >= CHUNK:
            self._commit()

    def stage(self, name: str, model: nn.Module | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> None:
        """Start stage `name` with the next step; with a (new) optimizer, also checkpoint the boundary.

        A new optimizer's state is taken as it is now (usually empty), independent of the previous stage's.
        """
        self._require_resumed()
        self.stages = [s for s in self.stages if s.start != self.n_steps] + [Stage(name, self.n_steps)]
        if optimizer is not None:
            if model is None:
                raise InvalidOptionError("give the model with the new optimizer: "
                                         "stage(name, model, optimizer)")
            spec = optimizer_spec(model, optimizer, self.n_steps)
            self.optimizers = [o for o in self.optimizers if o.start != self.n_steps] + [spec]
            self._optimizer_id = id(optimizer)
            self._checkpoint(model, optimizer)
        else:
            self._dirty = True  # committed with the next checkpoint

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int | None = None) -> int:
        """Continue a recorded run; returns the number of steps already done (the loop skips them).

        Without `step`, the model and optimizer are restored from the last checkpoint and later records are
        dropped. With `step` (the user restored their own checkpoint of that step), the records are cut there.
        """
        self._wait()
        if step is None:
            step = max(self.checkpoints)
            traj = Trajectory.load(self.workdir)
            state, opt_state = traj.checkpoint(step)
            model.load_state_dict(state)
            load_optimizer_state(model, optimizer, opt_state)
        if not 0 <= step <= self.n_steps:
            raise InvalidOptionError(f"cannot resume at step {step}: {self.n_steps} steps are recorded")
        spec = optimizer_spec(model, optimizer, 0)
        current = [o for o in self.optimizers if o.start <= step][-1]
        if not spec.same_update(current):
            raise WorkdirMismatchError(f"the optimizer differs from the one recorded for step {step}")
        self.n_steps = step
        self._ids, self._lrs = self._ids[:step], self._lrs[:step]
        self.checkpoints = [c for c in self.checkpoints if c <= step]
        self.stages = [s for s in self.stages if s.start <= step]
        self.optimizers = [o for o in self.optimizers if o.start <= step]
        self._optimizer_id = id(optimizer)
        self._chunks = [c for c in self._chunks if c["first"] < step]
        self._flushed = self._chunks[-1]["first"] if self._chunks else 0  # that chunk is written again
        self._resumed = True
        self._commit(drop_after=step)
        return step

    def finish(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write what is left (with the model and optimizer, a final checkpoint too); wait for the writes."""
        if model is not None and optimizer is not None and self.n_steps not in self.checkpoints:
            self._checkpoint(model, optimizer)
        elif self._dirty:
            self._commit()
        self._wait()

    close = finish

    @property
    def last_checkpoint(self) -> int:
        """The step of the latest checkpoint: where `resume` restarts (build that stage's optimizer)."""
        return max(self.checkpoints)

    # ---- internals ------------------------------------------------------------------------------------
    def _require_resumed(self) -> None:
        self._raise_failed()
        if not self._resumed:
            raise SourcetraceError(
                f"trajectory workdir {self.workdir} already holds {self.n_steps} recorded steps; call "
                "recorder.resume(model, optimizer) to continue from its last checkpoint (step "
                f"{self.last_checkpoint}), or pass overwrite=True to record from scratch")

    def _due(self, step: int) -> bool:
        if self.checkpoint_every is not None:
            return step % self.checkpoint_every == 0
        return step in (self.at_steps or ())

    def _checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Copy the state now (cheap) and write it in the background, with the steps since the last commit."""
        from safetensors.torch import save

        tensors = {f"model/{k}": v.detach().to("cpu", copy=True).contiguous()
                   for k, v in model.state_dict().items()}
        tensors.update(_optimizer_tensors(model, optimizer))
        step = self.n_steps
        if step not in self.checkpoints:
            self.checkpoints.append(step)
        name = f"checkpoints/step-{step:08d}.safetensors"
        record = self._record(name)
        path = self.workdir / name

        def write() -> None:
            meta = {"step": str(step), "record": _dumps(record)}
            atomic_write_bytes(path, save(tensors, metadata=meta))

        self._submit(write)

    def _commit(self, drop_after: int | None = None) -> None:
        """Write the steps since the last commit and trajectory.json; with `drop_after`, then delete the
        checkpoints of a run cut at that step."""
        name = f"steps/{self._flushed:08d}.json"
        record = self._record(name)
        folder = self.workdir

        def write() -> None:
            if record["chunk"] is not None:
                atomic_write_bytes(folder / name, _dumps(record["chunk"]).encode())
            atomic_write_json(folder / "trajectory.json", record["meta"])
            if drop_after is not None:
                for path in (folder / "checkpoints").glob("step-*.safetensors"):
                    if int(path.stem[5:]) > drop_after:
                        path.unlink()

        self._submit(write)

    def _record(self, file: str) -> dict[str, Any]:
        """A commit: the index (meta) and the steps since the previous commit, kept in `file`."""
        chunk = None
        if self.n_steps > self._flushed:
            first = self._flushed
            chunk = {"first": first, "ids": self._ids[first:], "lrs": self._lrs[first:]}
            self._chunks = [c for c in self._chunks if c["first"] < first] + [{"first": first, "file": file}]
        self._seq += 1
        self._flushed, self._dirty = self.n_steps, False
        stages = sorted(self.stages, key=lambda s: s.start)
        meta = {"format": FORMAT, "seq": self._seq, "n_steps": self.n_steps,
                "checkpoints": sorted(self.checkpoints), "stages": [{"name": s.name, "start": s.start}
                                                                     for s in stages],
                "optimizers": [o.to_json() for o in self.optimizers], "reduction": self.reduction,
                "chunks": list(self._chunks)}
        return {"meta": meta, "chunk": chunk}

    def _submit(self, fn: Any) -> None:
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            future = self._pool.submit(fn)
            future.add_done_callback(self._note_failure)
            self._pending.append(future)

    def _note_failure(self, future: Future) -> None:
        if future.exception() is not None and self._error is None:
            self._error = future.exception()

    def _raise_failed(self) -> None:
        if self._error is not None:
            raise SourcetraceError(f"writing the trajectory failed: {self._error}") from self._error

    def _wait(self) -> None:
        for f in list(self._pending):
            f.exception()
        self._pending = []
        self._raise_failed()

    def __enter__(self) -> TrajectoryRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.shutdown(wait=True)


def _remove_record(folder: Path) -> None:
    import shutil

    for sub in ("steps", "checkpoints"):
        if (folder / sub).is_dir():
            shutil.rmtree(folder / sub)
    if (folder / "trajectory.json").exists():
        (folder / "trajectory.json").unlink()


def _dumps(obj: Any) -> str:
    """Compact JSON (a long run records millions of ids); numpy / tensor scalars become plain numbers."""
    return json.dumps(obj, separators=(",", ":"), default=_plain_id)


def _plain_id(i: Any) -> Any:
    if isinstance(i, torch.Tensor):
        return i.tolist()
    if hasattr(i, "tolist") and not isinstance(i, (str, bytes)):
        return i.tolist()
    return i


def _checkpoint_record(path: Path) -> dict[str, Any] | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        text = (fh.metadata() or {}).get("record")
    return None if text is None else json.loads(text)


def _latest_meta(folder: Path) -> dict[str, Any] | None:
    """The newest committed index: trajectory.json or a later checkpoint's (a run killed before finishing)."""
    best = read_json(folder / "trajectory.json") if (folder / "trajectory.json").exists() else None
    for path in sorted((folder / "checkpoints").glob("step-*.safetensors")):
        record = _checkpoint_record(path)
        if record is not None and (best is None or record["meta"]["seq"] > best["seq"]):
            best = record["meta"]
    return best


def _read_steps(folder: Path, n_steps: int, chunks: list[dict[str, Any]]
                ) -> tuple[list[list[Any]], list[list[float]]]:
    ids: list[list[Any]] = []
    lrs: list[list[float]] = []
    for entry, end in zip(chunks, [*(c["first"] for c in chunks[1:]), n_steps]):
        path = folder / entry["file"]
        if not path.exists() or len(ids) != entry["first"]:
            raise SourcetraceError(f"trajectory {folder} is incomplete: steps from {len(ids) + 1} on are "
                                   "missing")
        chunk = read_json(path) if path.suffix == ".json" else (_checkpoint_record(path) or {})["chunk"]
        ids += chunk["ids"][: end - entry["first"]]
        lrs += chunk["lrs"][: end - entry["first"]]
    if len(ids) < n_steps:
        raise SourcetraceError(f"trajectory {folder} records {len(ids)} steps of the {n_steps} it claims")
    return ids[:n_steps], lrs[:n_steps]


@dataclass
class Trajectory:
    """A recorded training run: per-step batch ids and learning rates, checkpoints, optimizers, stages.

    Step t (1-based) trained on `batch_ids[t - 1]` with rates `lrs[t - 1]` (one per parameter group);
    `checkpoints` lists the steps after which the state was saved (0 = before training).
    """

    workdir: Path
    n_steps: int
    batch_ids: list[list[Any]]
    lrs: list[list[float]]
    checkpoints: list[int]
    stages: list[Stage]
    optimizers: list[OptimizerSpec]
    reduction: str
    model_signature: dict[str, Any]

    @classmethod
    def load(cls, workdir: str | os.PathLike) -> Trajectory:
        folder = Path(workdir)
        meta = _latest_meta(folder) if (folder / "manifest.json").exists() else None
        if meta is None:
            raise FileNotFoundError(f"{folder} holds no recorded trajectory; record one with "
                                    "sourcetrace.TrajectoryRecorder")
        manifest = read_json(folder / "manifest.json")
        n = int(meta["n_steps"])
        ids, lrs = _read_steps(folder, n, meta["chunks"])
        return cls(folder, n, ids, lrs, [int(c) for c in meta["checkpoints"]],
                   [Stage(s["name"], int(s["start"])) for s in meta["stages"]],
                   [OptimizerSpec.from_json(o) for o in meta["optimizers"]], meta["reduction"],
                   manifest["model"])

    @property
    def lr(self) -> list[float]:
        """The learning rate of the first parameter group at each step."""
        return [r[0] for r in self.lrs]

    def optimizer_at(self, step: int) -> OptimizerSpec:
        """The optimizer that performed step `step` (1-based)."""
        return [o for o in self.optimizers if o.start < step][-1]

    def checkpoint(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """(model state_dict, optimizer state {param name: {key: tensor}}) saved after step `step`."""
        from safetensors.torch import load_file

        if step not in self.checkpoints:
            raise InvalidOptionError(f"no checkpoint at step {step}; recorded: {self.checkpoints}")
        path = self.workdir / "checkpoints" / f"step-{step:08d}.safetensors"
        tensors = load_file(path)
        model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                name, key = k[len("optim/"):].rsplit("/", 1)
                optim.setdefault(name, {})[key] = v
        return model, optim

    def checkpoint_states(self) -> list[dict[str, torch.Tensor]]:
        """The model state at every checkpoint (for TracIn / SOURCE)."""
        return [self.checkpoint(c)[0] for c in self.checkpoints]

    def checkpoint_options(self, method: str = "tracin", train_ids: Sequence[Any] | None = None
                           ) -> dict[str, Any]:
        """Options that hand this run's checkpoints to `method="tracin"` or `method="source"`.

        TracIn: the checkpoints after the start, each with the mean learning rate of the steps since the one
        before. SOURCE: `source_options` (also step counts, stages and their
        examples as positions in `train_ids`, momentum, weight decay, Adam's preconditioners).
        """
        if method == "source":
            return source_options(self, train_ids)
        later = [c for c in self.checkpoints if c > 0]
        starts = [0, *later[:-1]]
        return {"checkpoints": [self.checkpoint(c)[0] for c in later],
                "learning_rates": [sum(self.lr[a:c]) / (c - a) for a, c in zip(starts, later)]}

    def fingerprint(self) -> str:
        """A hash of the record (ids, rates, schedule, optimizers): changes whenever the run does."""
        ids = {"checkpoints": self.checkpoints, "stages": self.stages, "optimizers": self.optimizers,
               "reduction": self.reduction, "ids": self.batch_ids, "lrs": self.lrs}
        raw = torch.frombuffer(bytearray(repr(ids).encode()), dtype=torch.uint8)
        return state_fingerprint({"record": raw})

    def __repr__(self) -> str:
        return (f"Trajectory({str(self.workdir)!r}, {self.n_steps} steps, checkpoints {self.checkpoints}, "
                f"stages {[s.name for s in self.stages]})")

    def replay_forward(self, model: nn.Module, train_loss: Any, examples: Any, start: int = 0,
                       until: int | None = None) -> nn.Module:
        """Re-run the recorded steps with the real torch optimizer from checkpoint `start` to step `until`.

        `examples(ids)` returns the batch of those ids; `train_loss(model, batch)` its per-example losses. A
        new stage's optimizer starts from the state recorded at its boundary. With deterministic kernels and
        the same loss code as the training loop, the model ends exactly where training did.
        """
        until = self.n_steps if until is None else until
        state, opt_state = self.checkpoint(start)
        model.load_state_dict(state)
        opt = None
        for t in range(start, until):  # performs step t + 1
            spec = self.optimizer_at(t + 1)
            if opt is None or (spec.start == t and t != start):
                opt = build_optimizer(model, spec)
                load_optimizer_state(model, opt, opt_state if t == start else self.checkpoint(t)[1])
            for group, rate in zip(opt.param_groups, self.lrs[t]):
                group["lr"] = rate
            opt.zero_grad()
            losses = train_loss(model, examples(self.batch_ids[t]))
            loss = losses.mean() if self.reduction == "mean" else losses.sum()
            loss.backward()
            opt.step()
        return model


def as_trajectory(value: Any) -> Trajectory:
    """A `Trajectory`, or the workdir of a recorded one, as a `Trajectory`."""
    if isinstance(value, Trajectory):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Trajectory.load(value)
    raise InvalidOptionError("trajectory must be a Trajectory or the workdir of one recorded with "
                             "sourcetrace.TrajectoryRecorder")


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """A torch optimizer with the recorded hyper-parameters (lr set per step by the caller)."""
    params = dict(model.named_parameters())
    cls = getattr(torch.optim, spec.kind)
    groups = []
    for group in spec.groups:
        hyper = {k: (tuple(v) if isinstance(v, list) else v) for k, v in group.items()
                 if k != "params" and v is not None}
        groups.append({"params": [params[n] for n in group["params"]], **hyper})
    return cls(groups, lr=0.0)


def trajectory_callback(workdir: str | os.PathLike, *, checkpoint_every: int | None = None,
                        at_steps: Sequence[int] | None = None, config: dict[str, Any] | None = None,
                        id_key: str = "id", overwrite: bool = False) -> Any:
    """A transformers `TrainerCallback` that records a Trainer's run like `TrajectoryRecorder`.

    The Trainer does not tell callbacks which examples a step used, so the callback also wraps the data
    collator: build the Trainer with `data_collator=callback.collator(your_collator)`, examples that carry an
    `id_key` field, `remove_unused_columns=False` and `dataloader_num_workers=0`; the wrapper records the ids
    and drops the field. For replay, also train with a fixed data order and `max_grad_norm=0` (no clipping).
    """
    from .errors import require

    transformers = require("transformers", "llm")

    class TrajectoryCallback(transformers.TrainerCallback):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            self.recorder: TrajectoryRecorder | None = None
            self.model: Any = None
            self.queue: list[list[Any]] = []  # ids of collated training micro-batches, in order
            self.seen: list[Any] = []  # ids of the micro-batches the current step has run forward

        def collator(self, inner: Any = None) -> Any:
            """Wrap a data collator (default: transformers' default) to record and drop the example ids."""
            base = inner or transformers.default_data_collator

            def collate(features: list[dict[str, Any]]) -> Any:
                if self.model is None or self.model.training:  # evaluation batches are not recorded
                    self.queue.append([_plain_id(f[id_key]) for f in features])
                return base([{k: v for k, v in f.items() if k != id_key} for f in features])

            return collate

        def _forward(self, module: Any, args: Any) -> None:
            # the data loader collates ahead of use: a micro-batch's ids are taken when it runs forward
            if module.training and torch.is_grad_enabled() and self.queue:
                self.seen += self.queue.pop(0)

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                           optimizer: Any = None, **kw: Any) -> None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            self.model, self.optimizer = model, inner
            self.recorder = TrajectoryRecorder(workdir, model, inner, checkpoint_every=checkpoint_every,
                                               at_steps=at_steps, config=config, overwrite=overwrite)
            if self.recorder.n_steps:  # a resumed Trainer: cut the record at the step it resumes from
                self.recorder.resume(model, inner, step=state.global_step)
            self.hook = model.register_forward_pre_hook(self._forward)

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # after optimizer.step(), before the scheduler moves the learning rate on
            assert self.recorder is not None
            if not self.seen:
                raise SourcetraceError("no example ids were recorded for this step; build the Trainer with "
                                       "data_collator=callback.collator(...) and remove_unused_columns=False")
            self.recorder.step(self.model, self.optimizer, self.seen)
            self.seen = []

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.recorder is not None:
                self.hook.remove()
                self.recorder.finish(self.model, self.optimizer)

    return TrajectoryCallback()


def source_options(trajectory: Trajectory, train_ids: Sequence[Any] | None = None) -> dict[str, Any]:
    """SOURCE's options from a recorded `Trajectory`: checkpoints after step 0, the mean learning rate over
    the steps each stands for (× batch size under reduction="sum"), step counts, SGD momentum and weight
    decay, stages, and per stage the training examples its steps used (mapped to positions in `train_ids`,
    needed when there are several stages). Usage: `Attributor(model, task, "source", **source_options(t,
    ids))`."""
    steps = [int(s) for s in trajectory.checkpoints if int(s) > 0]
    if not steps:
        raise InvalidOptionError("the trajectory has no checkpoint after step 0; record with "
                                 "checkpoint_every=N or at_steps=[...]")
    varying = ("params", "lr", "initial_lr")  # learning rates are recorded per step
    kinds = {(o.kind, tuple(sorted((k, str(v)) for k, v in o.groups[0].items() if k not in varying)))
             for o in trajectory.optimizers}
    if len(kinds) > 1:
        used = ", ".join(f"{o.kind} from step {o.start + 1}" for o in trajectory.optimizers)
        raise InvalidOptionError(f"SOURCE takes one optimizer setting (besides the learning rate) for the "
                                 f"whole run; this trajectory changes it between stages ({used})")
    spec = trajectory.optimizers[0]
    group = spec.groups[0]
    if spec.kind not in ("SGD", "Adam", "AdamW"):
        raise InvalidOptionError(f"SOURCE takes runs of SGD, Adam or AdamW; this one used {spec.kind}")
    if group.get("dampening", 0) or group.get("nesterov", False):
        raise InvalidOptionError("SOURCE supports SGD momentum without dampening or Nesterov")
    if group.get("amsgrad", False):
        raise InvalidOptionError("SOURCE's Adam variant does not cover amsgrad")
    rates = []
    prev = 0
    for s in steps:
        per_step = [trajectory.lrs[t][0] * (len(trajectory.batch_ids[t]) if trajectory.reduction == "sum"
                                            else 1) for t in range(prev, s)]
        rates.append(sum(per_step) / len(per_step))
        prev = s
    options: dict[str, Any] = {
        "checkpoints": [trajectory.checkpoint(s)[0] for s in steps], "learning_rates": rates, "steps": steps,
        "momentum": float(group.get("momentum", 0.0)), "weight_decay": float(group.get("weight_decay", 0.0))}
    if spec.kind != "SGD":
        decoupled = spec.kind == "AdamW" or bool(group.get("decoupled_weight_decay"))
        options.update(momentum=0.0, preconditioners=[adam_preconditioner(trajectory.checkpoint(s)[1], group)
                                                      for s in steps], decoupled_weight_decay=decoupled)
    bounds = sorted(st.start for st in trajectory.stages if st.start > 0)
    raw = [sum(b < s for b in bounds) for s in steps]
    if len(set(raw)) > 1:
        rank = {r: i for i, r in enumerate(sorted(set(raw)))}
        options["stages"] = [rank[r] for r in raw]
        if train_ids is None:
            raise InvalidOptionError("a trajectory with stages needs train_ids=[...] (the ids of the "
                                     "training data in the order given to fit) to find each stage's examples")
        position = {i: k for k, i in enumerate(train_ids)}
        ends = [0, *bounds, trajectory.n_steps]
        chosen = []
        for r in sorted(set(raw)):
            seen = {i for t in range(ends[r], ends[r + 1]) for i in trajectory.batch_ids[t]}
            idx = sorted(position[i] for i in seen if i in position)
            chosen.append(None if len(idx) == len(position) else idx)
        options["stage_examples"] = chosen
    return options


def adam_preconditioner(state: dict[str, dict[str, torch.Tensor]], group: dict[str, Any], cap: float = 100.0
                        ) -> dict[str, torch.Tensor]:
    """Adam's diagonal preconditioner 1/(√v̂ + ε) per parameter, v̂ the bias-corrected second moment, capped
    at `cap` × its median over the parameter's entries.

    The cap: where v̂ ≈ 0 (a unit that rarely fired, an input that is almost always 0) 1/(√v̂ + ε) runs up
    to 1/ε, yet Adam's step there stays about η (|m̂|/√v̂ ≲ 1) and its response to one more example
    saturates; uncapped, those entries dominate every score (digits AdamW: SOURCE LDS 0.48 uncapped, 0.90
    capped at 3-100 × the median, benchmarks/replay.md).
    """
    beta2, eps = float(group["betas"][1]), float(group["eps"])
    out = {}
    for name, entry in state.items():
        if "exp_avg_sq" not in entry:
            continue
        k = int(entry["step"].item()) if "step" in entry else 0
        if k < 1:
            raise InvalidOptionError(f"checkpoint before Adam's first step has no second moments ({name}); "
                                     "give SOURCE checkpoints after training started")
        v_hat = entry["exp_avg_sq"].double() / (1 - beta2 ** k)
        p = 1.0 / (v_hat.sqrt() + eps)
        out[name] = p.clamp_max(cap * float(p.median()))
    return out


__all__ = ["OptimizerSpec", "Stage", "Trajectory", "TrajectoryRecorder", "adam_preconditioner",
           "as_trajectory", "build_optimizer", "load_optimizer_state", "model_signature", "optimizer_spec",
           "source_options", "trajectory_callback"]


# ---- gradients collected during training ----------------------------------------------------------------

class GradientCollector:
    """Write the projected per-example gradients of training batches into a `GradientStore` while the
    model trains, so the run leaves its attribution store behind without a second pass over the data.

    Call `collector.collect(step, batch, positions)` in the loop before `optimizer.step()`: when `step` is
    one of `steps` (default: every step), the batch's per-example training-loss gradients at the model's
    current parameters (the point the step's gradient is taken at) go through the feature map (`features`,
    `proj_dim`, `projection`, `seed`, as `Attributor` options) into the store rows at `positions` (each
    example's index in the training set). A row keeps the first value collected for it, so collect over one
    epoch to cover the training set. The model is run in eval mode for this (dropout off, as `Attributor`
    does), at the cost of one extra forward and backward per collected batch. Each shard is renamed into
    place once complete, so a killed run keeps what it collected.

    `optimizer`: an Adam or AdamW optimizer whose state preconditions the rows, as LESS and bergson do:
    each gradient is divided elementwise by √v̂ + ε (v̂ the bias-corrected second moment the optimizer holds
    when `collect` is called, before its step) and then projected. Adam has no second moment before its
    first step, so collect from step 2; `features` must be "random" or "identity" (they form the gradient).
    """

    def __init__(self, folder: str | os.PathLike, model: nn.Module, task: Any, n_train: int, *,
                 steps: Sequence[int] | None = None, features: str = "random", proj_dim: int = 2048,
                 projection: str = "gaussian", rank: int = 32, seed: int = 0, store_dtype: str = "float32",
                 modules: Sequence[str] | None = None, shard_size: int = 8192,
                 optimizer: torch.optim.Optimizer | None = None):
        from .grads import GradientCapture
        from .grads.features import FEATURE_MAPS, FeatureMap
        from .grads.store import GradientStore

        if features not in FEATURE_MAPS:
            raise InvalidOptionError(f"features must be one of {', '.join(FEATURE_MAPS)}; got {features!r}")
        if optimizer is not None and not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise InvalidOptionError(f"optimizer= preconditions rows with Adam's second moments; got "
                                     f"{type(optimizer).__name__} (give an Adam or AdamW, or leave it out)")
        if optimizer is not None and features not in ("random", "identity"):
            raise InvalidOptionError(f"Adam-preconditioned rows need the whole gradient: features='random' "
                                     f"or 'identity', not {features!r}")
        # a DDP model trains through its .module's parameters; FSDP shards them between its forwards
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        if any(c.__name__ in ("FullyShardedDataParallel", "FSDPModule")
               for m in model.modules() for c in type(m).__mro__):
            raise InvalidOptionError("GradientCollector cannot collect from an FSDP-sharded model (its "
                                     "parameters are shards between forwards); collect with DDP or one "
                                     "process, or attribute a saved checkpoint with an Attributor")
        self.model, self.task, self.optimizer = model, task, optimizer
        self.steps = None if steps is None else {int(s) for s in steps}
        self.capture = GradientCapture(model, modules)
        self.featuremap = FeatureMap(features, proj_dim, projection, rank, seed)
        self.features = self.featuremap.bind(self.capture, 0)
        key = {"collected": "during training", "modules": modules,
               "features": [features, proj_dim, projection, rank, seed],
               **({"preconditioned": "adam"} if optimizer is not None else {})}
        self.store = GradientStore(folder, n_train, self.features.dim, dtype=store_dtype,
                                   shard_size=shard_size, key=key)

    def collect(self, step: int, batch: Any, positions: Sequence[int]) -> bool:
        """Collect this collated batch's rows at `positions` if `step` is chosen; whether it was."""
        if self.steps is not None and int(step) not in self.steps:
            return False
        was = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                if self.optimizer is None:
                    rows = self.features(self.task.train_loss, batch)
                else:
                    flat = self.capture.flat(self.task.train_loss, batch)
                    flat = flat * self._adam_scale().to(flat.dtype)
                    projection = getattr(self.features, "projection", None)  # random features; else identity
                    rows = flat if projection is None else projection(flat)
        finally:
            self.model.train(was)
        self.store.write_at(list(positions), rows.detach())
        return True

    def _adam_scale(self) -> torch.Tensor:
        """1/(√v̂ + ε) of every captured parameter, flat in the capture's order (uncapped, as LESS)."""
        opt = cast(torch.optim.Optimizer, self.optimizer)
        groups = {id(p): g for g in opt.param_groups for p in g["params"]}
        parts = []
        for name, p in self.capture.params.items():
            entry = opt.state.get(p, {})
            if "exp_avg_sq" not in entry or id(p) not in groups:
                raise InvalidOptionError(f"the optimizer holds no second moment of {name!r} yet (Adam's "
                                         "state appears at its first step): collect from step 2 (steps=...)")
            scale = adam_preconditioner({name: entry}, groups[id(p)], cap=math.inf)[name]
            parts.append(scale.reshape(-1))
        return torch.cat(parts)

    @property
    def complete(self) -> bool:
        return self.store.complete


def gradient_callback(collector: GradientCollector, train_ids: Sequence[Any], *, id_key: str = "id") -> Any:
    """A transformers `TrainerCallback` that feeds a Trainer's training batches to `collector`.

    As with `trajectory_callback`, build the Trainer with `data_collator=callback.collator(your_collator)`,
    examples that carry an `id_key` field (its position in `train_ids` is its store row),
    `remove_unused_columns=False` and `dataloader_num_workers=0`. The collector's task receives the
    examples (without the id field) collated by `sourcetrace.tasks.collate`; each micro-batch is collected
    at `state.global_step + 1` (the step it is part of), before the optimizer steps.
    """
    from .errors import require
    from .tasks import collate

    transformers = require("transformers", "llm")
    position = {_plain_id(i): p for p, i in enumerate(train_ids)}

    class GradientCallback(transformers.TrainerCallback):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            self.queue: list[list[dict[str, Any]]] = []  # collated micro-batches' examples, in order
            self.seen: list[list[dict[str, Any]]] = []  # the micro-batches this step has run forward
            self.model: Any = None

        def collator(self, inner: Any = None) -> Any:
            base = inner or transformers.default_data_collator

            def collate_batch(features: list[dict[str, Any]]) -> Any:
                if self.model is None or self.model.training:
                    self.queue.append(features)
                return base([{k: v for k, v in f.items() if k != id_key} for f in features])

            return collate_batch

        def _forward(self, module: Any, args: Any) -> None:
            if module.training and torch.is_grad_enabled() and self.queue:
                self.seen.append(self.queue.pop(0))

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.model = model
            self.hook = model.register_forward_pre_hook(self._forward)

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            for features in self.seen:
                try:
                    rows = [position[_plain_id(f[id_key])] for f in features]
                except KeyError as exc:
                    raise SourcetraceError(f"example id {exc.args[0]!r} is not among train_ids; give the ids "
                                           "of the training set in store order") from None
                items = [{k: v for k, v in f.items() if k != id_key} for f in features]
                collector.collect(state.global_step + 1, collate(collector.task, items), rows)
            self.seen = []

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.hook.remove()

    return GradientCallback()

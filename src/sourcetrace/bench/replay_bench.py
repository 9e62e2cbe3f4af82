"""`sourcetrace bench replay`: exact replay on the digits MLP — cost, LDS, and the recorder's overhead.

Three settings, all the digits MLP of `bench/digits.py`: the converged run of `digits-mlp` (30 epochs), a
non-converged one (3 epochs) and a two-stage one (pre-train on the images of digits 0-4, then fine-tune on
all with a new optimizer). Each is recorded with `TrajectoryRecorder` (6 checkpoints) and attributed by
replay, grad-dot, TracIn, EK-FAC and SOURCE (those registered), against two ground truths:

- random: the usual LDS ground truth, models retrained on random halves with random seeds (data order
  and initialisation change with the seed);
- recorded order: the recorded run re-done with the examples outside the half given weight 0 (same
  initialisation, same batches, same 1/|B|), i.e. exactly the perturbation w_i = 1 → 0 whose first-order
  effect replay computes.
"""

from __future__ import annotations

import functools
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..artifacts import atomic_write_json
from .digits import SEEDS, DigitsSetting
from .runner import load_average, measure, versions, write_results

N_CHECKPOINTS = 6


@dataclass
class ReplaySetting(DigitsSetting):
    """DigitsSetting with a recorded, optionally two-stage training run.

    pretrain_epochs > 0: first train that many epochs on the examples of classes < pretrain_classes, then
    `epochs` epochs on all with a new optimizer of learning rate `finetune_lr`.
    """

    variant: str = "digits-mlp"
    pretrain_epochs: int = 0
    pretrain_classes: int = 5
    finetune_lr: float = 0.05
    optimizer: str = "sgd"  # or "adamw"
    momentum: float = 0.0

    def fingerprint(self) -> str:
        if self.variant == "digits-mlp":  # the digits-mlp setting itself: share its cached artifacts
            return super().fingerprint()
        import hashlib

        # fields added later: left out at their defaults
        later = {"optimizer": "sgd", "momentum": 0.0, "split": "tuning", "seed": 0}
        cfg = tuple(getattr(self, f.name) for f in fields(self)
                    if f.init and later.get(f.name) != getattr(self, f.name))
        return hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)

    def stages(self, idx: torch.Tensor) -> list[tuple[str, torch.Tensor, int, float]]:
        """(name, training positions, epochs, lr) of each stage of a run on `idx`."""
        if not self.pretrain_epochs:
            return [("train", idx, self.epochs, self.lr)]
        pre = idx[self.y_train[idx] < self.pretrain_classes]
        return [("pre-train", pre, self.pretrain_epochs, self.lr), ("fine-tune", idx, self.epochs,
                                                                    self.finetune_lr)]

    def order(self, idx: torch.Tensor, seed: int) -> list[tuple[int, torch.Tensor]]:
        """(stage, batch of training positions) per step: DigitsSetting.fit's order for one stage."""
        gen = torch.Generator().manual_seed(seed)
        steps = []
        for s, (_, pool, epochs, _) in enumerate(self.stages(idx)):
            for _ in range(epochs):
                perm = torch.randperm(len(pool), generator=gen)
                bs = self.batch_size
                steps += [(s, pool[perm[i: i + bs]]) for i in range(0, len(pool), bs)]
        return steps

    def run(self, indices: Any = None, seed: int = 0, weights: torch.Tensor | None = None,
            recorder_dir: Path | None = None) -> nn.Module:
        """Train (on `indices`, or on the recorded order with per-example `weights`), optionally recorded."""
        from ..trajectory import TrajectoryRecorder

        idx = torch.arange(self.n_train) if indices is None else torch.as_tensor(np.asarray(indices))
        stages = self.stages(idx)
        steps = self.order(idx, seed)
        model = self.model(seed)
        rec = None
        stage = -1
        opt: torch.optim.Optimizer | None = None
        every = max(1, len(steps) // N_CHECKPOINTS)
        for s, b in steps:
            if s != stage:
                stage = s
                opt = self.make_optimizer(model, stages[s][3])
                if recorder_dir is not None and rec is None:
                    rec = TrajectoryRecorder(recorder_dir, model, opt, checkpoint_every=every, overwrite=True,
                                             config={"setting": self.fingerprint(), "seed": seed})
                if rec is not None:
                    rec.stage(stages[s][0], model, opt if s else None)
            assert opt is not None
            opt.zero_grad()
            if weights is None:
                F.cross_entropy(model(self.x_train[b]), self.y_train[b]).backward()
            else:
                losses = F.cross_entropy(model(self.x_train[b]), self.y_train[b], reduction="none")
                ((weights[b] * losses).sum() / len(b)).backward()
            opt.step()
            if rec is not None:
                rec.step(model, opt, b)
        if rec is not None:
            rec.finish(model, opt)
        return model.eval()

    def train_fn(self, indices: np.ndarray, seed: int) -> nn.Module:
        with _one_thread():
            return self.run(indices, seed)

    def recorded_order_fn(self, indices: np.ndarray, seed: int) -> nn.Module:
        """The recorded full-data run (seed `self.seed`), with the examples outside `indices` weighted 0."""
        weights = torch.zeros(self.n_train)
        weights[torch.as_tensor(np.asarray(indices))] = 1.0
        with _one_thread():
            return self.run(None, self.seed, weights=weights)


class _one_thread:
    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.threads)


VARIANTS: dict[str, dict[str, Any]] = {
    "digits-mlp": {},
    "non-converged": {"epochs": 3},
    "two-stage": {"pretrain_epochs": 10, "epochs": 5},
    "adamw": {"epochs": 3, "optimizer": "adamw", "lr": 0.003},  # 91 % train accuracy, margin 0.8
}


def config(variant: str, split: str = "tuning") -> dict[str, Any]:
    return {"variant": variant, **VARIANTS[variant], "split": split, "seed": SEEDS[split]}


def setting(variant: str, split: str = "tuning") -> ReplaySetting:
    return ReplaySetting(**config(variant, split))


# replay's cost as the run grows: (hidden width, epochs) of the digits MLP, COST_QUERIES in one reverse pass
COST_QUERIES = 10
TUNING = ("the tuning split is digits-mlp's, where SOURCE's Adam cap (methods/source.py "
          "`adam_preconditioner`) and the replay variants were chosen; the reporting split is digits-mlp's "
          "reporting split (queries the tuning split never used, another training draw, model seed "
          f"{SEEDS['reporting']}), where nothing was chosen; the cost rows are timed once")
HEADINGS = {"tuning": "Tuning split (the replay variants and SOURCE's Adam cap were chosen here)",
            "reporting": "Reporting split (other queries, training draw and seed; nothing was chosen here)",
            "cost": "Cost as the run grows (tuning split's data)"}
SMALL_OUT = 0.05  # the fraction weighted 0 in the small-removal ground truth
SCALING = ((128, 3), (128, 30), (128, 625), (512, 30), (2048, 3), (8192, 3))


def _scores(config: dict[str, Any], trajectory_dir: str, method: str, n_queries: int | None = None
            ) -> np.ndarray:
    """One method's scores on one recorded setting (run in a fresh process by `measure`)."""
    import sourcetrace
    from sourcetrace.trajectory import Trajectory

    torch.set_num_threads(1)
    s = ReplaySetting(**config)
    traj = Trajectory.load(trajectory_dir)
    model = s.model(0)
    model.load_state_dict(traj.checkpoint(traj.n_steps)[0])
    model.eval()
    queries = s.queries if n_queries is None else (s.x_query[:n_queries], s.y_query[:n_queries])
    options: dict[str, Any] = {}
    if method in REPLAY:
        options = {"trajectory": traj, "query_batch": len(queries[0]), **REPLAY[method]}
        method = "replay"
    elif method in ("tracin", "source", "source-sgd"):
        options = traj.checkpoint_options(method.split("-")[0], train_ids=list(range(s.n_train)))
        if method == "source-sgd":  # the Adam run scored with the SGD formula: what the preconditioner adds
            adam = ("preconditioners", "decoupled_weight_decay")
            options = {k: v for k, v in options.items() if k not in adam}
            method = "source"
    elif method.endswith("-dda"):  # the checkpoints of the last stage, from its start (the "base") on
        first = max([0, *(stage.start for stage in traj.stages)])
        states = [traj.checkpoint(c)[0] for c in traj.checkpoints if c >= first]
        options = {"checkpoints": states, "dda": True, "dda_reference": 256}
        method = method[: -len("-dda")]
    attr = sourcetrace.Attributor(model, sourcetrace.ClassificationTask(), method, workdir=None,
                                  progress=False, **options)
    matrix = attr.fit(s.train).score(queries).matrix
    assert matrix is not None
    return matrix.double().numpy()


def _overhead(train: Callable[[Path | None], Any], repeats: int) -> dict[str, float]:
    """Wall and CPU time of `train(None)` (plain) and `train(folder)` (recorded), interleaved repeats; the
    fastest of each (the least disturbed by other load on the machine) and the median. Recording includes
    waiting, at the end, for every write to be on disk."""
    times: dict[str, list[float]] = {"train_s": [], "recorded_s": [], "train_cpu_s": [], "recorded_cpu_s": []}
    with _one_thread(), tempfile.TemporaryDirectory() as tmp:
        train(None)  # warm-up
        for r in range(repeats):
            for key, folder in (("train", None), ("recorded", Path(tmp) / f"r{r}")):
                t, c = time.perf_counter(), time.process_time()
                train(folder)
                times[f"{key}_s"].append(time.perf_counter() - t)
                times[f"{key}_cpu_s"].append(time.process_time() - c)
    out = {f"min_{k}": min(v) for k, v in times.items()} | {f"median_{k}": statistics.median(v)
                                                             for k, v in times.items()} | {"repeats": repeats}
    for stat in ("min", "median"):
        for unit in ("", "_cpu"):
            plain, rec = out[f"{stat}_train{unit}_s"], out[f"{stat}_recorded{unit}_s"]
            out[f"{stat}{unit}_overhead_pct"] = 100 * (rec - plain) / plain
    return out


def recorder_overhead(repeats: int = 15, hidden: int = 128) -> dict[str, float]:
    """The recorder's overhead on the converged digits run (N_CHECKPOINTS checkpoints + the start)."""
    s = ReplaySetting(**{**config("digits-mlp"), "hidden": hidden})
    out = _overhead(lambda folder: s.run(recorder_dir=folder), repeats)
    steps = len(s.order(torch.arange(s.n_train), 0))
    return out | {"steps": steps, "parameters": sum(p.numel() for p in s.model(0).parameters())}


def lm_recorder_overhead(repeats: int = 7, epochs: int = 4) -> dict[str, float]:
    """The recorder's overhead on fine-tuning facts-lm's tiny Llama (AdamW, N_CHECKPOINTS + the start)."""
    import copy

    from ..trajectory import TrajectoryRecorder
    from . import facts_lm

    setting = facts_lm.FactsSetting()
    corpus = setting.corpus()
    tok = facts_lm.WordTokenizer.fit(corpus.texts())
    examples = [facts_lm.train_example(tok, d.text) for d in corpus.train]
    init = facts_lm.make_model(len(tok), setting.hidden, setting.layers, intermediate=setting.intermediate)
    steps = epochs * math.ceil(len(examples) / 16)

    def train(folder: Path | None) -> None:
        def recorder(model: nn.Module, opt: torch.optim.Optimizer) -> TrajectoryRecorder:
            assert folder is not None
            return TrajectoryRecorder(folder, model, opt, checkpoint_every=steps // N_CHECKPOINTS,
                                      overwrite=True)

        facts_lm.train(copy.deepcopy(init), examples, epochs=epochs, lr=setting.finetune_lr,
                       recorder=recorder if folder is not None else None)

    out = _overhead(train, repeats)
    return out | {"steps": steps, "parameters": sum(p.numel() for p in init.parameters())}


# replay's variants: the exact derivative of the run; at the centre of the random halves; and that, averaged
# over 8 data orders (the recorded one and 7 re-shuffles)
REPLAY: dict[str, dict[str, Any]] = {"replay": {}, "replay-half": {"at": 0.5},
                                     "replay-half-8-orders": {"at": 0.5, "orders": 8}}
METHODS = (*REPLAY, "grad-dot", "tracin", "tracin-dda", "ekfac", "ekfac-dda", "source", "source-sgd")


def run(out_dir: Path = Path("benchmarks"), workdir: Path = Path("runs/bench/replay"), *,
        n_subsets: int = 100, seeds: tuple[int, ...] = (0, 1, 2), variants: tuple[str, ...] | None = None,
        methods: tuple[str, ...] = METHODS, scaling: tuple[tuple[int, int], ...] = SCALING,
        splits: tuple[str, ...] = ("tuning", "reporting"),
        digits_workdir: Path = Path("runs/bench/digits-mlp"), progress: bool = True) -> Path:
    from .. import evaluate
    from ..ensembles import retrain_subsets
    from ..methods import available_methods

    workdir.mkdir(parents=True, exist_ok=True)
    have = set(available_methods())
    rows: list[dict[str, Any]] = []
    overhead = recorder_overhead()
    overhead_wide = recorder_overhead(hidden=1024)
    overhead_lm = lm_recorder_overhead()
    if progress:
        for o in (overhead, overhead_wide, overhead_lm):
            print(f"recorder overhead: {_overhead_text(o)}")
    for split, variant in [(sp, v) for sp in splits for v in variants or tuple(VARIANTS)]:
        s = setting(variant, split)
        here = workdir / ("" if split == "tuning" else split) / variant  # tuning: where earlier runs cached
        with _one_thread():
            s.run(seed=s.seed, recorder_dir=here / "trajectory")
        from ..trajectory import Trajectory

        traj = Trajectory.load(here / "trajectory")
        n_params = sum(p.numel() for p in s.model(0).parameters())
        digits_truth = digits_workdir / ("" if split == "tuning" else split) / "ground-truth"
        truth_dir = digits_truth if variant == "digits-mlp" else here / "ground-truth"
        random = retrain_subsets(s.train_fn, s.measure_fn, s.n_train, n_subsets=n_subsets, fraction=0.5,
                                 seeds=seeds, workdir=truth_dir, fingerprint=s.fingerprint(),
                                 progress=progress)
        fixed = retrain_subsets(s.recorded_order_fn, s.measure_fn, s.n_train, n_subsets=n_subsets,
                                fraction=0.5, seeds=(0,), fingerprint=s.fingerprint(), progress=progress,
                                workdir=here / "recorded-order-truth")
        small = retrain_subsets(s.recorded_order_fn, s.measure_fn, s.n_train, n_subsets=n_subsets,
                                fraction=1 - SMALL_OUT, seeds=(0,), fingerprint=s.fingerprint(),
                                progress=progress,
                                workdir=here / "recorded-order-truth-5pct")
        for method in methods:
            if method == "source-sgd" and s.optimizer == "sgd":
                continue  # the same as source
            row: dict[str, Any] = {"split": split, "setting": variant, "method": method,
                                   "steps": traj.n_steps, "params": n_params}
            if _registered(method) not in have:
                rows.append({**row, "note": "not registered"})
                continue
            try:
                job = functools.partial(_scores, config(variant, split), str(here / "trajectory"), method)
                result = measure(job,
                                 ("sklearn.datasets", f"sourcetrace.methods.{_module(method)}"))
            except Exception as exc:  # a method that cannot run here is reported, not fatal
                rows.append({**row, "note": f"failed: {str(exc).splitlines()[0][:120]}"})
                continue
            lds_r, lds_f = evaluate.lds(result.scores, random), evaluate.lds(result.scores, fixed)
            lds_s = evaluate.lds(result.scores, small)
            cal_s, cal_f = evaluate.calibrate(result.scores, small), evaluate.calibrate(result.scores, fixed)
            rows.append({**row, "lds_random": str(lds_r), "lds_recorded": str(lds_f), "lds_small": str(lds_s),
                         "lds_random_mean": lds_r.mean, "lds_recorded_mean": lds_f.mean,
                         "lds_small_mean": lds_s.mean, "wall_s": result.wall_s, "peak_mb": result.peak_mb,
                         "scale": f"{cal_s.scale:.3g} ({cal_s.r2:.2f}) / {cal_f.scale:.3g} ({cal_f.r2:.2f})",
                         "scale_small": cal_s.scale, "scale_half": cal_f.scale, "r2_small": cal_s.r2,
                         "r2_half": cal_f.r2})
            if progress:
                print(f"{split:>9} {variant:>14} {method:<10} LDS random {lds_r}  recorded order {lds_f}  "
                      f"small out {lds_s}  {result.wall_s:7.2f} s {result.peak_mb:7.1f} MB")
    for hidden, epochs in scaling:
        cfg: dict[str, Any] = {"variant": f"scale-{hidden}-{epochs}", "hidden": hidden, "epochs": epochs}
        s = ReplaySetting(**cfg)
        traj_dir = workdir / str(cfg["variant"]) / "trajectory"
        with _one_thread():
            s.run(recorder_dir=traj_dir)
        n_params = sum(p.numel() for p in s.model(0).parameters())
        from ..trajectory import Trajectory

        steps = Trajectory.load(traj_dir).n_steps
        result = measure(functools.partial(_scores, cfg, str(traj_dir), "replay", COST_QUERIES),
                         ("sklearn.datasets", "sourcetrace.methods.replay"))
        rows.append({"split": "cost", "setting": f"hidden {hidden}, {epochs} epochs, {COST_QUERIES} queries",
                     "method": "replay",
                     "steps": steps, "params": n_params, "wall_s": result.wall_s, "peak_mb": result.peak_mb,
                     "note": f"{1e3 * result.wall_s / steps:.1f} ms per step, "
                             f"{1e6 * result.wall_s / (steps * n_params):.3f} µs per step × parameter"})
        if progress:
            print(rows[-1])
    base = setting("digits-mlp")
    pct = f"{100 * SMALL_OUT:g} %"
    info = {"data": f"sklearn digits, {base.n_train} train / {base.n_query} queries per split (digits-mlp's "
                    "splits), measurement: query margin",
            "model": f"MLP 64-{base.hidden}-10 ({sum(p.numel() for p in base.model(0).parameters()):,} "
                     f"parameters), batch {base.batch_size}",
            "settings": "; ".join(f"{v}: {describe(setting(v))}" for v in variants or VARIANTS),
            "recording": f"{N_CHECKPOINTS} checkpoints + the start, batch ids and lr of every step",
            "ground truth": f"{n_subsets} random subsets each; random = halves, {len(seeds)} seeds each "
                            "(order and init vary); recorded order = the recorded run with the other half "
                            f"weighted 0; {pct} out = the recorded run with a random {pct} weighted 0",
            "tuning and reporting": TUNING,
            "recorder overhead, digits MLP (SGD)": _overhead_text(overhead),
            "recorder overhead, digits MLP hidden 1024 (SGD)": _overhead_text(overhead_wide),
            "recorder overhead, facts-lm tiny Llama (AdamW)": _overhead_text(overhead_lm),
            "load average at the end of the run": f"{load_average()} (on a shared two-core machine)",
            "versions": versions("sourcetrace", "torch")}
    measurements = {"recorder_overhead": {"digits": overhead, "digits_hidden_1024": overhead_wide,
                                          "facts_lm": overhead_lm}}
    atomic_write_json(out_dir / "replay.json", {"benchmark": "replay", "info": info, "rows": rows,
                                                **measurements})
    return render(out_dir / "replay.json")


def render(path: Path = Path("benchmarks/replay.json")) -> Path:
    """Write replay.md (and the json, in its current form) from a run's replay.json: `run` ends with this,
    and it re-renders an earlier run's file with the current prose, every figure taken from that file."""
    import json

    data = json.loads(Path(path).read_text())
    rows, info = data["rows"], data["info"]
    for r in rows:  # files written before the R² had their own fields: read them from the scale column
        if "scale" in r and "r2_small" not in r:
            r["r2_small"], r["r2_half"] = (float(part.split("(")[1].rstrip(")"))
                                           for part in r["scale"].split(" / "))
    info.setdefault("tuning and reporting", TUNING)
    for r in rows:  # files written before the reporting split: every row on the tuning split
        r.setdefault("split", "cost" if r["setting"].startswith("cost: ") else "tuning")
        r["setting"] = r["setting"].removeprefix("cost: ")
    if "recorder_overhead" not in data:
        info.setdefault("prose", "re-written from this run's json by `sourcetrace.bench.replay_bench.render` "
                                 "(the run predates the prose computed from its results)")
    o = data.get("recorder_overhead") or _overheads_from_info(info)
    overhead, overhead_wide, overhead_lm = o["digits"], o["digits_hidden_1024"], o["facts_lm"]
    pct = f"{100 * SMALL_OUT:g} %"
    columns = [("setting", "setting"), ("method", "method"), ("steps", "steps"), ("params", "parameters"),
               ("lds_random", "LDS random [95 % CI]"), ("lds_recorded", "LDS recorded order [95 % CI]"),
               ("lds_small", f"LDS recorded order, {pct} out"),
               ("scale", f"removal scale (R²): {pct} / half out"),
               ("wall_s", "wall s"), ("peak_mb", "peak MB above start"), ("note", "note")]
    half, orders = REPLAY["replay-half"]["at"], REPLAY["replay-half-8-orders"]["orders"]
    notes = [
        "replay: the exact derivative dm/dw_i of the recorded run at w = 1 (reverse mode through every "
        "optimizer step, states recomputed from the checkpoints, memory growing with the square root of a "
        "segment's steps; the queries share one vmapped reverse pass). replay-half (`at="
        f"{half:g}`): the same derivative in the run with every example at weight {half:g} (same order and "
        "initialisation), the centre of the random halves; a midpoint-rule average of the derivative along "
        f"the path w = 1 → 0. replay-half-8-orders (`at={half:g}, orders={orders}`): that derivative "
        f"averaged over the recorded order and {orders - 1} re-shuffles of it (each replayed from the "
        "start), which sees the data-order part of the seed noise of retraining. tracin-dda / ekfac-dda: "
        "`dda=True, dda_reference=256` over the checkpoints of the last stage from its start (for two-stage, "
        "the pre-trained model is the base; columns normalised over 256 training examples).",
        "Ground truths. random: other seeds change the data order and the initialisation; that noise is part "
        "of what is predicted and no single-run attribution sees it. recorded order: exactly the "
        "perturbations w_i: 1 → 0 that replay differentiates.",
        *findings(rows),
        "Removal scale: the slope of the recorded-order retraining's measurements on the summed scores of "
        f"the kept examples (`evaluate.calibrate`, R² in brackets), {pct} or half of the data out: a unit "
        "slope means the scores are effect sizes, as `Scores.removal_effect` assumes for scores that carry a "
        "removal scale; other methods' scores rank but need that fitted scale.",
        "Wall time and memory: each method in a fresh process on one thread, from model loaded to scores "
        "returned; memory is the process's peak resident set above its level before the call. The cost rows "
        "time replay alone on the recorded run of an MLP of that width (its queries in one reverse pass).",
        "Recorder overhead: each checkpoint is one durable write (safetensors, fsync, the step ids as JSON) "
        f"and each step some bookkeeping, about {_per_checkpoint_ms(overhead):.1f} ms per checkpoint in all "
        "on this machine, a fixed cost: "
        f"{overhead_lm['min_overhead_pct']:+.1f} % of the {overhead_lm['min_train_s']:.2f} s LM fine-tuning "
        f"run, {overhead_wide['min_overhead_pct']:+.0f} % of the {overhead_wide['min_train_s']:.2f} s run of "
        f"the wider MLP, {overhead['min_overhead_pct']:+.0f} % of the {overhead['min_train_s']:.2f} s digits "
        f"run, whose checkpoints are only {1e3 * overhead['min_train_s'] / N_CHECKPOINTS:.0f} ms of training "
        "apart. The fraction falls as the training between checkpoints grows.",
    ]
    measurements = {"recorder_overhead": o}
    return write_results(Path(path).parent, "replay", "replay", rows, info, columns, notes,
                         section="split", headings=HEADINGS, extra=measurements)


def _overheads_from_info(info: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The recorder overheads of a replay.json written before they were kept as numbers, read back from the
    info lines that printed them."""
    import re

    pattern = re.compile(r"fastest: wall ([\d.]+) s recorded vs ([\d.]+) s plain \(([+-][\d.]+) %\)")
    out = {}
    for key, text in info.items():
        match = pattern.search(str(text)) if key.startswith("recorder overhead") else None
        if match:
            name = "facts_lm" if "facts-lm" in key else "digits_hidden_1024" if "1024" in key else "digits"
            recorded, plain, percent = (float(g) for g in match.groups())
            out[name] = {"min_recorded_s": recorded, "min_train_s": plain, "min_overhead_pct": percent}
    return out



def describe(s: ReplaySetting) -> str:
    """A setting's training recipe, written from its fields."""
    def opt(lr: float) -> str:
        name = "AdamW" if s.optimizer == "adamw" else "SGD"
        return f"{name}{f' with momentum {s.momentum:g}' if s.momentum else ''} at lr {lr:g}"

    decay = f"{'decoupled ' if s.optimizer == 'adamw' else ''}weight decay {s.weight_decay:g}"
    if s.pretrain_epochs:
        return (f"{s.pretrain_epochs} epochs on digits 0-{s.pretrain_classes - 1} ({opt(s.lr)}), then "
                f"{s.epochs} epochs on all with a new {opt(s.finetune_lr)}; {decay}")
    return f"{s.epochs} epochs of {opt(s.lr)}; {decay}"


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """What the LDS and removal-scale columns show, written from the rows (no figure typed by hand)."""
    out = []
    for split in dict.fromkeys(r["split"] for r in rows if "lds_random_mean" in r):
        out += _findings([r for r in rows if "lds_random_mean" in r and r["split"] == split], split)
    return out


def _findings(scored: list[dict[str, Any]], split: str) -> list[str]:
    settings = list(dict.fromkeys(r["setting"] for r in scored))
    optimizer = {v: VARIANTS[v].get("optimizer", "sgd") if v in VARIANTS else "sgd" for v in settings}
    pct = f"{100 * SMALL_OUT:g} %"
    out = []
    for key, what in (("lds_random_mean", "retraining on random halves with new seeds"),
                      ("lds_recorded_mean", "the recorded run with half of the data weighted 0"),
                      ("lds_small_mean", f"the recorded run with {pct} of the data weighted 0")):
        best = [max((r for r in scored if r["setting"] == v), key=lambda r: r[key]) for v in settings]
        out.append(f"{split.capitalize()} split, best at predicting {what}: " + "; ".join(
            f"{r['setting']}: {r['method']} ({r[key]:.3f})" for r in best) + ".")
    for method in REPLAY:
        mine = [r for r in scored if r["method"] == method]
        parts = []
        for opt in ("sgd", "adamw"):
            sel = [r for r in mine if optimizer[r["setting"]] == opt]
            if not sel:
                continue
            small = [r["lds_small_mean"] for r in sel]
            scale_s = [r["scale_small"] for r in sel]
            scale_h = [r["scale_half"] for r in sel]
            parts.append(f"under {opt.upper() if opt == 'sgd' else 'AdamW'} ({len(sel)} setting"
                         f"{'s' if len(sel) > 1 else ''}): LDS with "
                         f"{pct} out {_span(small, '.3f')}, removal scale {_span(scale_s, '.3g')} with {pct} "
                         f"out (R² ≥ {min(r['r2_small'] for r in sel):.2f}) and {_span(scale_h, '.3g')} with "
                         f"half out (R² ≥ {min(r['r2_half'] for r in sel):.2f})")
        if parts:
            out.append(f"{split.capitalize()} split, {method}: " + "; ".join(parts) + ".")
    return out


def _span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}–{hi:{fmt}}"


def _per_checkpoint_ms(o: dict[str, float]) -> float:
    return 1000 * (o["min_recorded_s"] - o["min_train_s"]) / (N_CHECKPOINTS + 1)


def _overhead_text(o: dict[str, float]) -> str:
    return (f"{int(o['parameters']):,} parameters, {int(o['steps'])} steps, {N_CHECKPOINTS} checkpoints + "
            "the start: "
            f"fastest: wall {o['min_recorded_s']:.3f} s recorded vs {o['min_train_s']:.3f} s plain "
            f"({o['min_overhead_pct']:+.1f} %), CPU {o['min_cpu_overhead_pct']:+.1f} %; median: wall "
            f"{o['median_overhead_pct']:+.1f} %, CPU {o['median_cpu_overhead_pct']:+.1f} % (one thread, "
            f"{int(o['repeats'])} interleaved repeats)")


def _registered(method: str) -> str:
    return "replay" if method in REPLAY else method.removesuffix("-dda").removesuffix("-sgd")


def _module(method: str) -> str:
    modules = {"replay": "replay", "grad-dot": "gradient", "tracin": "gradient", "source": "source"}
    return modules.get(_registered(method), "influence")

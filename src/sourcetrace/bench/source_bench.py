"""`source` benchmark: SOURCE against EK-FAC and TracIn where influence functions' assumptions fail.

digits-mlp variants (Bae et al. 2024 §5 study the first two failure modes), each trained by
`ReplaySetting.run` and recorded with `TrajectoryRecorder` (6 checkpoints), SOURCE's options read from the
recording as a user would (`Trajectory.checkpoint_options("source")`):
- non-converged: 3 epochs of SGD; non-converged-10: 10 epochs; momentum: SGD with momentum 0.9;
- two-stage: pre-training on the images of classes 0-4, then fine-tuning on all classes with a new
  optimizer; the ground truth re-runs the whole two-stage recipe on each subset;
- adamw: 3 epochs of AdamW (SOURCE's Adam variant, and the SGD formula on the same run for contrast).
LDS against `retrain_subsets` (random halves x seeds), every method on the same trained model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .replay_bench import ReplaySetting
from .runner import versions, write_results

VARIANTS: dict[str, dict[str, Any]] = {
    "non-converged": {"epochs": 3},  # 85 % train accuracy, mean query margin −1.5
    "non-converged-10": {"epochs": 10},  # 91 %, margin 0.66: further along
    "momentum": {"epochs": 3, "momentum": 0.9, "lr": 0.01},  # effective lr 0.1
    "two-stage": {"pretrain_epochs": 10, "epochs": 3},
    "adamw": {"epochs": 3, "optimizer": "adamw", "lr": 0.003},
}
RECIPES = {"non-converged": "3 epochs of SGD", "non-converged-10": "10 epochs of SGD",
           "momentum": "3 epochs of SGD with momentum 0.9 at lr 0.01",
           "two-stage": "10 epochs on classes 0-4 (lr 0.1), then 3 epochs on all with a new SGD (lr 0.05)",
           "adamw": "3 epochs of AdamW at lr 0.003 (weight decay 1e-3, decoupled)"}


def setting(name: str) -> ReplaySetting:
    return ReplaySetting(variant=f"source-{name}", **VARIANTS[name])


def _methods(source: dict[str, Any], tracin: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    last = {k: source[k][-1:] for k in ("checkpoints", "learning_rates", "steps", "preconditioners")
            if source.get(k) is not None}
    last.update({k: source[k] for k in ("momentum", "weight_decay", "decoupled_weight_decay") if k in source})
    out = [("source (L=3, every checkpoint)", "source", {**source, "segments": 3}),
           ("source (L=2)", "source", {**source, "segments": 2}),
           ("source (L=1, final checkpoint only)", "source", {**last, "segments": 1})]
    if "preconditioners" in source:
        sgd = {k: v for k, v in source.items() if k not in ("preconditioners", "decoupled_weight_decay")}
        out.append(("source, SGD formula (L=3)", "source", {**sgd, "segments": 3}))
    out.append(("ekfac (defaults, final model)", "ekfac", {}))
    return [*out, ("tracin (every checkpoint)", "tracin", tracin)]


def run(out_dir: Path = Path("benchmarks"), workdir: Path = Path("runs/bench/source"), *,
        n_subsets: int = 50, seeds: tuple[int, ...] = (0, 1), variants: tuple[str, ...] = tuple(VARIANTS),
        progress: bool = True) -> Path:
    """LDS and time of SOURCE, EK-FAC and TracIn on each variant; writes `source.md` and `source.json`."""
    import sourcetrace as st

    from .. import evaluate
    from ..ensembles import retrain_subsets
    from ..trajectory import Trajectory

    torch.set_num_threads(1)  # tiny models: one thread is much faster on a shared machine
    rows: list[dict[str, Any]] = []
    steps: dict[str, list[int]] = {}
    for name in variants:
        s = setting(name)
        folder = Path(workdir) / name / "trajectory"
        model = s.run(recorder_dir=folder)
        traj = Trajectory.load(folder)
        steps[name] = [c for c in traj.checkpoints if c > 0]
        start = time.perf_counter()
        truth = retrain_subsets(s.train_fn, s.measure_fn, s.n_train, n_subsets=n_subsets, fraction=0.5,
                                seeds=seeds, workdir=Path(workdir) / name / "ground-truth",
                                fingerprint=s.fingerprint(), progress=progress)
        truth_s = time.perf_counter() - start
        ids = list(range(s.n_train))
        for label, method, options in _methods(traj.checkpoint_options("source", train_ids=ids),
                                               traj.checkpoint_options("tracin")):
            start = time.perf_counter()
            attr = st.Attributor(model, st.ClassificationTask(), method, progress=False, **options)
            scores = attr.fit(s.train).score(s.queries)
            wall = time.perf_counter() - start
            score = evaluate.lds(scores, truth)
            rows.append({"variant": name, "method": label, "lds": score.mean, "ci_low": score.ci_low,
                         "ci_high": score.ci_high, "lds_ci": str(score), "wall_s": wall,
                         "ground_truth_s": truth_s})
            if progress:
                print(f"{name:>16} {label:<40} LDS {score}  {wall:6.2f} s", flush=True)
    info = {"data": "sklearn digits, 1000 train / 100 queries (fixed split), query margin",
            "model": "MLP 64-128-10, lr 0.1 unless said, weight decay 1e-3, batch 64",
            **{n: f"{RECIPES[n]}; checkpoints after steps {steps[n]}" for n in variants},
            "ground truth": f"{n_subsets} random halves x {len(seeds)} seeds (the whole recipe re-run), "
                            "LDS = mean Spearman over queries (95 % bootstrap CI)",
            "versions": versions("sourcetrace", "torch")}
    columns = [("variant", "variant"), ("method", "method"), ("lds_ci", "LDS [95 % CI]"),
               ("wall_s", "fit + score s")]
    notes = ["All methods score the same model (seed 0, whole training set), in one process on one thread. "
             "Each run is recorded with `TrajectoryRecorder`; SOURCE's options (checkpoints, learning rates, "
             "step counts, momentum, weight decay, stages and their data, Adam's preconditioners "
             "1/(√v̂ + ε)) come from `Trajectory.checkpoint_options(\"source\")`, TracIn's from "
             "`checkpoint_options(\"tracin\")`. Written by `sourcetrace.bench.source_bench.run`."]
    title = "SOURCE on non-converged, momentum, two-stage and AdamW digits-mlp"
    return write_results(Path(out_dir), "source", title, rows, info, columns, notes)

"""`source` benchmark: SOURCE against EK-FAC and TracIn where influence functions' assumptions fail.

digits-mlp variants (Bae et al. 2024 §5 study the first two failure modes), each trained by
`ReplaySetting.run` and recorded with `TrajectoryRecorder` (6 checkpoints), SOURCE's options read from the
recording as a user would (`Trajectory.checkpoint_options("source")`):
- non-converged: 3 epochs of SGD; non-converged-10: 10 epochs; momentum: SGD with momentum 0.9;
- two-stage: pre-training on the images of classes 0-4, then fine-tuning on all classes with a new
  optimizer; the ground truth re-runs the whole two-stage recipe on each subset;
- adamw: 3 epochs of AdamW (SOURCE's Adam variant, and the SGD formula on the same run for contrast).
LDS against `retrain_subsets` (random halves x seeds), every method on the same trained model. Each variant
runs on digits-mlp's tuning split (where SOURCE's Adam cap and segment count were chosen) and on its
reporting split (other queries, training draw and seed; nothing was chosen there).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .digits import SEEDS
from .replay_bench import ReplaySetting, describe
from .runner import load_average, versions, write_results

VARIANTS: dict[str, dict[str, Any]] = {
    "non-converged": {"epochs": 3},  # 85 % train accuracy, mean query margin −1.5
    "non-converged-10": {"epochs": 10},  # 91 %, margin 0.66: further along
    "momentum": {"epochs": 3, "momentum": 0.9, "lr": 0.01},  # effective lr 0.1
    "two-stage": {"pretrain_epochs": 10, "epochs": 3},
    "adamw": {"epochs": 3, "optimizer": "adamw", "lr": 0.003},
}
HEADINGS = {"tuning": "Tuning split (SOURCE's Adam cap and segment count were chosen here)",
            "reporting": "Reporting split (other queries, training draw and seed; nothing was chosen here)"}


def setting(name: str, split: str = "tuning") -> ReplaySetting:
    return ReplaySetting(variant=f"source-{name}", split=split, seed=SEEDS[split], **VARIANTS[name])


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
        splits: tuple[str, ...] = ("tuning", "reporting"), progress: bool = True) -> Path:
    """LDS and time of SOURCE, EK-FAC and TracIn on each variant and split; writes `source.md` / `.json`."""
    import sourcetrace as st

    from .. import evaluate
    from ..ensembles import retrain_subsets
    from ..trajectory import Trajectory

    torch.set_num_threads(1)  # tiny models: one thread is much faster on a shared machine
    rows: list[dict[str, Any]] = []
    steps: dict[str, list[int]] = {}
    for split in splits:
        for name in variants:
            s = setting(name, split)
            folder = Path(workdir) / ("" if split == "tuning" else split) / name
            model = s.run(seed=s.seed, recorder_dir=folder / "trajectory")
            traj = Trajectory.load(folder / "trajectory")
            steps[name] = [c for c in traj.checkpoints if c > 0]
            start = time.perf_counter()
            truth = retrain_subsets(s.train_fn, s.measure_fn, s.n_train, n_subsets=n_subsets, fraction=0.5,
                                    seeds=seeds, workdir=folder / "ground-truth",
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
                rows.append({"split": split, "variant": name, "method": label, "lds": score.mean,
                             "ci_low": score.ci_low, "ci_high": score.ci_high, "lds_ci": str(score),
                             "wall_s": wall, "ground_truth_s": truth_s})
                if progress:
                    print(f"{split:>9} {name:>16} {label:<40} LDS {score}  {wall:6.2f} s", flush=True)
    base = setting(variants[0])
    info = {"data": f"sklearn digits, {base.n_train} train / {base.n_query} queries per split, query margin",
            "splits": "tuning = digits-mlp's tuning split, model seed 0; reporting = digits-mlp's reporting "
                      "split (queries the tuning split never used, another training draw), model seed "
                      f"{SEEDS['reporting']}",
            "model": f"MLP 64-{base.hidden}-10, batch {base.batch_size}",
            **{n: f"{describe(setting(n))}; checkpoints after steps {steps[n]}" for n in variants},
            "ground truth": f"{n_subsets} random halves x {len(seeds)} seeds (the whole recipe re-run), "
                            "LDS = mean Spearman over queries (95 % bootstrap CI)",
            "load average at the end of the run": f"{load_average()} (on a shared two-core machine)",
            "versions": versions("sourcetrace", "torch")}
    columns = [("variant", "variant"), ("method", "method"), ("lds_ci", "LDS [95 % CI]"),
               ("wall_s", "fit + score s")]
    notes = ["All methods score the same model (the split's seed, whole training set), in one process on one "
             "thread. Each run is recorded with `TrajectoryRecorder`; SOURCE's options (checkpoints, "
             "learning rates, step counts, momentum, weight decay, stages and their data, Adam's "
             "preconditioners 1/(√v̂ + ε)) come from `Trajectory.checkpoint_options(\"source\")`, TracIn's "
             "from `checkpoint_options(\"tracin\")`. Written by `sourcetrace.bench.source_bench.run`."]
    title = "SOURCE on non-converged, momentum, two-stage and AdamW digits-mlp"
    return write_results(Path(out_dir), "source", title, rows, info, columns, notes, section="split",
                         headings=HEADINGS, summary=summary(rows))


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per variant, the best method on each split and SOURCE's (L=3) lead over EK-FAC and TracIn."""
    lines = ["## Summary", ""]
    for split in dict.fromkeys(r["split"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["split"] == split):
            sel = {r["method"]: r["lds"] for r in rows if r["split"] == split and r["variant"] == variant}
            best = max(sel, key=lambda m: sel[m])
            src = sel.get("source (L=3, every checkpoint)")
            lead = "" if src is None else (
                f"; source (L=3) minus ekfac {src - sel['ekfac (defaults, final model)']:+.3f}, minus tracin "
                f"{src - sel['tracin (every checkpoint)']:+.3f}")
            lines.append(f"- {split}, {variant}: best {best} ({sel[best]:.3f}){lead}.")
    return lines

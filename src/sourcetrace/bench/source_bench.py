"""`source` benchmark: SOURCE against EK-FAC and TracIn where influence functions' assumptions fail.

Two digits-mlp variants (Bae et al. 2024 §5 study the same two failure modes):
- non-converged: 3 epochs of SGD, 6 checkpoints evenly spaced in steps;
- two-stage: pre-training on the images of classes 0-4, then fine-tuning on all classes, 3 checkpoints
  per stage. The ground truth re-runs the whole two-stage recipe on each subset.
LDS against `retrain_subsets` (random halves x seeds), every method on the same trained model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .digits import DigitsSetting
from .runner import versions, write_results

Run = tuple[nn.Module, list[dict[str, torch.Tensor]], list[float], list[int]]


def _sgd(setting: NonConvergedDigits, model: nn.Module, idx: torch.Tensor, epochs: int, n_checkpoints: int,
         gen: torch.Generator, done: int, out: Run) -> int:
    """`epochs` of minibatch SGD on training indices `idx`; `n_checkpoints` evenly spaced in steps."""
    x, y = setting.x_train[idx], setting.y_train[idx]
    opt = torch.optim.SGD(model.parameters(), lr=setting.lr, momentum=setting.momentum,
                          weight_decay=setting.weight_decay)
    per_epoch = -(-len(idx) // setting.batch_size)
    total = epochs * per_epoch
    due = {round((k + 1) * total / n_checkpoints) for k in range(n_checkpoints)}
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(idx), generator=gen)
        for start in range(0, len(idx), setting.batch_size):
            b = perm[start: start + setting.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
            step += 1
            if step in due:
                out[1].append({k: v.clone() for k, v in model.state_dict().items()})
                out[2].append(setting.lr)
                out[3].append(done + step)
    return done + step


@dataclass
class NonConvergedDigits(DigitsSetting):
    """digits-mlp stopped early: 3 epochs, 6 checkpoints (optionally with SGD momentum)."""

    epochs: int = 3
    n_checkpoints: int = 6
    momentum: float = 0.0

    def fingerprint(self) -> str:
        return f"non-converged-{super().fingerprint()}" + (f"-m{self.momentum}" if self.momentum else "")

    def run(self, indices: np.ndarray | None = None, seed: int = 0) -> Run:
        """Train on `indices` (default all): final model, checkpoints, lr and step count at each."""
        idx = torch.as_tensor(np.arange(self.n_train) if indices is None else np.asarray(indices))
        model = self.model(seed)
        out: Run = (model, [], [], [])
        _sgd(self, model, idx, self.epochs, self.n_checkpoints, torch.Generator().manual_seed(seed), 0, out)
        return out

    def fit(self, indices: np.ndarray | None = None, seed: int = 0
            ) -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[float]]:
        model, checkpoints, rates, _ = self.run(indices, seed)
        return model.eval(), checkpoints, rates

    def stage_examples(self) -> list[list[int] | None] | None:
        return None

    def stages(self) -> list[int] | None:
        return None


@dataclass
class TwoStageDigits(NonConvergedDigits):
    """Pre-training on classes < `split` for `pretrain_epochs`, then `epochs` of fine-tuning on all."""

    epochs: int = 3
    pretrain_epochs: int = 10
    split: int = 5
    n_checkpoints: int = 3  # per stage

    def fingerprint(self) -> str:
        return f"two-stage-{self.pretrain_epochs}-{self.split}-{super().fingerprint()}"

    def run(self, indices: np.ndarray | None = None, seed: int = 0) -> Run:
        idx = torch.as_tensor(np.arange(self.n_train) if indices is None else np.asarray(indices))
        first = idx[self.y_train[idx] < self.split]
        model = self.model(seed)
        gen = torch.Generator().manual_seed(seed)
        out: Run = (model, [], [], [])
        done = _sgd(self, model, first, self.pretrain_epochs, self.n_checkpoints, gen, 0, out)
        _sgd(self, model, idx, self.epochs, self.n_checkpoints, gen, done, out)
        return out

    def stage_examples(self) -> list[list[int] | None] | None:
        return [torch.nonzero(self.y_train < self.split).flatten().tolist(), None]

    def stages(self) -> list[int] | None:
        return [0] * self.n_checkpoints + [1] * self.n_checkpoints


VARIANTS: dict[str, Any] = {
    "non-converged": NonConvergedDigits,  # 3 epochs: 85 % train accuracy, mean query margin −1.5
    "non-converged-10": lambda: NonConvergedDigits(epochs=10),  # 91 %, margin 0.66: further along
    "momentum": lambda: NonConvergedDigits(momentum=0.9, lr=0.01),  # 3 epochs, effective lr 0.1
    "two-stage": TwoStageDigits,
}


def _methods(setting: NonConvergedDigits, run: Run) -> list[tuple[str, str, dict[str, Any]]]:
    _, checkpoints, rates, steps = run
    traj = {"checkpoints": checkpoints, "learning_rates": rates}
    src = {**traj, "steps": steps, "weight_decay": setting.weight_decay, "momentum": setting.momentum,
           "stages": setting.stages(),
           "stage_examples": setting.stage_examples()}
    last = {"checkpoints": checkpoints[-1:], "learning_rates": rates[-1:], "steps": steps[-1:],
            "weight_decay": setting.weight_decay, "momentum": setting.momentum}
    return [
        ("source (L=3, 6 checkpoints)", "source", {**src, "segments": 3}),
        ("source (L=2)", "source", {**src, "segments": 2}),
        ("source (L=1, final checkpoint only)", "source", {**last, "segments": 1}),
        ("ekfac (defaults, final model)", "ekfac", {}),
        ("tracin (6 checkpoints)", "tracin", traj),
    ]


def run(out_dir: Path = Path("benchmarks"), workdir: Path = Path("runs/bench/source"), *,
        n_subsets: int = 50, seeds: tuple[int, ...] = (0, 1), variants: tuple[str, ...] = tuple(VARIANTS),
        progress: bool = True) -> Path:
    """LDS and time of SOURCE, EK-FAC and TracIn on each variant; writes `source.md` and `source.json`."""
    import sourcetrace as st

    from .. import evaluate
    from ..ensembles import retrain_subsets

    torch.set_num_threads(1)  # tiny models: one thread is much faster on a shared machine
    rows: list[dict[str, Any]] = []
    for name in variants:
        setting = VARIANTS[name]()
        trained = setting.run()
        model = trained[0].eval()
        start = time.perf_counter()
        truth = retrain_subsets(setting.train_fn, setting.measure_fn, setting.n_train, n_subsets=n_subsets,
                                fraction=0.5, seeds=seeds, workdir=Path(workdir) / name / "ground-truth",
                                fingerprint=setting.fingerprint(), progress=progress)
        truth_s = time.perf_counter() - start
        for label, method, options in _methods(setting, trained):
            start = time.perf_counter()
            attr = st.Attributor(model, st.ClassificationTask(), method, progress=False, **options)
            scores = attr.fit(setting.train).score(setting.queries)
            wall = time.perf_counter() - start
            score = evaluate.lds(scores, truth)
            rows.append({"variant": name, "method": label, "lds": score.mean, "ci_low": score.ci_low,
                         "ci_high": score.ci_high, "lds_ci": str(score), "wall_s": wall,
                         "ground_truth_s": truth_s})
            if progress:
                print(f"{name:>14} {label:<40} LDS {score}  {wall:6.2f} s", flush=True)
    recipes = {"non-converged": "3 epochs", "non-converged-10": "10 epochs",
               "momentum": "3 epochs of SGD with momentum 0.9 at lr 0.01",
               "two-stage": "10 epochs on classes 0-4, then 3 epochs on all"}
    info = {"data": "sklearn digits, 1000 train / 100 queries (fixed split), query margin",
            "model": "MLP 64-128-10, SGD lr 0.1 (no momentum unless said), weight decay 1e-3, batch 64",
            **{n: f"{recipes[n]}; checkpoints at steps {VARIANTS[n]().run()[3]}" for n in variants},
            "ground truth": f"{n_subsets} random halves x {len(seeds)} seeds (the whole recipe re-run), "
                            "LDS = mean Spearman over queries (95 % bootstrap CI)",
            "versions": versions("sourcetrace", "torch")}
    columns = [("variant", "variant"), ("method", "method"), ("lds_ci", "LDS [95 % CI]"),
               ("wall_s", "fit + score s")]
    notes = ["All methods score the same model (seed 0, whole training set), in one process on one thread; "
             "SOURCE gets the checkpoints, learning rates, step counts, weight decay, momentum and "
             "(two-stage) the stage data. Written by `sourcetrace.bench.source_bench.run`."]
    title = "SOURCE on non-converged, momentum and two-stage digits-mlp"
    return write_results(Path(out_dir), "source", title, rows, info, columns, notes)

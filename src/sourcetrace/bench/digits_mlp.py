"""`sourcetrace bench digits-mlp`: LDS, time and memory of each method, anchors beside, same model."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from .digits import DigitsSetting
from .runner import measure, versions, write_results


def _ours(method: str, workdir: str, options: dict[str, Any]) -> np.ndarray:
    import sourcetrace as st

    setting = DigitsSetting()
    model, checkpoints, rates = setting.trained(Path(workdir))
    if method == "tracin":
        options = {"checkpoints": checkpoints, "learning_rates": rates, **options}
    if method == "trak":
        options = {"checkpoints": checkpoints, **options}
    attr = st.Attributor(model, st.ClassificationTask(), method, workdir=None, progress=False, **options)
    matrix = attr.fit(setting.train).score(setting.queries).matrix
    assert matrix is not None
    return matrix.numpy()


def _anchor(name: str, workdir: str, options: dict[str, Any]) -> np.ndarray:
    from . import anchors

    setting = DigitsSetting()
    model, checkpoints, rates = setting.trained(Path(workdir))
    if name == "kronfluence":
        return anchors.kronfluence_scores(model, setting.train, setting.queries, **options)
    if name == "captum":
        return anchors.captum_tracincp_scores(model, setting.train, setting.queries, checkpoints=checkpoints,
                                              learning_rates=rates, **options)
    if name == "dattri":
        return anchors.dattri_scores(model, setting.train, setting.queries, **options)
    if name == "traker":
        return anchors.traker_scores(model, setting.train, setting.queries, checkpoints=checkpoints,
                                     **options)
    raise ValueError(name)


# (label, library, runner, method or anchor, options)
ENTRIES: list[tuple[str, str, Any, str, dict[str, Any]]] = [
    ("grad-dot", "sourcetrace", _ours, "grad-dot", {}),
    ("identity (= grad-dot)", "kronfluence", _anchor, "kronfluence", {"strategy": "identity"}),
    ("tracin (5 checkpoints)", "sourcetrace", _ours, "tracin", {}),
    ("TracInCP (5 checkpoints)", "captum", _anchor, "captum", {}),
    ("grad-cos", "sourcetrace", _ours, "grad-cos", {}),
    ("trak (5 checkpoints, proj 2048, defaults)", "sourcetrace", _ours, "trak", {"proj_dim": 2048}),
    *[(f"TRAK (5 checkpoints, proj 2048, λ={lam})", "traker", _anchor, "traker",
       {"proj_dim": 2048, "lambda_reg": float(lam)}) for lam in (0, 1, 10, 100)],
    ("trak (5 checkpoints, proj 512, defaults)", "sourcetrace", _ours, "trak", {"proj_dim": 512}),
    *[(f"TRAK (5 checkpoints, proj 512, λ={lam})", "traker", _anchor, "traker",
       {"proj_dim": 512, "lambda_reg": float(lam)}) for lam in (0, 1, 10, 100)],
    ("cg (defaults)", "sourcetrace", _ours, "cg", {}),
    ("cg (defaults, λ=0)", "dattri", _anchor, "dattri", {"method": "cg"}),
    ("cg (λ=1e-2)", "dattri", _anchor, "dattri", {"method": "cg", "regularization": 1e-2}),
    ("arnoldi (rank 100, defaults)", "sourcetrace", _ours, "arnoldi", {}),
    ("arnoldi (defaults)", "dattri", _anchor, "dattri", {"method": "arnoldi"}),
    ("lissa (defaults)", "sourcetrace", _ours, "lissa", {}),
    ("explicit (GGN, defaults)", "sourcetrace", _ours, "explicit", {}),
    ("logra (rank 32, defaults)", "sourcetrace", _ours, "logra", {}),
    ("datainf (defaults)", "sourcetrace", _ours, "datainf", {}),
    ("ekfac (defaults)", "sourcetrace", _ours, "ekfac", {}),
    ("ekfac (damping heuristic)", "kronfluence", _anchor, "kronfluence",
     {"strategy": "ekfac", "damping_factor": None}),
    ("ekfac (default damping 1e-8)", "kronfluence", _anchor, "kronfluence", {"strategy": "ekfac"}),
    ("kfac (defaults)", "sourcetrace", _ours, "kfac", {}),
    ("kfac (damping heuristic)", "kronfluence", _anchor, "kronfluence",
     {"strategy": "kfac", "damping_factor": None}),
    ("diagonal (defaults)", "sourcetrace", _ours, "diagonal", {}),
    ("diagonal (damping heuristic)", "kronfluence", _anchor, "kronfluence",
     {"strategy": "diagonal", "damping_factor": None}),
]


# minutes each on two cores: run only when asked for by name (`--only lissa`)
ON_REQUEST = {"lissa", "explicit"}
ANCHOR_IMPORTS = {"kronfluence": "kronfluence", "captum": "captum.influence", "traker": "trak",
                  "dattri": "dattri"}


def run(out_dir: Path = Path("benchmarks"), workdir: Path = Path("runs/bench/digits-mlp"), *,
        n_subsets: int = 100, seeds: tuple[int, ...] = (0, 1, 2), only: list[str] | None = None,
        progress: bool = True) -> Path:
    from .. import evaluate
    from ..ensembles import retrain_subsets
    from .anchors import available_anchors

    setting = DigitsSetting()
    workdir.mkdir(parents=True, exist_ok=True)
    setting.trained(workdir)  # trained once here, loaded by every child process
    truth = retrain_subsets(setting.train_fn, setting.measure_fn, setting.n_train, n_subsets=n_subsets,
                            fraction=0.5, seeds=seeds, workdir=workdir / "ground-truth",
                            fingerprint=setting.fingerprint(), progress=progress)
    have = available_anchors()
    rows: list[dict[str, Any]] = []
    for label, library, runner, what, options in ENTRIES:
        name = label.split()[0]
        wanted = not only or name in only or library in only
        if not wanted or (name in ON_REQUEST and name not in (only or ())):
            continue
        if library != "sourcetrace" and not have.get(library):
            rows.append({"method": label, "library": library, "note": "not installed"})
            continue
        modules = ("sklearn.datasets", ANCHOR_IMPORTS.get(library, "sourcetrace.methods.gradient"))
        try:
            result = measure(functools.partial(runner, what, str(workdir), options), modules)
            score = evaluate.lds(result.scores, truth)
        except Exception as exc:  # an anchor that fails (NaN scores, out of memory) is a result too
            why = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
            rows.append({"method": label, "library": library, "note": f"failed: {why}"})
            if progress:
                print(f"{library:>12} {label:<40} failed: {exc}")
            continue
        ci = f"{score.mean:.3f} [{score.ci_low:.3f}, {score.ci_high:.3f}]"
        rows.append({"method": label, "library": library, "lds": score.mean, "ci_low": score.ci_low,
                     "ci_high": score.ci_high, "lds_ci": ci, "wall_s": result.wall_s,
                     "peak_mb": result.peak_mb})
        if progress:
            print(f"{library:>12} {label:<40} LDS {rows[-1]['lds_ci']}  {result.wall_s:6.2f} s  "
                  f"{result.peak_mb:7.1f} MB")
    info = {"data": f"sklearn digits, {setting.n_train} train / {setting.n_query} queries (fixed split)",
            "model": f"MLP 64-{setting.hidden}-10, SGD lr {setting.lr}, {setting.epochs} epochs, batch "
                     f"{setting.batch_size}",
            "measurement": "query margin",
            "ground truth": f"{n_subsets} random halves x {len(seeds)} seeds, LDS = mean Spearman over "
                            "queries (95 % bootstrap CI)",
            "versions": versions("sourcetrace", "torch", "kronfluence", "captum", "traker", "dattri")}
    columns = [("method", "method"), ("library", "library"), ("lds_ci", "LDS [95 % CI]"),
               ("wall_s", "wall s"), ("peak_mb", "peak MB above start"), ("note", "note")]
    notes = ["Wall time and memory: each method in a fresh process on one thread, from model loaded to "
             "scores returned (imports excluded); memory is the process's peak resident set above its level "
             "before the call."]
    return write_results(out_dir, "digits-mlp", "digits-mlp", rows, info, columns, notes)

"""`sourcetrace bench digits-mlp`: LDS, time and memory of each method, anchors beside, same model.

Run on two splits of `bench/digits.py`: the tuning split, where sourcetrace's damping defaults were chosen,
and the reporting split (other queries, training draw and seed), where they are graded. The anchors run
at their own defaults and again at sourcetrace's damping rule, and sourcetrace at kronfluence's, so the
gap between libraries splits into what the default rule gives and what remains.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, cast

import numpy as np

from .digits import SEEDS, DigitsSetting
from .runner import load_average, measure, versions, write_results


def defaults_chosen() -> list[str]:
    """Each damping default of sourcetrace, read from the code, and where it was chosen: every one by
    comparing LDS on this benchmark's tuning split (its sweep is in the docstring of the file named)."""
    import inspect

    from ..curvature.damping import DEFAULT_FACTOR
    from ..curvature.iterative import Arnoldi
    from ..curvature.kfac import DAMPING_FACTOR
    from ..methods import REGISTRY, available_methods
    from ..methods.trak import DEFAULT_DAMPING_FACTOR

    available_methods()  # the registry fills itself on first use
    logra = REGISTRY["logra"].defaults
    rank = inspect.signature(Arnoldi.__init__).parameters["rank"].default
    return [f"curvature/damping.py: λ = {DEFAULT_FACTOR:g} × the mean eigenvalue of the GGN (explicit, cg, "
            "lissa, arnoldi)",
            "curvature/kfac.py: λ = " + ", ".join(f"{v:g} × each block's mean eigenvalue ({k})"
                                                 for k, v in DAMPING_FACTOR.items()),
            f"methods/trak.py: λ = {DEFAULT_DAMPING_FACTOR:g} · tr(ΦᵀRΦ)/n",
            f"methods/logra.py: λ = {logra['damping_factor']:g} · tr(F)/n, rank {logra['rank']}",
            f"curvature/iterative.py: Arnoldi rank {rank}"]


def _ours(split: str, method: str, workdir: str, options: dict[str, Any]) -> np.ndarray:
    import sourcetrace as st

    setting = DigitsSetting(split=split, seed=SEEDS[split])
    model, checkpoints, rates = setting.trained(Path(workdir))
    if method == "tracin":
        options = {"checkpoints": checkpoints, "learning_rates": rates, **options}
    if method == "trak":
        options = {"checkpoints": checkpoints, **options}
    attr = st.Attributor(model, st.ClassificationTask(), method, workdir=None, progress=False, **options)
    matrix = attr.fit(setting.train).score(setting.queries).matrix
    assert matrix is not None
    return matrix.numpy()


def _resolved_damping(split: str, method: str, workdir: str) -> np.ndarray:
    """The λ sourcetrace resolves for `method` (cg, arnoldi) with its defaults, as a one-element array."""
    import sourcetrace as st

    setting = DigitsSetting(split=split, seed=SEEDS[split])
    model, _, _ = setting.trained(Path(workdir))
    attr = st.Attributor(model, st.ClassificationTask(), method, workdir=None, progress=False)
    attr.fit(setting.train)
    return np.array([cast(Any, attr.method).preconditioners[0].lam])


def _anchor(split: str, name: str, workdir: str, options: dict[str, Any]) -> np.ndarray:
    from . import anchors

    setting = DigitsSetting(split=split, seed=SEEDS[split])
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


OURS_RULE = "sourcetrace's rule"
#: an option value replaced, at run time, by the λ sourcetrace resolves for that method
RESOLVE = {"cg": "resolve:cg"}


def _entries() -> list[tuple[str, str, Any, str, dict[str, Any]]]:
    """(label, library, runner, method or anchor, options) of every row."""
    from ..curvature.kfac import DAMPING_FACTOR
    from ..methods.trak import DEFAULT_DAMPING_FACTOR

    kf_rule = {"strategy": "ekfac", "damping_factor": None}
    return [
        ("grad-dot", "sourcetrace", _ours, "grad-dot", {}),
        ("tracin (5 checkpoints)", "sourcetrace", _ours, "tracin", {}),
        ("grad-cos", "sourcetrace", _ours, "grad-cos", {}),
        *[row for k in (2048, 512) for row in (
            (f"trak (5 checkpoints, proj {k}, defaults)", "sourcetrace", _ours, "trak", {"proj_dim": k}),
            (f"TRAK (5 checkpoints, proj {k}, λ=0)", "traker", _anchor, "traker",
             {"proj_dim": k, "lambda_reg": 0.0}),
            (f"TRAK (5 checkpoints, proj {k}, {OURS_RULE}: λ = {DEFAULT_DAMPING_FACTOR:g} · tr(ΦᵀΦ)/n)",
             "traker", _anchor, "traker", {"proj_dim": k, "damping_factor": DEFAULT_DAMPING_FACTOR}))],
        (f"trak (5 checkpoints, proj 2048, unweighted ΦᵀΦ as traker, λ = {DEFAULT_DAMPING_FACTOR:g} · "
         "tr(ΦᵀΦ)/n)", "sourcetrace", _ours, "trak", {"proj_dim": 2048, "curvature": "covariance"}),
        ("cg (defaults)", "sourcetrace", _ours, "cg", {}),
        ("cg (defaults, λ=0)", "dattri", _anchor, "dattri", {"method": "cg"}),
        (f"cg ({OURS_RULE}: λ = sourcetrace's resolved λ)", "dattri", _anchor, "dattri",
         {"method": "cg", "regularization": RESOLVE["cg"]}),
        ("arnoldi (rank 100, defaults)", "sourcetrace", _ours, "arnoldi", {}),
        ("lissa (defaults)", "sourcetrace", _ours, "lissa", {}),
        ("explicit (GGN, defaults)", "sourcetrace", _ours, "explicit", {}),
        ("logra (rank 32, defaults)", "sourcetrace", _ours, "logra", {}),
        ("datainf (defaults)", "sourcetrace", _ours, "datainf", {}),
        *[row for strategy in ("ekfac", "kfac", "diagonal") for row in (
            (f"{strategy} (defaults)", "sourcetrace", _ours, strategy, {}),
            (f"{strategy} (kronfluence's rule: 0.1 × mean eigenvalue)", "sourcetrace", _ours, strategy,
             {"curvature_options": {"damping_factor": 0.1}}),
            (f"{strategy} (damping heuristic: 0.1 × mean eigenvalue)", "kronfluence", _anchor, "kronfluence",
             {**kf_rule, "strategy": strategy}),
            (f"{strategy} ({OURS_RULE}: {DAMPING_FACTOR[strategy]:g} × mean eigenvalue)", "kronfluence",
             _anchor, "kronfluence",
             {**kf_rule, "strategy": strategy, "heuristic_scale": DAMPING_FACTOR[strategy]}))],
        ("ekfac (default damping 1e-8)", "kronfluence", _anchor, "kronfluence", {"strategy": "ekfac"}),
    ]


def _priority(entry: tuple[str, str, Any, str, dict[str, Any]]) -> int:
    """Run order on a busy machine: sourcetrace's defaults, the EK-FAC and TRAK anchors, then the rest."""
    label, library = entry[0], entry[1]
    if library == "sourcetrace" and ("defaults" in label or "(" not in label or label.startswith("tracin")):
        return 0
    if label.startswith("ekfac") or "proj 2048" in label:
        return 1
    return 2 if label.startswith(("kfac", "diagonal")) else 3


def _pairs() -> list[tuple[str, str, str, str]]:
    """(what is compared, sourcetrace's row, the anchor at its own default, the anchor at sourcetrace's
    rule): labels of `_entries`."""
    rows = _entries()
    at_rule = {(r[2], r[4].get("strategy") or r[4].get("method") or r[4].get("proj_dim")): r[0] for r in rows
               if OURS_RULE in r[0]}
    names = {"ekfac": "EK-FAC", "kfac": "K-FAC", "diagonal": "diagonal"}
    out = [(f"{names[s]} vs kronfluence", f"{s} (defaults)",
            f"{s} (damping heuristic: 0.1 × mean eigenvalue)", at_rule[(_anchor, s)])
           for s in ("ekfac", "kfac", "diagonal")]
    out += [(f"TRAK proj {k} vs traker", f"trak (5 checkpoints, proj {k}, defaults)",
             f"TRAK (5 checkpoints, proj {k}, λ=0)", at_rule[(_anchor, k)]) for k in (2048, 512)]
    out += [("CG vs dattri", "cg (defaults)", "cg (defaults, λ=0)", at_rule[(_anchor, "cg")])]
    return out


# minutes each on two cores: run only when asked for by name (`--only lissa`)
ON_REQUEST = {"lissa", "explicit"}
ANCHOR_IMPORTS = {"kronfluence": "kronfluence", "captum": "captum.influence", "traker": "trak",
                  "dattri": "dattri"}
SPLITS = ("tuning", "reporting")
ROW_VERSION = 1  # bump when a row's computation changes outside sourcetrace's library code
HEADINGS = {"tuning": "Tuning split (sourcetrace's defaults were chosen here)",
            "reporting": "Reporting split (other queries, training draw and seed; nothing was chosen here)"}


def run(out_dir: Path = Path("benchmarks"), workdir: Path = Path("runs/bench/digits-mlp"), *,
        n_subsets: int = 100, seeds: tuple[int, ...] = (0, 1, 2), only: list[str] | None = None,
        splits: tuple[str, ...] = SPLITS, cached_only: bool = False, progress: bool = True) -> Path:
    """Score every row of each split (cached per row, so a run resumes) and write digits-mlp.md / .json;
    `cached_only`: write what earlier runs cached, marking the other rows as not run."""
    from .. import evaluate
    from ..artifacts import atomic_write_json
    from ..ensembles import retrain_subsets
    from .anchors import available_anchors
    from .runner import code_fingerprint

    have = available_anchors()
    load, code = load_average(), code_fingerprint()
    rows: list[dict[str, Any]] = []
    for split in splits:
        setting = DigitsSetting(split=split, seed=SEEDS[split])
        folder = workdir if split == "tuning" else workdir / split  # tuning: where replay looks for its truth
        folder.mkdir(parents=True, exist_ok=True)
        setting.trained(folder)  # trained once here, loaded by every child process
        truth = retrain_subsets(setting.train_fn, setting.measure_fn, setting.n_train, n_subsets=n_subsets,
                                fraction=0.5, seeds=seeds, workdir=folder / "ground-truth",
                                fingerprint=setting.fingerprint(), progress=progress)
        resolved: dict[str, float] = {}
        entries = _entries()
        done: dict[str, dict[str, Any]] = {}
        for label, library, runner, what, options in sorted(entries, key=_priority):  # most wanted first
            name = label.split()[0]
            wanted = not only or name in only or library in only
            if not wanted or (name in ON_REQUEST and name not in (only or ())):
                continue
            row: dict[str, Any] = {"split": split, "method": label, "library": library}
            if library != "sourcetrace" and not have.get(library):
                done[label] = {**row, "note": "not installed"}
                continue
            key = {"code": code, "rows": ROW_VERSION, "library": library, "options": repr(options),
                   "truth": [n_subsets, list(seeds)]}
            digest = hashlib.sha256(f"{library}|{label}".encode()).hexdigest()[:16]
            cache = folder / "rows" / f"{digest}.json"
            if cache.exists() and json.loads(cache.read_text())["key"] == key:  # a row of an interrupted run
                done[label] = json.loads(cache.read_text())["row"]
                continue
            if cached_only:
                done[label] = {**row, "note": "not run (CPU budget)"}
                continue
            modules = ("sklearn.datasets", ANCHOR_IMPORTS.get(library, "sourcetrace.methods.gradient"))
            try:
                for opt, value in options.items():
                    if isinstance(value, str) and value.startswith("resolve:"):
                        method = value.split(":")[1]
                        if method not in resolved:
                            job = functools.partial(_resolved_damping, split, method, str(folder))
                            resolved[method] = float(measure(job, modules[:1]).scores[0])
                        options = {**options, opt: resolved[method]}
                        row["note"] = f"λ = {resolved[method]:.3g}"
                result = measure(functools.partial(runner, split, what, str(folder), options), modules)
                score = evaluate.lds(result.scores, truth)
            except Exception as exc:  # an anchor that fails (NaN scores, out of memory) is a result too
                why = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
                row["note"] = f"failed: {why}"
                if progress:
                    print(f"{split:>9} {library:>12} {label:<40} failed: {exc}", flush=True)
            else:
                row.update({"lds": score.mean, "ci_low": score.ci_low, "ci_high": score.ci_high,
                            "lds_ci": str(score), "wall_s": result.wall_s, "peak_mb": result.peak_mb})
                if progress:
                    print(f"{split:>9} {library:>12} {label:<40} LDS {score}  {result.wall_s:6.2f} s  "
                          f"{result.peak_mb:7.1f} MB", flush=True)
            atomic_write_json(cache, {"key": key, "row": row})
            done[label] = row
        rows += [done[e[0]] for e in entries if e[0] in done]  # in the table's order
    tuning = DigitsSetting()
    info = {"data": f"sklearn digits, {tuning.n_train} train / {tuning.n_query} queries per split",
            "tuning split": f"the first {tuning.n_train} images of a fixed permutation to train, the next "
                            f"{tuning.n_query} as queries, model seed {SEEDS['tuning']}: every damping "
                            "default below was chosen here",
            "reporting split": f"{tuning.n_query} queries from the images the tuning split never used, "
                               f"{tuning.n_train} training images drawn from the rest, model seed "
                               f"{SEEDS['reporting']} (initialisation and data order): nothing was chosen "
                               "here",
            "defaults chosen on the tuning split (LDS against its ground truth)":
                "; ".join(defaults_chosen()),
            "model": f"MLP 64-{tuning.hidden}-10, SGD lr {tuning.lr}, {tuning.epochs} epochs, batch "
                     f"{tuning.batch_size}",
            "measurement": "query margin",
            "ground truth": f"{n_subsets} random halves x {len(seeds)} seeds per split, LDS = mean Spearman "
                            "over queries (95 % bootstrap CI)",
            "versions": versions("sourcetrace", "torch", "kronfluence", "captum", "traker", "dattri")}
    columns = [("method", "method"), ("library", "library"), ("lds_ci", "LDS [95 % CI]"),
               ("wall_s", "wall s"), ("peak_mb", "peak MB above start"), ("note", "note")]
    notes = ["Wall time and memory: each method in a fresh process on one thread, from model loaded to "
             "scores returned (imports excluded); memory is the process's peak resident set above its level "
             "before the call.",
             "Anchors at sourcetrace's rule: kronfluence with its heuristic's scale set to sourcetrace's "
             "factor (per module; sourcetrace damps weight and bias of a layer as one block for K-FAC/EK-FAC "
             "and per tensor for the diagonal); traker with each checkpoint's λ = factor · tr(ΦᵀΦ)/n from "
             "its own features (sourcetrace's default weights ΦᵀRΦ by R = p(1 − p); the unweighted "
             "sourcetrace row is its like for like); dattri with the λ sourcetrace resolved for the same "
             "model (dattri's curvature is the Hessian of the mean loss, sourcetrace's the Gauss-Newton "
             "matrix).",
             "Shrunk to fit a shared two-core machine: traker's λ sweep, dattri's CG at a hand-picked λ and "
             "dattri's Arnoldi (non-finite scores at its default and at sourcetrace's λ in a trial run), and "
             "the damping-free equivalence rows (kronfluence identity = grad-dot, captum TracInCP = tracin; "
             "tests/test_bench_anchors.py checks both against brute force), run in earlier versions of this "
             "file, are left out; the anchors run at their own default and at sourcetrace's rule.",
             f"Load average of the shared machine at the start of the run: {load} (wall times are inflated "
             "and noisy when it exceeds the two cores)."]
    return write_results(out_dir, "digits-mlp", "digits-mlp", rows, info, columns, notes, section="split",
                         headings=HEADINGS, summary=summary(rows))


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """The tuning-vs-reporting table and the default-rule-vs-implementation sentences, from the rows."""
    from .runner import markdown_table

    splits = [s for s in SPLITS if any(r["split"] == s for r in rows)]
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        entry = table.setdefault((r["method"], r["library"]),
                                 {"method": r["method"], "library": r["library"]})
        entry[r["split"]] = r.get("lds_ci") or r.get("note")
    lines = ["## Summary", "", "LDS [95 % CI] on each split:", ""]
    lines += markdown_table(list(table.values()), [("method", "method"), ("library", "library"),
                                                   *[(s, s) for s in splits]])
    lds = {(r["split"], r["method"]): r["lds"] for r in rows if "lds" in r}
    lines += ["", "How much of sourcetrace's lead over an anchor is the damping rule and how much the "
              "rest of the implementation (LDS; rule = the anchor at sourcetrace's rule minus the anchor at "
              "its own default; rest = sourcetrace minus the anchor at sourcetrace's rule):", ""]
    for split in splits:
        for what, ours, own, rule in _pairs():
            got = [lds.get((split, m)) for m in (ours, own, rule)]
            if None in got:
                continue
            o, a, b = (float(v) for v in got if v is not None)
            lines.append(f"- {split}, {what}: sourcetrace {o:.3f}, anchor at its default {a:.3f}, at "
                         f"sourcetrace's rule {b:.3f}: rule {b - a:+.3f}, rest {o - b:+.3f}.")
    return lines

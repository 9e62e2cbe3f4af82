"""Benchmark `practitioner-tasks`: the insights layer on two data sets with planted problems, every claim
checked by retraining (see `sourcetrace.insights.planted` for what is planted)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import sourcetrace as st

from .. import insights as ins
from ..artifacts import atomic_write_bytes, atomic_write_json
from ..errors import SourcetraceError
from ..evaluate import mislabel_detection, randomize_model
from ..evaluate.suite import (
    class_detection,
    model_randomization,
    shortcut_detection,
    subclass_detection,
    top_k_cardinality,
)
from ..insights.planted import Planted, planted_digits, planted_tabular
from . import quanda_check

METHODS = ("explicit", "ekfac", "trak", "tracin", "grad-dot", "grad-cos")
UNSTABLE = 0.8  # the flag threshold passed to `insights.reliability` (fixed, not tuned)
FRACTIONS = (0.05, 0.1, 0.15, 0.2)  # candidate defaults for the undersampled flag, chosen on the tuning split


def gd_checkpoints(setting: ins.Setting, steps: int = 300, every: int = 60) -> tuple[list[dict], list[float]]:
    """Full-batch gradient descent from zero on the setting's objective; checkpoints for TracIn."""
    model = setting.model()
    x, y = setting.examples(setting.x_train, setting.y_train)
    lam = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max()) / 2 + setting.wd
    lr = 1.0 / lam
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    states, lrs = [], []
    for t in range(1, steps + 1):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + 0.5 * setting.wd * sum(
            (p * p).sum() for p in model.parameters()
        )
        loss.backward()
        opt.step()
        if t % every == 0:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            lrs.append(lr * every)  # TracIn sums over the steps each checkpoint stands for
    return states, lrs


def attribute(
    setting: ins.Setting,
    model: torch.nn.Module,
    method: str,
    *queries: tuple[np.ndarray, np.ndarray],
    checkpoints: Any = None,
) -> tuple[list[st.Scores], torch.Tensor | None]:
    """Scores of each query set (x, y) against the training rows (one fit), and the self-influence."""
    opts: dict[str, Any] = {"store_dtype": "float64"}
    if method in ("explicit", "ekfac"):
        opts["damping"] = setting.wd
    if method == "tracin":
        opts["checkpoints"], opts["learning_rates"] = checkpoints
    if method == "trak":
        opts.pop("store_dtype")
    attr = st.Attributor(model, st.ClassificationTask(), method, progress=False, **opts)
    attr.fit(setting.examples(setting.x_train, setting.y_train))
    scores = [attr.score(setting.examples(x, y)) for x, y in queries]
    try:
        si = attr.self_influence()
    except SourcetraceError:  # a method without self-influence
        si = None
    return scores, si


def cleanlab_suspicion(setting: ins.Setting) -> np.ndarray:
    """cleanlab's label-quality ranking from 5-fold out-of-sample probabilities (logistic regression with
    the setting's regularisation); higher = more suspicious."""
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    clf = LogisticRegression(C=1.0 / (setting.wd * setting.n_train), max_iter=2000)
    probs = cross_val_predict(clf, setting.x_train, setting.y_train, cv=5, method="predict_proba")
    return -get_label_quality_scores(setting.y_train, probs)


def ci(values: np.ndarray, rng: np.random.Generator, n: int = 1000) -> list[float]:
    means = [float(np.mean(rng.choice(values, len(values)))) for _ in range(n)]
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def run_dataset(p: Planted, out: dict, bar: Any) -> None:
    s = p.setting
    model = s.train()
    margins = s.margins(model)
    ckpts = gd_checkpoints(s)
    bar.set_postfix_str(f"{s.name}: scoring")
    scores: dict[str, st.Scores] = {}
    self_inf: dict[str, np.ndarray] = {}
    rand_model = randomize_model(model, seed=42)
    suite: dict[str, dict[str, float]] = {}
    quanda = quanda_check.load()
    by_quanda: dict[str, Any] = {}
    sc_pred = model(torch.from_numpy(p.x_shortcut)).argmax(1).detach().numpy()
    sc_sel = np.flatnonzero(sc_pred == p.shortcut_class)
    # quanda explains the model's predicted class (its benchmarks' use_predictions=True)
    pred_q = model(torch.from_numpy(s.x_query)).argmax(1).detach().numpy()
    for method in METHODS:
        (sc, expl, short), si = attribute(
            s,
            model,
            method,
            (s.x_query, s.y_query),
            (s.x_query, pred_q),
            (p.x_shortcut, sc_pred),
            checkpoints=ckpts,
        )
        scores[method] = sc
        if si is not None:
            self_inf[method] = si.double().numpy()
        rand_ckpts = ([rand_model.state_dict()] * len(ckpts[0]), ckpts[1])
        (rnd,), _ = attribute(s, rand_model, method, (s.x_query, pred_q), checkpoints=rand_ckpts)
        rep = p.report
        m, r = expl.matrix.numpy()[rep], rnd.matrix.numpy()[rep]  # type: ignore[union-attr]
        suite[method] = {
            "class_detection": class_detection(m, s.y_train, s.y_query[rep]),
            "subclass_detection": subclass_detection(
                m, s.train_meta["subclass"], s.query_meta["subclass"][rep]
            ),
            "shortcut_detection": shortcut_detection(short.matrix.numpy(), p.shortcut_rows, sc_sel),  # type: ignore[union-attr]
            "model_randomization": model_randomization(m, r),
            "top_k_cardinality": top_k_cardinality(m, 10),
        }
        if quanda is not None:
            theirs = quanda_check.suite_by_quanda(
                quanda, m, train_labels=s.y_train, query_labels=s.y_query[rep],
                train_subclasses=s.train_meta["subclass"], query_subclasses=s.query_meta["subclass"][rep],
                shortcut_scores=short.matrix.numpy()[sc_sel],  # type: ignore[union-attr]
                shortcut_rows=p.shortcut_rows,
                shortcut_class=p.shortcut_class, randomized_scores=r,
            )
            by_quanda[method] = quanda_check.differences(suite[method], theirs)
        bar.update(1)
    suite_info = {"shortcut_queries_selected": int(len(sc_sel)), "shortcut_queries": int(len(p.y_shortcut))}

    # LDS on the reporting queries (40 half-subsets; the model is convex, so one seed)
    bar.set_postfix_str(f"{s.name}: LDS ground truth")
    gt_all = st.ensembles.retrain_subsets(
        lambda idx, seed: _train_on(s, idx),
        lambda mdl: s.margins(mdl),
        s.n_train,
        n_subsets=40,
        seeds=(0,),
        progress=False,
    )
    gt = st.ensembles.SubsetRetraining(
        gt_all.masks, gt_all.measurements[:, p.report], gt_all.per_seed[:, :, p.report]
    )
    for method in METHODS:
        m = scores[method].matrix.numpy()  # type: ignore[union-attr]
        suite[method]["lds"] = st.evaluate.lds(m[p.report], gt).mean
        suite[method]["calibrated_scale"] = st.evaluate.calibrate(m[p.report], gt).scale
    bar.update(1)

    # mislabel detection: tuning rows (even positions) choose the default, reported on odd positions
    bar.set_postfix_str(f"{s.name}: mislabels")
    heldout = ins.heldout_harm(
        st.Scores(
            scores["explicit"].matrix[p.tune],  # type: ignore[index]
            scores["explicit"].train_ids,  # type: ignore[index]
            [scores["explicit"].query_ids[i] for i in p.tune],
            "explicit",
        )
    )
    signals = {
        "self-influence": self_inf["explicit"],
        "tracin": self_inf["tracin"],
        "heldout": heldout,
        "grad-dot self": self_inf["grad-dot"],
        "outlier (kNN distance)": ins.outliers(s.x_train),
    }
    susp = ins.suspicion(signals, list(range(s.n_train)), combine=["self-influence", "tracin", "heldout"])
    rows = {name: susp.matrix[i].numpy() for i, name in enumerate(susp.query_ids)}  # type: ignore[index]
    rows["cleanlab (confident learning)"] = cleanlab_suspicion(s)
    mis: dict[str, dict[str, Any]] = {}
    for split, part in (("tuning", np.arange(0, s.n_train, 2)), ("reporting", np.arange(1, s.n_train, 2))):
        flipped = np.flatnonzero(np.isin(part, p.flipped))
        for name, v in rows.items():
            res = mislabel_detection(v[part], flipped)
            mis.setdefault(name, {})[split] = {
                "auc": res.auc,
                "precision_at_k": res.precision_at_k,
                "k": res.k,
                "quanda_score": res.quanda_score,
            }
            if quanda is not None:
                mis[name][split]["quanda_by_quanda"] = quanda_check.mislabeling_by_quanda(
                    quanda, v[part], flipped
                )
    bar.update(1)

    # group counterfactual: predicted vs retrained mean query margin without each label / cluster group
    bar.set_postfix_str(f"{s.name}: group counterfactuals")
    clusters = ins.feature_clusters(s.x_train, 10, seed=0)
    group_rows = []
    for kind, labels in (
        ("source", s.train_meta["source"]),
        ("cluster", clusters),
        ("label", s.train_meta["label"]),
    ):
        removal = ins.group_removal(scores["explicit"], labels, scale=1.0 / s.n_train)
        for j, g in enumerate(removal.train_ids):
            w = np.ones(s.n_train)
            w[np.asarray([str(v) for v in labels]) == str(g)] = 0.0
            actual = s.margins(s.train(weights=w))[p.report] - margins[p.report]
            group_rows.append(
                {
                    "grouping": kind,
                    "group": str(g),
                    "size": int((w == 0).sum()),
                    "predicted": float(removal.matrix[p.report, j].mean()),  # type: ignore[index]
                    "actual": float(actual.mean()),
                }
            )
    bar.update(1)

    # behaviour → responsible groups (sources), for several metrics, on the reporting queries
    bar.set_postfix_str(f"{s.name}: behaviours")
    in_slice = s.query_meta["subclass"] == p.slice_subclass
    report_mask = np.zeros(len(margins), dtype=bool)
    report_mask[p.report] = True
    cls_slice = int(p.slice_subclass[1:].split("s")[0])
    same_class_other = (s.y_query == cls_slice) & ~in_slice & report_mask
    behaviours = {
        "slice errors (margin)": ins.Behaviour.errors_on("slice errors", in_slice & report_mask, margins),
        "slice (loss)": ins.Behaviour("slice loss", tuple(np.flatnonzero(in_slice & report_mask)), "loss"),
        "slice (accuracy proxy)": ins.Behaviour(
            "slice acc", tuple(np.flatnonzero(in_slice & report_mask)), "accuracy"
        ),
        "confusion": ins.Behaviour.confusion(
            "confusion",
            cls_slice,
            p.info["wrong_label_of_poison"],
            np.where(report_mask, s.y_query, -1),
            model(torch.from_numpy(s.x_query)).argmax(1).detach().numpy(),
        ),
        "accuracy gap (slice vs rest of its class)": ins.Behaviour.gap_between(
            "gap", in_slice & report_mask, same_class_other
        ),
    }
    behaviour_rows: dict[str, dict[str, Any]] = {}
    for name, b in behaviours.items():
        if not b.queries:
            continue
        ranking = ins.responsible_groups(
            scores["explicit"], s.train_meta["source"], b, margins, scale=1.0 / s.n_train
        )
        for method in ("trak", "tracin", "grad-dot"):
            scale = suite[method]["calibrated_scale"]
            other = ins.responsible_groups(scores[method], s.train_meta["source"], b, margins, scale=scale)
            behaviour_rows.setdefault(name, {})[f"rank ({method}, calibrated)"] = other.rank_of(
                p.poison_source
            )
        behaviour_rows[name] = {
            "rank (explicit)": ranking.rank_of(p.poison_source),
            "n_queries": len(b.queries),
            "top": ranking.table(1)[0]["group"],
            **behaviour_rows.get(name, {}),
        }
    bar.update(1)

    # actions: predicted vs retrained, with bootstrap CIs over the behaviour's queries
    bar.set_postfix_str(f"{s.name}: actions")
    slice_b = ins.Behaviour("slice", tuple(np.flatnonzero(in_slice & report_mask)), "margin")
    ranking = ins.responsible_groups(
        scores["explicit"],
        s.train_meta["source"],
        behaviours["slice errors (margin)"],
        margins,
        scale=1.0 / s.n_train,
    )
    top_group = ranking.table(1)[0]["group"]
    top_rows = tuple(int(i) for i in np.flatnonzero(s.train_meta["source"] == str(top_group)))
    predicted_class = model(torch.from_numpy(s.x_train)).argmax(1).detach().numpy()
    default = _best(mis, "tuning")
    most = np.argsort(-rows[default], kind="stable")[: int(0.05 * s.n_train)]
    suspects = [int(i) for i in most if predicted_class[i] != s.y_train[i]]
    relabel = [(i, int(predicted_class[i])) for i in suspects]
    pool = ins.pool_scores(s, model, relabel=relabel)
    rare_b = ins.Behaviour(
        "rare", tuple(np.flatnonzero((s.query_meta["subclass"] == p.rare_subclass) & report_mask)), "margin"
    )
    all_b = ins.Behaviour("all reporting queries", tuple(p.report.tolist()), "loss")
    sup = ins.support(scores["explicit"], s.x_query, s.x_train)
    signs = {
        "combined": sup.thinness,
        "distance": sup.distance,
        "low positive mass": -sup.positive_mass,
        "few proponents": -sup.proponents,
    }
    tuned = {k: _tune_fraction(v, p, s) for k, v in signs.items()}
    sign = max(tuned, key=lambda k: tuned[k][1])
    thin = signs[sign]
    flagged = _flag_on(thin, p.report, tuned[sign][0])
    region = ins.regions(flagged, s.x_query, s.x_train, s.y_query, n_clusters=3)[0]
    centre = np.asarray(region.centre)
    nearest_pool = np.argsort(((s.x_pool - centre) ** 2).sum(1), kind="stable")[:10]  # type: ignore[operator]
    actions = [
        ("remove", ins.Action("remove", top_rows, note=f"top group {top_group}"), slice_b),
        (
            "relabel",
            ins.Action(
                "relabel",
                tuple(r for r, _ in relabel),
                tuple(c for _, c in relabel),
                note=f"{len(relabel)} suspected mislabels to the predicted class",
            ),
            all_b,
        ),
        (
            "reweight",
            ins.Action(
                "reweight",
                tuple(int(i) for i in p.rare_rows),
                weight=5.0,
                note="the undersampled sub-population's rows ×5",
            ),
            rare_b,
        ),
        (
            "acquire",
            ins.Action(
                "acquire",
                tuple(int(i) for i in nearest_pool),
                note="10 candidates nearest the largest thin region",
            ),
            rare_b,
        ),
    ]
    action_rows = []
    for kind, action, b in actions:
        eff = ins.whatif(action, b, pool, margins, setting=s, verify=True)
        action_rows.append({"kind": kind, **eff.row()})
    bar.update(1)

    # undersampled: flag fraction tuned on the tuning queries, recall/precision on the reporting queries
    frac, tune_f1 = tuned[sign]
    flagged = _flag_on(thin, p.report, frac)
    rare_q = np.flatnonzero(s.query_meta["subclass"] == p.rare_subclass)
    rare_rep = np.intersect1d(rare_q, p.report)
    hit = np.intersect1d(flagged, rare_rep)
    regions = ins.regions(flagged, s.x_query, s.x_train, s.query_meta["subclass"], n_clusters=3)
    under = {
        "sign": sign,
        "fraction": frac,
        "tuning_f1": tune_f1,
        "n_flagged": int(len(flagged)),
        "n_planted": int(len(rare_rep)),
        "recall": len(hit) / max(1, len(rare_rep)),
        "precision": len(hit) / max(1, len(flagged)),
        "regions": [{"size": len(r.queries), "labels": r.labels} for r in regions],
    }

    # reliability: methods, checkpoints, bootstrap resamples of the training rows
    bar.set_postfix_str(f"{s.name}: reliability")
    rep = p.report
    by_method = ins.reliability(
        [scores[m].matrix.numpy()[rep] for m in ("explicit", "ekfac", "trak", "tracin")],  # type: ignore[union-attr]
        k=10,
        threshold=UNSTABLE,
    )
    by_ckpt = []
    for state in ckpts[0][1:]:
        mdl = s.model()
        mdl.load_state_dict(state)
        by_ckpt.append(attribute(s, mdl, "grad-dot", (s.x_query[rep], s.y_query[rep]))[0][0].matrix.numpy())  # type: ignore[union-attr]
    by_ckpt_r = ins.reliability(by_ckpt, k=10, threshold=UNSTABLE)
    boots = []
    for draw in range(5):
        counts = np.random.default_rng(100 + draw).multinomial(s.n_train, np.full(s.n_train, 1.0 / s.n_train))
        mdl = s.train(weights=counts.astype(np.float64))
        boots.append(attribute(s, mdl, "explicit", (s.x_query[rep], s.y_query[rep]))[0][0].matrix.numpy())  # type: ignore[union-attr]
    by_boot = ins.reliability(boots, k=10, threshold=UNSTABLE)
    mlp = copy.copy(s)  # seeds matter only for a non-convex model: a 16-unit tanh network, 3 seeds
    mlp.hidden = 16
    by_seed = []
    for seed in range(3):
        mdl = mlp.train(seed=seed)
        by_seed.append(attribute(mlp, mdl, "explicit", (s.x_query[rep], s.y_query[rep]))[0][0].matrix.numpy())  # type: ignore[union-attr]
    by_seed_r = ins.reliability(by_seed, k=10, threshold=UNSTABLE)
    # do unstable lists predict less accurate ones? agreement of the top-10 with LDS per query
    lds_q = st.evaluate.lds(scores["explicit"].matrix.numpy()[rep], gt).per_query  # type: ignore[union-attr]
    rel = {}
    for name, r in (
        ("methods", by_method),
        ("checkpoints", by_ckpt_r),
        ("bootstrap", by_boot),
        ("seeds (16-unit MLP)", by_seed_r),
    ):
        unstable = r.unstable
        from scipy.stats import spearmanr

        ok = ~np.isnan(lds_q)
        rel[name] = {
            "stability_lds_corr": float(spearmanr(r.stability[ok], lds_q[ok])[0]),
            "jaccard": float(np.mean(r.jaccard)),
            "rank_corr": float(np.nanmean(r.rank_correlation)),
            "stability": float(np.mean(r.stability)),
            "unstable_share": float(unstable.mean()),
            "lds_unstable": float(np.nanmean(lds_q[unstable])) if unstable.any() else None,
            "lds_stable": float(np.nanmean(lds_q[~unstable])) if (~unstable).any() else None,
            "train_agreement": float(np.nanmean(r.train_agreement)),
        }
    bar.update(1)

    out[s.name] = {
        "n_train": s.n_train,
        "n_query": len(s.y_query),
        "n_tune": len(p.tune),
        "n_report": len(p.report),
        "n_flipped": len(p.flipped),
        "query_accuracy": float((margins[p.report] > 0).mean()),
        "suite": suite,
        "suite_info": suite_info,
        "suite_by_quanda": by_quanda,
        "mislabel": mis,
        "mislabel_default": default,
        "groups": group_rows,
        "behaviours": behaviour_rows,
        "actions": action_rows,
        "undersampled": under,
        "reliability": rel,
    }
    out.setdefault("_health", {})[s.name] = {
        "groups": ranking.table(8),
        "suspects": [
            {
                "row": int(i),
                "label": int(s.y_train[i]),
                "predicted": int(predicted_class[i]),
                "flipped": bool(i in set(p.flipped.tolist())),
                "score": float(rows[default][i]),
            }
            for i in np.argsort(-rows[default])[:12]
        ],
        "regions": [
            {
                "size": len(r.queries),
                "labels": r.labels,
                "describe": r.describe(),
                "nearest_train": r.nearest_train,
            }
            for r in regions
        ],
        "reliability": {
            "stability": by_boot.stability.tolist(),
            "badges": [by_boot.badge(i) for i in range(len(rep))],
        },
        "actions": action_rows,
    }


def _train_on(s: ins.Setting, idx: np.ndarray) -> torch.nn.Module:
    w = np.zeros(s.n_train)
    w[idx] = 1.0
    return s.train(weights=w)


def _best(mis: dict, split: str) -> str:
    ours = {k: v for k, v in mis.items() if not k.startswith("cleanlab")}
    return max(ours, key=lambda k: ours[k][split]["auc"])


def _flag_on(thinness: np.ndarray, part: np.ndarray, fraction: float) -> np.ndarray:
    return part[ins.flag(thinness[part], fraction)]


def _tune_fraction(thinness: np.ndarray, p: Planted, s: ins.Setting) -> tuple[float, float]:
    rare = set(np.flatnonzero(s.query_meta["subclass"] == p.rare_subclass).tolist())
    best = (FRACTIONS[0], -1.0)
    for f in FRACTIONS:
        flagged = set(_flag_on(thinness, p.tune, f).tolist())
        truth = rare & set(p.tune.tolist())
        tp = len(flagged & truth)
        f1 = 2 * tp / max(1, len(flagged) + len(truth))
        if f1 > best[1]:
            best = (f, f1)
    return best


def run(out_dir: Path, workdir: Path | None = None, **_: Any) -> Path:
    torch.set_num_threads(1)
    start = time.time()
    out: dict[str, Any] = {}
    makers = (planted_digits, planted_tabular)
    with tqdm(total=len(makers) * (len(METHODS) + 7), desc="practitioner-tasks") as bar:
        for make in makers:
            p = make()
            run_dataset(p, out, bar)
            if workdir is not None and p.setting.name == "tabular":
                p.setting.save(Path(workdir) / "setting-tabular")
    out["_meta"] = {"wall_s": time.time() - start, "versions": _versions()}
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "practitioner-tasks.json", json.loads(json.dumps(out, default=_plain)))
    md = render(out)
    atomic_write_bytes(out_dir / "practitioner-tasks.md", md.encode())
    return out_dir / "practitioner-tasks.md"


def _plain(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torch", "numpy", "scikit-learn", "cleanlab"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _quanda_paragraph(out: dict, sets: list[str]) -> list[str]:
    """Whether quanda's own code ran on the same scores, and the largest difference from the suite."""
    rows = {n: out[n].get("suite_by_quanda") or {} for n in sets}
    if not any(rows.values()):
        return ["**quanda did not run** (not installed): the suite (`sourcetrace.evaluate.suite`) implements "
                "quanda's metric definitions, each tested against a hand computation; `make setup` installs "
                "quanda so that its own code is compared here.", ""]
    lines = ["**quanda's own metric code on the same scores** (`bench/quanda_check.py`: quanda's metric "
             "modules imported without its package `__init__`, which pulls in torchvision). Largest absolute "
             "difference between the suite and quanda, over every method:", "",
             "| data | " + " | ".join(METRIC_NAMES)
             + " | mislabeling (order only) | mislabeling (as shipped) |",
             "|---|" + "---|" * (len(METRIC_NAMES) + 2)]
    for n in sets:
        per = [max(d[m]["abs_diff"] for d in rows[n].values()) for m in METRIC_NAMES]
        mis = [v["reporting"] for v in out[n]["mislabel"].values() if "quanda_by_quanda" in v["reporting"]]
        order = max(abs(r["quanda_score"] - r["quanda_by_quanda"]["order_only"]) for r in mis)
        shipped = max(abs(r["quanda_score"] - r["quanda_by_quanda"]["as_shipped"]) for r in mis)
        lines.append(f"| {n} | " + " | ".join(f"{v:.1e}" for v in per) + f" | {order:.1e} | {shipped:.1e} |")
    lines += ["", "quanda's mislabeling detection adds 1e-4 × the row index to the self-influence before "
              "ranking; where suspicion scores differ by less than that, its ranking (as shipped) differs "
              "from the order of the scores, which the suite (and the order-only column) uses.", ""]
    return lines


METRIC_NAMES = ("class_detection", "subclass_detection", "shortcut_detection", "model_randomization",
                "top_k_cardinality")


def f(v: Any, d: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(f(x, d) for x in v) + "]"
    return f"{v:.{d}f}" if isinstance(v, float) else str(v)


def render(out: dict) -> str:
    import inspect

    from ..insights.planted import plant

    planted_defaults = {k: p.default for k, p in inspect.signature(plant).parameters.items()}
    sets = [k for k in out if not k.startswith("_")]
    L = [
        "# practitioner-tasks",
        "",
        "Written by `sourcetrace bench practitioner-tasks` (do not edit). Two data sets with planted "
        "problems "
        "(`sourcetrace.insights.planted`): scikit-learn's digits and a generated Gaussian-mixture table, "
        "each "
        f"with {planted_defaults['flip']:.0%} flipped training labels, a shortcut column on half of one "
        "class's training rows, an "
        f"undersampled sub-population ({planted_defaults['n_rare']} training rows) and a "
        f"{planted_defaults['n_poison']}-row source `batch-P` of near-copies of one "
        "sub-population labelled as another class. The model is a softmax regression trained to convergence "
        f"(L-BFGS, float64, weight decay {planted_defaults['wd']:g}), so every prediction is checked by "
        "retraining exactly.",
        "",
        "**Splits.** The queries are split in half at random: the *tuning* half chose the defaults (the "
        "undersampled flag fraction among " + ", ".join(str(x) for x in FRACTIONS) + "; the held-out rows "
        "of the mislabel `heldout` signal); every figure below is on the *reporting* half unless marked. "
        "Mislabel detection is scored over training rows: rows at even positions chose the default method "
        "(tuning), rows at odd positions are reported.",
        "",
        *_quanda_paragraph(out, sets),
    ]
    for name in sets:
        d = out[name]
        L += [
            f"## {name}: {d['n_train']} training rows, {d['n_query']} queries ({d['n_report']} reporting), "
            f"{d['n_flipped']} flipped labels; query accuracy {d['query_accuracy']:.3f}",
            "",
        ]
        mis = d["mislabel"]
        clean = mis["cleanlab (confident learning)"]["reporting"]["auc"]
        best = d["mislabel_default"]
        L += [
            "### Mislabel detection (reporting rows; default chosen on tuning rows)",
            "",
            "| signal | AUC (tuning) | AUC | precision@k | k | quanda score |",
            "|---|---|---|---|---|---|",
        ]
        for sig, v in mis.items():
            r = v["reporting"]
            L.append(
                f"| {sig}{' (default)' if sig == best else ''} | {f(v['tuning']['auc'])} | {f(r['auc'])} "
                f"| {f(r['precision_at_k'])} | {r['k']} | {f(r['quanda_score'])} |"
            )
        ours = mis[best]["reporting"]["auc"]
        L += [
            "",
            f"The default chosen on the tuning rows is `{best}`: reporting AUC {ours:.3f} vs cleanlab "
            f"{clean:.3f}, {'at or above' if ours >= clean else 'below'} cleanlab on {name}.",
            "",
        ]
        L += [
            "### Evaluation suite (quanda's definitions) per method, reporting queries",
            "",
            "Scores for these five metrics explain the model's predicted class, as quanda's benchmarks do; "
            "LDS uses the true-class margin.",
            "",
            "| method | class det. | subclass det. | shortcut det. (AP) | model rand. (ρ, lower better) "
            "| top-10 cardinality | LDS (40 subsets) |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, v in d["suite"].items():
            L.append(
                f"| {m} | {f(v['class_detection'])} | {f(v['subclass_detection'])} | "
                f"{f(v['shortcut_detection'])} | {f(v['model_randomization'])} | "
                f"{f(v['top_k_cardinality'])} | {f(v['lds'])} |"
            )
        si = d["suite_info"]
        L += [
            "",
            f"Shortcut detection averages over the {si['shortcut_queries_selected']} of "
            f"{si['shortcut_queries']} other-class queries with the shortcut set that the model predicts as "
            "the shortcut class (quanda's filters).",
            "",
        ]
        g = d["groups"]
        L += [
            "### Group counterfactual: removing a source, a feature cluster or a whole label "
            "(explicit influence, scale 1/n)",
            "",
            "| grouping | groups | corr(predicted, retrained) | mean abs error | mean abs retrained change |",
            "|---|---|---|---|---|",
        ]
        for kind in ("source", "cluster", "label"):
            rows = [r for r in g if r["grouping"] == kind]
            pr, ac = np.array([r["predicted"] for r in rows]), np.array([r["actual"] for r in rows])
            L.append(
                f"| {kind} | {len(rows)} | {f(float(np.corrcoef(pr, ac)[0, 1]))} | "
                f"{f(float(np.abs(pr - ac).mean()))} | {f(float(np.abs(ac).mean()))} |"
            )
        L += [
            "",
            "### Behaviour → responsible sources (21 sources; the planted one is `batch-P`)",
            "",
            "| behaviour | queries | top source | rank of batch-P (explicit) | trak | tracin | grad-dot |",
            "|---|---|---|---|---|---|---|",
        ]
        for b, v in d["behaviours"].items():
            L.append(
                f"| {b} | {v['n_queries']} | {v['top']} | {v['rank (explicit)']} | "
                f"{v.get('rank (trak, calibrated)')} | {v.get('rank (tracin, calibrated)')} | "
                f"{v.get('rank (grad-dot, calibrated)')} |"
            )
        L += [
            "",
            "### Actions: predicted vs retrained effect (95 % bootstrap CIs over the behaviour's queries)",
            "",
            "| action | behaviour (metric) | before | predicted change [CI] | retrained change [CI] | "
            "error before | predicted error after | retrained error after |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for a in d["actions"]:
            L.append(
                f"| {a['kind']}: {a['action']} | {a['behaviour']} ({a['metric']}) | {f(a['before'])} | "
                f"{f(a['predicted_change'])} {f(a['predicted_ci'])} | {f(a['actual_change'])} "
                f"{f(a['actual_ci'])} | {f(a['error_before'])} | {f(a['predicted_error_after'])} | "
                f"{f(a['actual_error_after'])} |"
            )
        acts = d["actions"]
        same_sign = sum(np.sign(a["predicted_change"]) == np.sign(a["actual_change"]) for a in acts)
        overlap = sum(
            a["predicted_ci"][0] <= a["actual_ci"][1] and a["actual_ci"][0] <= a["predicted_ci"][1]
            for a in acts
        )
        clear = [a for a in acts if a["actual_ci"][0] > 0 or a["actual_ci"][1] < 0]
        ratios = [a["predicted_change"] / a["actual_change"] for a in clear]
        L += [
            "",
            f"The prediction has the retrained change's sign for {same_sign} of {len(acts)} actions and "
            f"the two intervals overlap for {overlap} of {len(acts)}."
            + (
                f" Where the retrained interval excludes 0 ({len(clear)} actions), predicted / retrained "
                f"change ranges from {min(ratios):.2f} to {max(ratios):.2f}: the prediction is first "
                "order, so large changes are under- or over-predicted."
                if clear
                else ""
            ),
        ]
        u = d["undersampled"]
        L += [
            "",
            "### Undersampled sub-population",
            "",
            f"Sign of thin support and flag fraction chosen on the tuning queries: `{u['sign']}` "
            "(of combined, "
            f"distance, low positive mass, few proponents), {u['fraction']} "
            f"(tuning F1 {u['tuning_f1']:.3f}). "
            f"On the reporting queries {u['n_flagged']} are flagged; recall of the {u['n_planted']} planted "
            f"queries {u['recall']:.3f}, precision {u['precision']:.3f}. Regions (largest first): "
            + "; ".join(f"{r['size']} queries {r['labels']}" for r in u["regions"])
            + ".",
            "",
            "### Reliability (top-10 lists of the reporting queries)",
            "",
            "Per-training-row agreement: Spearman correlation of a row's scores over the queries between "
            "runs, mean over pairs and rows. A list is flagged unstable when its bootstrap stability is "
            f"below {UNSTABLE}"
            " (a fixed default, not tuned); LDS is explicit influence's per-query LDS.",
            "",
            "| runs compared | top-10 Jaccard | rank corr. | bootstrap stability | flagged unstable | "
            "LDS of unstable | LDS of stable | Spearman(stability, per-query LDS) | "
            "per-training-row agreement |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k, v in d["reliability"].items():
            L.append(
                f"| {k} | {f(v['jaccard'])} | {f(v['rank_corr'])} | {f(v['stability'])} | "
                f"{f(v['unstable_share'])} | {f(v['lds_unstable'])} | {f(v['lds_stable'])} | "
                f"{f(v['stability_lds_corr'])} | {f(v['train_agreement'])} |"
            )
        corr = [v["stability_lds_corr"] for v in d["reliability"].values()]
        L += [
            "",
            f"Spearman correlation of a query's stability with its LDS lies between {min(corr):.3f} and "
            f"{max(corr):.3f} over the {len(corr)} comparisons: here the flag marks lists on which runs "
            "disagree, not lists that retraining contradicts more.",
            "",
        ]
    meta = out["_meta"]
    L += [
        f"Wall time {meta['wall_s']:.0f} s on one thread; versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
    ]
    return "\n".join(L)

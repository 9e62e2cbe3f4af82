"""The LLM user's trial (issue 17): the README's language-model example on a GPT-2 built from its config,
trained on generated documents with planted sentences; where each planted document ranks, the store's
size and the fit's time, for the compact default (Kronecker features) and the full gradients."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: the training recipe was set on seed 0 (the README's example) by whether the facts were learned;
#: the figures below are from another corpus and initialisation (the reporting split)
TUNING_SEED, REPORTING_SEED = 0, 1
N_DOCS, SENTENCES, EPOCHS, LR = 300, 2, 30, 3e-3
#: (label, method, options): the defaults a language model gets, and full gradients asked for
RUNS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("EK-FAC, default (the README's example)", "ekfac", {}),
    ("EK-FAC, full gradients", "ekfac", {"features": "identity"}),
    ("grad-dot, default", "grad-dot", {}),
    ("grad-dot, full gradients", "grad-dot", {"features": "identity"}))


def setting(seed: int) -> dict[str, Any]:
    """The README example's setting at `seed`: documents, facts, tokenizer, trained model, examples."""
    import sourcetrace as st

    from ..demos.llm import gpt2_from_config, planted_documents, train_minibatches, word_tokenizer

    docs, facts = planted_documents(n_docs=N_DOCS, sentences=SENTENCES, seed=seed)
    texts = [d["text"] for d in docs]
    tokenizer = word_tokenizer(texts)
    model = gpt2_from_config(len(tokenizer), seed=seed)
    start = time.perf_counter()
    train_minibatches(model, tokenizer, texts, epochs=EPOCHS, lr=LR, seed=seed)
    return {"docs": docs, "facts": facts, "tokenizer": tokenizer, "model": model,
            "train_s": time.perf_counter() - start,
            "train": st.lm_examples(docs, tokenizer, bos=True, eos=True),
            "queries": st.lm_examples(facts, tokenizer, bos=True)}


def planted_ranks(scores: Any, facts: list[dict[str, Any]]) -> list[list[int]]:
    """For each fact, the ranks (1 = top) of its planted documents among all training documents."""
    out = []
    for fact in facts:
        order = [a.train_id for a in scores.top(query=fact["id"], k=len(scores.train_ids))]
        out.append(sorted(order.index(d) + 1 for d in fact["documents"]))
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over queries of the rank correlation between two score rows."""
    ra, rb = a.argsort(1).argsort(1).double(), b.argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return float(((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean())


def run(out_dir: Path = Path("benchmarks"), workdir: Path = Path("runs/bench/llm-trial")) -> Path:
    import sourcetrace as st

    from ..demos.llm import GPT2_LAYERS

    torch.set_num_threads(1)
    s = setting(REPORTING_SEED)
    task = st.CausalLMTask(pad_token_id=s["tokenizer"].pad_token_id)
    n_params = sum(p.numel() for p in s["model"].parameters())
    with torch.no_grad():
        logp = task.measurement(s["model"], task.collate([s["queries"][i] for i in range(len(s["facts"]))]))
    rows: list[dict[str, Any]] = []
    matrices: dict[str, torch.Tensor] = {}
    for label, method, options in RUNS:
        folder = Path(workdir) / f"seed{REPORTING_SEED}-{method}-{options.get('features', 'default')}"
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attr = st.Attributor(s["model"], task, method, folder, overwrite=True, progress=False,
                                 modules=list(GPT2_LAYERS), **options).fit(s["train"])
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = attr.score(s["queries"])
        score_s = time.perf_counter() - start
        store = sum(f.stat().st_size for f in folder.glob("train-grads-*/**/*") if f.is_file())
        ranks = planted_ranks(scores, s["facts"])
        assert scores.matrix is not None  # scored without top_k
        matrices[label] = scores.matrix
        rows.append({"label": label, "method": method, "features": attr.method.options.features,
                     "fit_s": fit_s, "score_s": score_s, "store_mb": store / 2**20, "ranks": ranks,
                     "worst_rank": max(max(r) for r in ranks),
                     "all_top5": all(max(r) <= 5 for r in ranks)})
    pairs = {}
    for compact, full in ((RUNS[0][0], RUNS[1][0]), (RUNS[2][0], RUNS[3][0])):
        a, b = matrices[compact], matrices[full]
        top5 = [len(set(a[q].topk(5).indices.tolist()) & set(b[q].topk(5).indices.tolist())) / 5
                for q in range(len(s["facts"]))]
        pairs[compact.split(",")[0]] = {"spearman": spearman(a, b), "top5_overlap": float(np.mean(top5))}
    result = {"setting": {"n_docs": N_DOCS, "sentences_per_doc": SENTENCES, "facts": len(s["facts"]),
                          "copies": len(s["facts"][0]["documents"]), "parameters": n_params,
                          "epochs": EPOCHS, "lr": LR, "train_s": s["train_s"],
                          "seed": REPORTING_SEED, "tuning_seed": TUNING_SEED,
                          "query_logprob": [float(v) for v in logp], "modules": list(GPT2_LAYERS)},
              "runs": rows,
              "compact_vs_full": pairs}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "llm-trial.json").write_text(json.dumps(result, indent=1))
    path = out_dir / "llm-trial.md"
    path.write_text(markdown(result))
    return path


def markdown(r: dict[str, Any]) -> str:
    st_, c = r["setting"], r["compact_vs_full"]
    lines = [
        "# llm-trial: the README's language-model example on planted sentences",
        "",
        f"GPT-2 built from its config ({st_['parameters']:,} parameters, SDPA attention), trained with Adam "
        f"({st_['epochs']} epochs of minibatches, lr {st_['lr']}, {st_['train_s']:.0f} s on one thread) on "
        f"{st_['n_docs']} generated documents of {st_['sentences_per_doc']} sentences; "
        f"{st_['facts']} planted sentences (a made-up name and a verb, object and place from three different "
        f"topics), each in {st_['copies']} documents. Each query is a planted sentence: its name as the "
        "prompt, the rest as the completion (log-probabilities after training: "
        + ", ".join(f"{v:.2f}" for v in st_["query_logprob"]) + "). Attributed through "
        + ", ".join(f"`{m}`" for m in st_["modules"]) + ", one thread.",
        "",
        f"Reporting split: corpus and initialisation seed {st_['seed']}. The training recipe was set on seed "
        f"{st_['tuning_seed']} (the README's example) by whether the facts were learned; the Kronecker rank "
        "32 is LoGra's default, chosen on digits-mlp (`methods/logra.py`), not here.",
        "",
        "| method | features | fit (s) | score (s) | store (MB) | ranks of the planted documents, per "
        "sentence | all in top 5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["runs"]:
        lines.append(f"| {row['label']} | {row['features']} | {row['fit_s']:.1f} | {row['score_s']:.1f} | "
                     f"{row['store_mb']:.1f} | {' · '.join(','.join(map(str, x)) for x in row['ranks'])} | "
                     f"{'yes' if row['all_top5'] else 'no'} |")
    lines.append("")
    for i, (name, pair) in enumerate(c.items()):
        default, full = r["runs"][2 * i], r["runs"][2 * i + 1]
        lines += [
            f"{name}, compact against full: the Kronecker store is {default['store_mb']:.1f} MB against "
            f"{full['store_mb']:.1f} MB ({full['store_mb'] / max(default['store_mb'], 1e-9):.0f}x smaller); "
            f"the rank correlation of their scores is {pair['spearman']:.3f} (mean over queries) and their "
            f"top 5 share {pair['top5_overlap'] * 100:.0f} % of documents. The default "
            + ("ranks every planted document in the top 5" if default["all_top5"] else
               f"does not rank every planted document in the top 5 (worst rank {default['worst_rank']})")
            + f"; full gradients {'do' if full['all_top5'] else 'do not'} (worst rank {full['worst_rank']}).",
            ""]
    default = r["runs"][0]
    lines += [
        "Issue 17's targets, for the README's example: store <= 50 MB: "
        f"{'met' if default['store_mb'] <= 50 else 'not met'} "
        f"({default['store_mb']:.1f} MB); fit <= 60 s: {'met' if default['fit_s'] <= 60 else 'not met'} "
        f"({default['fit_s']:.1f} s on one thread of a shared 2-core machine).",
        "",
    ]
    return "\n".join(lines)

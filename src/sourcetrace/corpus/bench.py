"""Benchmark `corpus-trace`: index build throughput and peak memory, trace latency, mining throughput.

Each (engine, size) runs in a fresh Python process so that its peak memory is its own. The corpus is
generated: Zipf-distributed token ids (a 50k vocabulary, u16) in 1,000-token documents, with passages
repeated across documents; each traced output is 400 tokens mixing copied corpus fragments and fresh tokens.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 50_000
DOC_LEN = 1_000


def _corpus(n_tokens: int, seed: int):
    """Yield documents (as id arrays) until about n_tokens tokens; some carry repeated passages."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, VOCAB + 1)
    p = 1.0 / ranks
    p /= p.sum()
    cdf = np.cumsum(p)
    passages = [np.minimum(np.searchsorted(cdf, rng.random(64)), VOCAB - 1) for _ in range(500)]
    made = 0
    while made < n_tokens:
        doc = np.minimum(np.searchsorted(cdf, rng.random(DOC_LEN)), VOCAB - 1).astype(np.int64)
        if rng.random() < 0.3:
            k = int(rng.integers(0, DOC_LEN - 64))
            doc[k : k + 64] = passages[int(rng.integers(0, len(passages)))]
        made += DOC_LEN + 1
        yield {"ids": doc}


def _outputs(index: Any, n: int, seed: int) -> list[np.ndarray]:
    """400-token outputs: 8 fragments of 10-40 tokens copied from corpus documents, the rest fresh tokens."""
    rng = np.random.default_rng(seed + 1)
    outs = []
    for _ in range(n):
        parts: list[np.ndarray] = []
        while sum(len(x) for x in parts) < 400:
            if rng.random() < 0.5:
                d = index.document(int(rng.integers(0, index.n_docs)))["ids"]
                k = int(rng.integers(10, 41))
                a = int(rng.integers(0, max(1, len(d) - k)))
                parts.append(np.asarray(d[a : a + k], dtype=np.int64))
            else:
                parts.append(rng.integers(0, VOCAB, size=int(rng.integers(10, 41))))
        outs.append(np.concatenate(parts)[:400])
    return outs


def _tokenizer():
    from .tokenizers import CallableTokenizer

    return CallableTokenizer(
        lambda text: [int(t) for t in text.split()],
        lambda ids: " ".join(str(i) for i in ids),
        name="bench-ids-50k",
        vocab_size=VOCAB,
    )


def _peak_rss_mb() -> tuple[float, float]:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def worker(engine: str, size: int, workdir: str, traces: int, seed: int) -> dict[str, Any]:
    """Build one index and time it; run in its own process (see `run_benchmark`)."""
    from .index import CorpusIndex

    tok = _tokenizer()
    t0 = time.perf_counter()
    idx = CorpusIndex.build(_corpus(size, seed), tok, Path(workdir) / "index", engine=engine, progress=False)
    build_s = time.perf_counter() - t0
    own, kids = _peak_rss_mb()
    disk = sum(p.stat().st_size for p in (Path(workdir) / "index").rglob("*") if p.is_file())
    outs = _outputs(idx, traces + 2, seed)
    for q in outs[:2]:  # warm the page cache and code paths
        idx.trace(q, word_boundary=False)
    lat, spans = [], []
    for q in outs[2:]:
        t = time.perf_counter()
        r = idx.trace(q, word_boundary=False)
        lat.append(time.perf_counter() - t)
        spans.append(len(r.spans))
    t = time.perf_counter()
    for q in outs[2:]:
        idx.longest_matches(q)
    lm = (time.perf_counter() - t) / max(len(outs) - 2, 1)
    mining = _mining_throughput(idx, seed)
    res = {
        "engine": idx.engine_name,
        "tokens": idx.n_tokens,
        "docs": idx.n_docs,
        "shards": idx.n_shards,
        "build_s": build_s,
        "build_tokens_per_s": idx.n_tokens / build_s,
        "peak_rss_mb": own,
        "peak_rss_children_mb": kids,
        "index_bytes": disk,
        "bytes_per_token": disk / idx.n_tokens,
        "trace_ms_median": 1000 * float(np.median(lat)),
        "trace_ms_p95": 1000 * float(np.percentile(lat, 95)),
        "longest_matches_ms_mean": 1000 * lm,
        "spans_per_trace_mean": float(np.mean(spans)),
        **mining,
    }
    idx.close()
    return res


def _mining_throughput(index: Any, seed: int, n_prompts: int = 2, new_tokens: int = 100) -> dict[str, Any]:
    """Mining end to end with a randomly initialised 2-layer GPT-2 over the benchmark vocabulary."""
    try:
        import torch
        import transformers
    except ImportError:
        return {}
    from .mining import mine_low_perplexity

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=256,
        n_layer=2,
        n_head=2,
        n_embd=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    prompts = [" ".join(str(int(t)) for t in index.document(i)["ids"][:20]) for i in range(n_prompts)]
    t = time.perf_counter()
    rep = mine_low_perplexity(
        model, index.tokenizer, prompts=prompts, index=index, max_new_tokens=new_tokens, threshold=0.0
    )  # threshold 0: every window is a span, so tracing is exercised
    dt = time.perf_counter() - t
    return {"mining_tokens_per_s": n_prompts * new_tokens / dt, "mining_spans": len(rep.spans)}


def run_benchmark(
    out_dir: Path | str = Path("benchmarks"),
    sizes: tuple[int, ...] = (10_000_000, 100_000_000),
    engines: tuple[str, ...] = ("infini-gram", "portable"),
    traces: int = 30,
    seed: int = 0,
    workdir: str | None = None,
    timeout_s: float = 3600,
) -> dict[str, Any]:
    """Run every (engine, size) in its own process and write `corpus-trace.md` and `.json` to `out_dir`."""
    from ..artifacts import atomic_write, atomic_write_json
    from .engines import infini_gram_available

    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        for engine in engines:
            if engine == "infini-gram" and not infini_gram_available():
                rows.append({"engine": engine, "target_tokens": size, "error": "infini-gram not installed"})
                continue
            tmp = tempfile.mkdtemp(prefix="sourcetrace-bench-", dir=workdir)
            cmd = [
                sys.executable,
                "-m",
                "sourcetrace.corpus.bench",
                engine,
                str(size),
                tmp,
                str(traces),
                str(seed),
            ]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
                if res.returncode:
                    rows.append({"engine": engine, "target_tokens": size, "error": res.stderr[-800:]})
                else:
                    rows.append({"target_tokens": size, **json.loads(res.stdout.strip().splitlines()[-1])})
            except subprocess.TimeoutExpired:
                rows.append(
                    {"engine": engine, "target_tokens": size, "error": f"timed out after {timeout_s} s"}
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "benchmark": "corpus-trace",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {
            "vocab": VOCAB,
            "doc_len": DOC_LEN,
            "output_tokens": 400,
            "traces": traces,
            "seed": seed,
            "trace": "min_len=4, no word boundaries (id tokens), density 0.05, 10 docs/span, BM25",
        },
        "results": rows,
        "target": "trace a 400-token output in <= 150 ms median on the 100M-token index",
    }
    atomic_write_json(out_dir / "corpus-trace.json", report)
    md = _markdown(report)
    atomic_write(out_dir / "corpus-trace.md", lambda tmp: Path(tmp).write_text(md))
    return report


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# corpus-trace",
        "",
        "Written by `sourcetrace bench corpus-trace`; do not edit by hand.",
        "",
        f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['platform']}, Python "
        f"{report['machine']['python']}. Corpus: generated Zipf tokens (50k vocabulary, u16), 1,000-token "
        "documents, 30% with a repeated 64-token passage. Outputs: 400 tokens, half copied fragments.",
        "",
        f"Target: {report['target']}.",
        "",
        "| engine | tokens | build s | build tok/s | peak RSS MB (self / indexer) | bytes/token | "
        "trace median ms | trace p95 ms | spans/trace | mining tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(
                f"| {r['engine']} | {r['target_tokens']:,} | error: {r['error'].splitlines()[-1][:80]} "
                "| | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['engine']} | {r['tokens']:,} | {r['build_s']:.1f} | {r['build_tokens_per_s']:,.0f} | "
            f"{r['peak_rss_mb']:.0f} / {r['peak_rss_children_mb']:.0f} | {r['bytes_per_token']:.1f} | "
            f"{r['trace_ms_median']:.1f} | {r['trace_ms_p95']:.1f} | {r['spans_per_trace_mean']:.1f} | "
            f"{r.get('mining_tokens_per_s', float('nan')):.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    eng, size, wd, n, sd = sys.argv[1:6]
    print(json.dumps(worker(eng, int(size), wd, int(n), int(sd))))

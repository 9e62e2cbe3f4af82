"""An embedded default for verbatim tracing: a generated corpus with planted passages and a tiny LM.

The corpus mixes three kinds of document:

- filler: random words, which a model cannot predict;
- planted: filler around one of a few passages, each passage planted in several documents, so a model
  memorises it and mining should find it and trace it to those documents ("memorisation"); each passage's
  prompt is the real start of one of its documents up to the passage's first few words, so the rest of the
  passage has to come from the model;
- records: `key : y1 .. y6 . again : y1 .. y6 .` with fresh random words, so a model learns to copy; the
  copy it generates after a new random key is fluent and confident but never occurs in the corpus
  ("synthetic coherence").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tokenizers import WordTokenizer

_SYL = ["ba", "ko", "ri", "mu", "te", "sa", "lo", "ne", "vi", "du", "pa", "zo", "ke", "mi", "ru", "fa"]


def _words(rng: np.random.Generator, n: int, syllables: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(_SYL, size=syllables))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass
class DemoCorpus:
    """Documents plus what was planted in them."""

    docs: list[dict[str, Any]]
    passages: list[str]
    passage_docs: list[list[str]]  # ids of the documents each passage was planted in
    prompts: list[str]  # the real start of a document holding each passage, up to the passage's first words
    key_words: list[str]
    record_prompt: str = "key :"
    settings: dict[str, Any] = field(default_factory=dict)


def make_demo_corpus(
    seed: int = 0,
    n_filler: int = 0,
    n_passages: int = 8,
    passage_len: int = 12,
    copies: tuple[int, int] = (4, 5),
    n_records: int = 80,
    prompt_words: int = 3,
) -> DemoCorpus:
    """Generate the demo corpus; every choice comes from `seed`."""
    rng = np.random.default_rng(seed)
    taken: set[str] = {"key", "again"}
    filler = _words(rng, 80, 2, taken)
    keys = _words(rng, 40, 2, taken)
    passage_words = _words(rng, n_passages * passage_len, 3, taken)
    passages = [" ".join(passage_words[i * passage_len : (i + 1) * passage_len]) for i in range(n_passages)]

    def fill(n: int) -> str:
        return " ".join(rng.choice(filler, size=n))

    docs: list[dict[str, Any]] = []
    for i in range(n_filler):
        docs.append({"id": f"filler-{i}", "text": fill(int(rng.integers(10, 25))) + " .", "title": "filler"})
    passage_docs: list[list[str]] = []
    prompts: list[str] = []
    for p, text in enumerate(passages):
        ids = []
        for c in range(int(rng.integers(copies[0], copies[1] + 1))):
            doc_id = f"planted-{p}-{c}"
            before = fill(int(rng.integers(2, 7)))
            body = f"{before} {text} {fill(int(rng.integers(2, 7)))} ."
            docs.append(
                {"id": doc_id, "text": body, "title": f"passage {p}", "url": f"https://example.org/{p}/{c}"}
            )
            ids.append(doc_id)
            if c == 0:
                # the prompt is the real start of the passage's first document, up to the passage's first
                # words (a training-data prefix, as in extraction attacks); the rest must be generated
                prompts.append(before + " " + " ".join(text.split()[:prompt_words]))
        passage_docs.append(ids)
    for i in range(n_records):
        y = " ".join(rng.choice(keys, size=6))
        docs.append({"id": f"record-{i}", "text": f"key : {y} . again : {y} .", "title": "record"})
    order = rng.permutation(len(docs))
    docs = [docs[i] for i in order]
    return DemoCorpus(
        docs=docs,
        passages=passages,
        passage_docs=passage_docs,
        prompts=prompts,
        key_words=keys,
        settings={
            "seed": seed,
            "n_filler": n_filler,
            "n_passages": n_passages,
            "passage_len": passage_len,
            "copies": list(copies),
            "n_records": n_records,
        },
    )


def train_tiny_lm(
    texts: list[str],
    tokenizer: WordTokenizer,
    *,
    steps: int = 1500,
    seed: int = 0,
    n_positions: int = 48,
    batch_size: int = 16,
    lr: float = 5e-3,
) -> Any:
    """Train a 2-layer GPT-2 (64 wide) on `texts`, one document per sequence; seconds on a CPU."""
    import torch

    from ..errors import require

    transformers = require("transformers", "llm")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size + 1,
        n_positions=n_positions,
        n_layer=2,
        n_head=2,
        n_embd=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    pad = tokenizer.vocab_size  # an extra id, never predicted
    seqs = [tokenizer.encode(t)[:n_positions] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    labels = x.clone()
    labels[labels == pad] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    # A model this small runs fastest on one thread; more threads only fight over a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(seqs), (batch_size,), generator=g)
            out = model(input_ids=x[idx], labels=labels[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def planted_recall(report: Any, corpus: DemoCorpus, index: Any, window: int = 6) -> dict[str, Any]:
    """Share of planted passages that mining found.

    A passage counts as found when a mined span shares at least `window` consecutive tokens with it and
    tracing that shared part finds exactly the documents the passage was planted in.
    """
    found = []
    for p, text in enumerate(corpus.passages):
        words = index.encode(text).tolist()
        planted = set(corpus.passage_docs[p])
        hit = False
        for s in report.spans:
            a, b = _longest_common(s.ids, words)
            if b - a >= window:
                docs = {o.doc_id for o in index.occurrences(s.ids[a:b], limit=None)}
                hit = hit or docs == planted
        found.append(hit)
    return {"recall": sum(found) / len(found), "found": found}


def _longest_common(x: list[int], y: list[int]) -> tuple[int, int]:
    """The longest run of `x` that also occurs in `y`, as [start, end) in `x`."""
    best = (0, 0)
    for i in range(len(x)):
        for j in range(len(y)):
            k = 0
            while i + k < len(x) and j + k < len(y) and x[i + k] == y[j + k]:
                k += 1
            if k > best[1] - best[0]:
                best = (i, i + k)
    return best


def run_demo(
    workdir: str, *, engine: str = "auto", seed: int = 0, record_prompts: int = 4, progress: bool = False
) -> dict[str, Any]:
    """Build the demo corpus and its index, train the tiny LM, mine, and measure planted-passage recall."""
    from .index import CorpusIndex
    from .mining import mine_low_perplexity

    corpus = make_demo_corpus(seed=seed)
    tok = WordTokenizer.fit(d["text"] for d in corpus.docs)
    index = CorpusIndex.build(corpus.docs, tok, workdir, engine=engine, progress=progress, overwrite=True)
    model = train_tiny_lm([d["text"] for d in corpus.docs], tok, seed=seed)
    rng = np.random.default_rng(seed + 1)
    generic = [
        f"{corpus.record_prompt} {' '.join(rng.choice(corpus.key_words, size=3))}"
        for _ in range(record_prompts)
    ]
    prompts = corpus.prompts + generic
    report = mine_low_perplexity(
        model, tok, prompts=prompts, index=index, max_new_tokens=20, seed=seed, samples_per_prompt=3
    )
    planted = planted_recall(report, corpus, index)
    generic_spans = [s for s in report.spans if s.sample >= 3 * len(corpus.prompts)]
    return {
        "corpus": corpus,
        "index": index,
        "model": model,
        "report": report,
        "tokenizer": tok,
        "recall": planted["recall"],
        "found": planted["found"],
        "generic_buckets": [s.bucket for s in generic_spans],
    }

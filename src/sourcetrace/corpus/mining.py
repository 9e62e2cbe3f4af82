"""Low-perplexity span mining ("Low-Perplexity LLM-Generated Sequences and Where To Find Them", 2025).

Generate from a causal LM (or take given texts), score every token's probability, keep windows of W tokens
whose every token has p >= threshold, chain overlapping windows into spans, flag spans copied from the
prompt or made of repetition, and look each span up in the corpus: its count, documents and bucket.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CorpusError, EmptyDataError
from .spans import Occurrence
from .tokenizers import Tokenizer, as_tokenizer

BUCKETS = ("synthetic coherence", "memorisation", "segmental replication", "frequent text")


def bucket(count: int) -> str:
    """The paper's buckets: 0, 1-5, 6-50, more than 50 occurrences."""
    if count <= 0:
        return BUCKETS[0]
    if count <= 5:
        return BUCKETS[1]
    if count <= 50:
        return BUCKETS[2]
    return BUCKETS[3]


@dataclass
class Sample:
    """One generated (or given) text with the probability of each of its tokens."""

    prompt: str | None
    text: str  # the continuation (or the whole given text)
    ids: list[int]  # prompt + continuation ids
    n_prompt: int
    probs: list[float]  # p(token | everything before); NaN where there is no prediction

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "n_prompt": self.n_prompt,
            "n_tokens": len(self.ids),
            "probs": [None if math.isnan(p) else round(p, 6) for p in self.probs],
        }


@dataclass
class Match:
    """A maximal part of a mined span that occurs verbatim in the corpus."""

    start: int  # offsets inside the span's index-token ids
    end: int
    ids: list[int]
    text: str
    count: int
    bucket: str
    docs: list[Occurrence] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "count": self.count,
            "bucket": self.bucket,
            "docs": [d.to_dict() for d in self.docs],
        }


@dataclass
class MinedSpan:
    """A chain of low-perplexity windows, with its flags and what the corpus says about it."""

    sample: int
    start: int  # token positions in the sample's ids
    end: int
    text: str
    ids: list[int]
    min_prob: float
    mean_prob: float
    in_prompt: bool
    degenerate: bool
    standalone_ppl: float
    count: int | None = None
    bucket: str | None = None
    docs: list[Occurrence] = field(default_factory=list)
    #: maximal parts of the span (>= window tokens) that occur verbatim in the corpus, with their documents
    matches: list[Match] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def flagged(self) -> bool:
        return self.in_prompt or self.degenerate

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample": self.sample,
            "start": self.start,
            "end": self.end,
            "length": self.length,
            "text": self.text,
            "min_prob": self.min_prob,
            "mean_prob": self.mean_prob,
            "in_prompt": self.in_prompt,
            "degenerate": self.degenerate,
            "standalone_ppl": self.standalone_ppl,
            "count": self.count,
            "bucket": self.bucket,
            "docs": [d.to_dict() for d in self.docs],
            "matches": [m.to_dict() for m in self.matches],
        }


@dataclass
class MiningReport:
    """Mined spans of every sample and a summary of where they come from."""

    samples: list[Sample]
    spans: list[MinedSpan]
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Share of spans found in the corpus, per-bucket shares, how occurrences spread over documents."""

        def shares(spans: list[MinedSpan]) -> dict[str, Any]:
            traced = [s for s in spans if s.count is not None]
            n = len(traced)
            per = Counter(s.bucket for s in traced)
            return {
                "spans": len(spans),
                "matched": sum(1 for s in traced if s.count),
                "matched_share": (sum(1 for s in traced if s.count) / n) if n else None,
                "buckets": {b: (per.get(b, 0) / n if n else None) for b in BUCKETS},
            }

        docs_per_span = Counter(min(len({d.doc_index for d in s.docs}), 11) for s in self.spans if s.count)
        by_doc: Counter[str] = Counter()
        for s in self.spans:
            for d in {o.doc_id for o in s.docs}:
                by_doc[d] += 1
        n_gen = sum(len(x.ids) - x.n_prompt for x in self.samples)
        return {
            "samples": len(self.samples),
            "tokens": n_gen,
            "all": shares(self.spans),
            "clean": shares([s for s in self.spans if not s.flagged]),
            "in_prompt": sum(s.in_prompt for s in self.spans),
            "degenerate": sum(s.degenerate for s in self.spans),
            "docs_per_matched_span": {
                ("11+" if k == 11 else str(k)): v for k, v in sorted(docs_per_span.items())
            },
            "top_documents": [{"doc_id": d, "spans": c} for d, c in by_doc.most_common(10)],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "summary": self.summary(),
            "samples": [s.to_dict() for s in self.samples],
            "spans": [s.to_dict() for s in self.spans],
        }

    def to_html(self, title: str = "sourcetrace: low-perplexity spans") -> str:
        from .report import mining_html

        return mining_html(self, title=title)

    def __rich__(self) -> Any:
        from .report import mining_renderable

        return mining_renderable(self)


# ---------------------------------------------------------------------- model plumbing


def _logits(model: Any, ids: Any) -> Any:
    out = model(input_ids=ids) if hasattr(model, "config") else model(ids)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, tuple | list):
        return out[0]
    return out


def _max_len(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _device(model: Any) -> Any:
    params = getattr(model, "parameters", None)
    p = next(iter(params()), None) if callable(params) else None
    return p.device if p is not None else "cpu"


def token_probs(model: Any, ids: Sequence[int]) -> np.ndarray:
    """p(ids[t] | ids[:t]) for every t by teacher forcing; NaN at t = 0 (and beyond the model's context)."""
    import torch

    ids = [int(i) for i in ids]
    out = np.full(len(ids), np.nan)
    if len(ids) < 2:
        return out
    max_len = _max_len(model) or len(ids)
    device = _device(model)
    start = 0
    with torch.no_grad():
        while start < len(ids) - 1:
            # windows of at most max_len tokens; after the first, half of each window is context
            lo = max(0, start - max_len // 2) if start else 0
            hi = min(len(ids), lo + max_len)
            x = torch.tensor([ids[lo:hi]], device=device)
            logits = _logits(model, x)
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            tgt = torch.tensor(ids[lo + 1 : hi], device=device)
            p = logp[:-1].gather(1, tgt[:, None])[:, 0].exp().cpu().numpy()
            first = max(start + 1, lo + 1)
            out[first:hi] = p[first - lo - 1 :]
            start = hi - 1
    return out


def generate(
    model: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.7,
    top_k: int | None = 20,
    top_p: float | None = 0.8,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
) -> list[int]:
    """Sample a continuation (temperature, top-k, top-p); works for HF causal LMs and plain logits modules."""
    import torch

    if temperature < 0:
        raise CorpusError("temperature must be >= 0 (0 means greedy)")
    g = torch.Generator().manual_seed(seed)
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise CorpusError("generation needs a prompt of at least one token")
    max_len = _max_len(model)
    device = _device(model)
    new: list[int] = []
    stop = set(int(s) for s in stop_ids)
    # No key-value cache: every step re-reads the (bounded) context, which keeps this one code path for
    # HF models and plain modules; generations here are short.
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ctx = ids[-max_len:] if max_len is not None else ids
            logits = _logits(model, torch.tensor([ctx], device=device))
            nxt = _sample(logits[0, -1].float().cpu(), temperature, top_k, top_p, g)
            ids.append(nxt)
            new.append(nxt)
            if nxt in stop:
                break
    return new


def _sample(logits: Any, temperature: float, top_k: int | None, top_p: float | None, g: Any) -> int:
    import torch

    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:  # only the k best candidates go on; sorting them is cheap
        vals, cand = torch.topk(logits, min(top_k, logits.numel()))
    else:
        vals, cand = torch.sort(logits, descending=True)
    probs = torch.softmax(vals, dim=-1)
    if top_p is not None and top_p < 1.0:
        keep = probs.cumsum(0) - probs < top_p  # the smallest prefix reaching top_p
        probs = probs * keep
        probs = probs / probs.sum()
    return int(cand[torch.multinomial(probs, 1, generator=g)])


# ---------------------------------------------------------------------- spans


def low_perplexity_runs(
    probs: Sequence[float], *, window: int = 6, threshold: float = 0.9, start: int = 0
) -> list[tuple[int, int]]:
    """Chains of overlapping W-token windows (stride 1) whose every token has p >= threshold.

    Overlapping windows chain into one span, which is the same as a run of at least W consecutive
    high-probability tokens; only positions >= `start` take part (the generated part).
    """
    if window < 1:
        raise CorpusError("window must be at least 1 token")
    p = np.asarray(probs, dtype=float)
    ok = np.zeros(len(p), dtype=bool)
    ok[start:] = np.nan_to_num(p[start:], nan=-1.0) >= threshold
    out = []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        if b - a >= window:
            out.append((int(a), int(b)))
    return out


def is_degenerate(ids: Sequence[int]) -> bool:
    """Repetition: the span repeats a unit of at most half its length, or half its tokens are repeats."""
    ids = list(ids)
    n = len(ids)
    if n < 2:
        return False
    for period in range(1, n // 2 + 1):
        if all(ids[i] == ids[i + period] for i in range(n - period)):
            return True
    return len(set(ids)) < n / 2


def _contains(hay: Sequence[int], needle: Sequence[int]) -> bool:
    m = len(needle)
    return m > 0 and any(list(hay[i : i + m]) == list(needle) for i in range(len(hay) - m + 1))


def mine_low_perplexity(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | None = None,
    texts: Sequence[str] | None = None,
    *,
    index: Any = None,
    window: int = 6,
    threshold: float = 0.9,
    temperature: float = 0.7,
    top_k: int | None = 20,
    top_p: float | None = 0.8,
    max_new_tokens: int = 100,
    samples_per_prompt: int = 1,
    seed: int = 0,
    docs_per_span: int = 10,
    context: int = 20,
    progress: bool = False,
) -> MiningReport:
    """Mine low-perplexity spans from generations of `prompts` (or from given `texts`) and trace them.

    Defaults follow the paper: T=0.7, top-k 20, top-p 0.8, 100 new tokens, windows of 6 tokens with
    p >= 0.9. With `index` (a CorpusIndex) every span gets its corpus count, documents and bucket; a model
    tokenizer other than the index's is bridged by decoding the span and re-encoding it.
    """
    from tqdm.auto import tqdm

    tok: Tokenizer = as_tokenizer(tokenizer)
    if (prompts is None) == (texts is None):
        raise CorpusError("pass either prompts (to generate from) or texts (to score), not both or neither")
    items = list(prompts if prompts is not None else texts)  # type: ignore[arg-type]
    if not items:
        raise EmptyDataError("no prompts or texts to mine")
    samples: list[Sample] = []
    for i, item in enumerate(tqdm(items, desc="mine", unit="text", disable=not progress)):
        if prompts is not None:
            p_ids = tok.encode(item)
            for r in range(samples_per_prompt):
                new = generate(
                    model,
                    p_ids,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seed=seed + 1000 * i + r,
                )
                ids = p_ids + new
                samples.append(
                    Sample(item, tok.decode(new), ids, len(p_ids), token_probs(model, ids).tolist())
                )
        else:
            ids = tok.encode(item)
            samples.append(Sample(None, item, ids, 0, token_probs(model, ids).tolist()))

    spans: list[MinedSpan] = []
    for k, smp in enumerate(samples):
        start = max(smp.n_prompt, 1)
        for a, b in low_perplexity_runs(smp.probs, window=window, threshold=threshold, start=start):
            sid = smp.ids[a:b]
            p = np.asarray(smp.probs[a:b])
            sp = token_probs(model, sid)[1:]
            ppl = float(np.exp(-np.mean(np.log(np.clip(sp, 1e-12, 1.0))))) if sp.size else float("nan")
            spans.append(
                MinedSpan(
                    sample=k,
                    start=a,
                    end=b,
                    text=tok.decode(sid),
                    ids=list(sid),
                    min_prob=float(p.min()),
                    mean_prob=float(p.mean()),
                    in_prompt=_contains(smp.ids[: smp.n_prompt], sid),
                    degenerate=is_degenerate(sid),
                    standalone_ppl=ppl,
                )
            )
    if index is not None:
        same = index.tokenizer.fingerprint == tok.fingerprint
        for s in spans:
            q = s.ids if same else index.encode(s.text.strip())
            if len(q) == 0:
                s.count, s.bucket = 0, bucket(0)
                continue
            s.count = index.count(q)
            s.bucket = bucket(s.count)
            if s.count:
                s.docs = index.occurrences(q, limit=docs_per_span, window=context)
            q = np.asarray(q, dtype=np.int64)
            for m in index.maximal_spans(q, min_len=window):
                sub = q[m.start : m.end]
                s.matches.append(
                    Match(
                        m.start,
                        m.end,
                        sub.tolist(),
                        m.text,
                        m.count,
                        bucket(m.count),
                        index.occurrences(sub, limit=docs_per_span, window=context),
                    )
                )
    settings = {
        "window": window,
        "threshold": threshold,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "samples_per_prompt": samples_per_prompt,
        "seed": seed,
        "mode": "generate" if prompts is not None else "texts",
        "index": str(index.path) if index is not None else None,
    }
    return MiningReport(samples=samples, spans=spans, settings=settings)

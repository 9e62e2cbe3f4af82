"""Low-perplexity span mining ("Low-Perplexity LLM-Generated Sequences and Where To Find Them", 2025).

Generate from a causal LM (or take given texts), score every token's probability, keep windows of W tokens
whose every token has p >= threshold, chain overlapping windows into spans, flag spans copied from the
prompt or made of repetition, and look each span up in the corpus: its count, documents and bucket.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CorpusError, EmptyDataError
from .sources import progress_bar
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


def _vocab_size(model: Any) -> int:
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if isinstance(v, int) and v > 0 else 1 << 16


def _device(model: Any) -> Any:
    params = getattr(model, "parameters", None)
    p = next(iter(params()), None) if callable(params) else None
    return p.device if p is not None else "cpu"


def _is_hf(model: Any) -> bool:
    """A Hugging Face causal LM: takes attention masks, position ids and a key-value cache."""
    return hasattr(model, "config") and hasattr(model, "generation_config")


def token_probs(model: Any, ids: Sequence[int]) -> np.ndarray:
    """p(ids[t] | ids[:t]) for every t by teacher forcing; NaN at t = 0.

    A sequence longer than the model's context is scored in windows of the context length, each after the
    first starting half a context back.
    """
    return token_probs_batch(model, [ids])[0]


def token_probs_batch(model: Any, seqs: Sequence[Sequence[int]], batch_size: int = 64) -> list[np.ndarray]:
    """`token_probs` of many sequences; those that fit the model's context go through it in batches."""
    import torch

    seqs = [[int(i) for i in q] for q in seqs]  # type: ignore[misc]  # now lists
    out = [np.full(len(q), np.nan) for q in seqs]
    max_len = _max_len(model)
    device = _device(model)
    short = [k for k, q in enumerate(seqs) if len(q) >= 2 and (max_len is None or len(q) <= max_len)]
    # right padding changes nothing before it in a causal model, so short sequences share a forward pass
    short.sort(key=lambda k: len(seqs[k]))
    vocab = _vocab_size(model)
    with torch.no_grad():
        g = 0
        while g < len(short):
            # at most batch_size rows, and logits of at most ~2^25 numbers per pass
            n = 1
            while (
                g + n < len(short) and n < batch_size and (n + 1) * len(seqs[short[g + n]]) * vocab <= 1 << 25
            ):
                n += 1
            group = short[g : g + n]
            g += n
            width = len(seqs[group[-1]])
            x = torch.zeros((len(group), width), dtype=torch.long)
            for r, k in enumerate(group):
                x[r, : len(seqs[k])] = torch.tensor(seqs[k])
            x = x.to(device)
            got = _chosen_probs(_logits(model, x)[:, :-1], x[:, 1:]).cpu().numpy()
            for r, k in enumerate(group):
                out[k][1:] = got[r, : len(seqs[k]) - 1]
        for k, q in enumerate(seqs):
            if len(q) >= 2 and max_len is not None and len(q) > max_len:
                out[k] = _windowed_probs(model, list(q), max_len, device)
    return out


def _chosen_probs(logits: Any, chosen: Any) -> Any:
    """softmax(logits)[chosen] along the last axis (a softmax is several times faster than a logsumexp)."""
    import torch

    return torch.softmax(logits, dim=-1).gather(-1, chosen[..., None])[..., 0].double()


def _windowed_probs(model: Any, ids: list[int], max_len: int, device: Any) -> np.ndarray:
    import torch

    out = np.full(len(ids), np.nan)
    start = 0
    while start < len(ids) - 1:
        # windows of at most max_len tokens; after the first, half of each window is context
        lo = max(0, start - max_len // 2) if start else 0
        hi = min(len(ids), lo + max_len)
        x = torch.tensor([ids[lo:hi]], device=device)
        p = _chosen_probs(_logits(model, x)[0, :-1], x[0, 1:]).cpu().numpy()
        first = max(start + 1, lo + 1)
        out[first:hi] = p[first - lo - 1 :]
        start = hi - 1
    return out


@dataclass
class Generation:
    """A sampled continuation and p(token | everything before) for every token of prompt + continuation."""

    ids: list[int]  # the new tokens
    probs: np.ndarray  # over prompt + new tokens; NaN at position 0


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.7,
    top_k: int | None = 20,
    top_p: float | None = 0.8,
    seeds: Sequence[int] | None = None,
    stop_ids: Sequence[int] = (),
    batch_size: int = 64,
) -> list[Generation]:
    """Sample a continuation of every prompt (temperature, top-k, top-p; temperature 0 is greedy).

    Hugging Face causal LMs generate `batch_size` prompts at a time (left-padded) with their key-value
    cache; plain modules that return logits generate one prompt at a time without a cache. Each prompt
    samples from its own generator (`seeds[i]`, default i), so its tokens do not depend on the batch it
    is in. The probabilities are the model's own (temperature 1), the same as `token_probs` gives.
    """
    import torch

    if temperature < 0:
        raise CorpusError(f"temperature={temperature!r} must be >= 0 (0 means greedy)")
    if max_new_tokens < 1 or batch_size < 1:
        raise CorpusError("max_new_tokens and batch_size must be at least 1")
    prompts = [[int(i) for i in p] for p in prompts]  # type: ignore[misc]  # now lists
    if any(not p for p in prompts):
        raise CorpusError("generation needs prompts of at least one token")
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise CorpusError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
    gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds]
    max_len = _max_len(model)
    pick = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    stop = set(int(t) for t in stop_ids)
    new: list[list[int]] = [[] for _ in prompts]
    new_probs: list[list[float]] = [[] for _ in prompts]
    cached = [k for k, p in enumerate(prompts) if _is_hf(model) and (max_len is None or len(p) <= max_len)]
    for g in range(0, len(cached), batch_size):
        rows = cached[g : g + batch_size]
        _generate_cached(
            model,
            [list(prompts[k]) for k in rows],
            [new[k] for k in rows],
            [new_probs[k] for k in rows],
            [gens[k] for k in rows],
            max_new_tokens,
            max_len,
            pick,
            stop,
        )
    # rows with a plain module, and rows that outgrow the model's context: no cache, a sliding context
    for k, p in enumerate(prompts):
        _generate_uncached(model, list(p), new[k], new_probs[k], gens[k], max_new_tokens, max_len, pick, stop)
    out = []
    for p, n, pn, pp in zip(prompts, new, new_probs, token_probs_batch(model, prompts), strict=True):
        if max_len is not None and len(p) + len(n) > max_len:
            # scored in windows, as `token_probs` scores any sequence longer than the context
            out.append(Generation(n, token_probs(model, [*p, *n])))
        else:
            out.append(Generation(n, np.concatenate([pp, np.asarray(pn, dtype=float)])))
    return out


def _done(new: list[int], max_new_tokens: int, stop: set[int]) -> bool:
    return len(new) >= max_new_tokens or bool(new and new[-1] in stop)


def _generate_cached(
    model: Any,
    prompts: list[list[int]],
    new: list[list[int]],
    new_probs: list[list[float]],
    gens: list[Any],
    max_new_tokens: int,
    max_len: int | None,
    pick: dict[str, Any],
    stop: set[int],
) -> None:
    """Extend `new` (and the tokens' probabilities) in place while every row's context fits the model,
    reusing the key-value cache."""
    import torch

    device = _device(model)
    lens = [len(p) for p in prompts]
    width = max(lens)
    x = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        x[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    # transformers >= 5.25 calls the key-value cache `cache`, earlier versions `past_key_values`
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_arg = "cache" if "cache" in params else "past_key_values"
    past = None
    with torch.no_grad():
        for step in range(max_new_tokens):
            if max_len is not None and max(lens) + step > max_len:
                break  # the rest goes on without the cache, in a sliding context
            out = model(
                input_ids=x.to(device),
                attention_mask=mask.to(device),
                position_ids=pos.to(device),
                use_cache=True,
                **{cache_arg: past},
                **extra,  # logits of the last position only
            )
            past = getattr(out, cache_arg)
            last = out.logits[:, -1].cpu()
            nxt = torch.tensor(sample_batch(last, gens, **pick))
            chosen = _chosen_probs(last, nxt).tolist()
            for r in range(len(prompts)):
                if not _done(new[r], max_new_tokens, stop):
                    new[r].append(int(nxt[r]))
                    new_probs[r].append(chosen[r])
            if all(_done(n, max_new_tokens, stop) for n in new):
                break
            x = nxt[:, None]
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1


def _generate_uncached(
    model: Any,
    prompt: list[int],
    new: list[int],
    new_probs: list[float],
    gen: Any,
    max_new_tokens: int,
    max_len: int | None,
    pick: dict[str, Any],
    stop: set[int],
) -> None:
    """Extend `new` in place, re-reading the last `max_len` tokens at every step."""
    import torch

    device = _device(model)
    ids = prompt + new
    with torch.no_grad():
        while not _done(new, max_new_tokens, stop):
            ctx = ids[-max_len:] if max_len is not None else ids
            last = _logits(model, torch.tensor([ctx], device=device))[:, -1].cpu()
            nxt = sample_batch(last, [gen], **pick)[0]
            ids.append(nxt)
            new.append(nxt)
            new_probs.append(float(_chosen_probs(last[0], torch.tensor(nxt))))


def sample_next(
    logits: Any, *, temperature: float, top_k: int | None, top_p: float | None, generator: Any
) -> int:
    """One token from 1-D logits: greedy at temperature 0, else top-k, then top-p (nucleus) sampling."""
    return sample_batch(logits[None], [generator], temperature=temperature, top_k=top_k, top_p=top_p)[0]


def top_k_rows(x: Any, k: int, block: int = 128) -> tuple[Any, Any]:
    """`torch.topk(x, k, dim=-1)` of a [B, V] matrix, found in the k blocks with the largest maxima.

    The k largest values of a row lie in at most k blocks, each holding one of them, and each of those
    blocks has a maximum at least the k-th largest value; so the blocks with the k largest maxima hold
    them all. Searching k * block candidates instead of V is several times faster for large vocabularies.
    """
    import torch

    rows, vocab = x.shape
    if vocab < 4 * k * block:
        return torch.topk(x, k, dim=-1)
    nb = -(-vocab // block)
    if nb * block > vocab:
        x = torch.nn.functional.pad(x, (0, nb * block - vocab), value=float("-inf"))
    blocks = x.reshape(rows, nb, block)
    best = torch.topk(blocks.amax(-1), k, dim=-1).indices  # [rows, k]
    cand = blocks.gather(1, best[..., None].expand(rows, k, block)).reshape(rows, k * block)
    vals, at = torch.topk(cand, k, dim=-1)
    return vals, best.gather(1, at // block) * block + at % block


def sample_batch(
    logits: Any, generators: Sequence[Any], *, temperature: float, top_k: int | None, top_p: float | None
) -> list[int]:
    """One token per row of [B, V] logits; row r draws from `generators[r]`, so a row's token does not
    depend on the other rows."""
    import torch

    if temperature == 0:
        return [int(i) for i in logits.argmax(-1)]
    if top_k:  # only the k best candidates go on (dividing by the temperature keeps their order)
        vals, cand = top_k_rows(logits, min(top_k, logits.shape[-1]))
    else:
        vals, cand = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax((vals / temperature).double(), dim=-1)
    if top_p is not None and top_p < 1.0:
        keep = probs.cumsum(-1) - probs < top_p  # the smallest prefix reaching top_p
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return [int(cand[r, torch.multinomial(probs[r], 1, generator=g)]) for r, g in enumerate(generators)]


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
    batch_size: int = 64,
    progress: bool = False,
) -> MiningReport:
    """Mine low-perplexity spans from generations of `prompts` (or from given `texts`) and trace them.

    Defaults follow the paper: T=0.7, top-k 20, top-p 0.8, 100 new tokens, windows of 6 tokens with
    p >= 0.9. Prompts are generated `batch_size` at a time with the model's key-value cache (see
    `generate`); sample r of prompt i uses seed `seed + 1000 * i + r`. With `index` (a CorpusIndex) every
    span gets its corpus count, documents and bucket, and its maximal parts of at least `window` words
    that occur in the corpus (`matches`); a model tokenizer other than the index's is bridged by decoding
    the span and re-encoding it.
    """
    check_mining_options(
        window=window,
        threshold=threshold,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        samples_per_prompt=samples_per_prompt,
        docs_per_span=docs_per_span,
        context=context,
        batch_size=batch_size,
    )
    tok: Tokenizer = as_tokenizer(tokenizer)
    if (prompts is None) == (texts is None):
        raise CorpusError("pass either prompts (to generate from) or texts (to score), not both or neither")
    items = list(prompts if prompts is not None else texts)  # type: ignore[arg-type]
    if not items:
        raise EmptyDataError("no prompts or texts to mine")
    samples: list[Sample] = []
    if prompts is not None:
        encoded = [tok.encode(item) for item in items]
        rows = [(i, r) for i in range(len(items)) for r in range(samples_per_prompt)]
        with progress_bar(total=len(rows), desc="generate", unit="sample", disable=not progress) as bar:
            for g in range(0, len(rows), batch_size):
                chunk = rows[g : g + batch_size]
                gens = generate(
                    model,
                    [encoded[i] for i, _ in chunk],
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seeds=[seed + 1000 * i + r for i, r in chunk],
                    batch_size=batch_size,
                )
                for (i, _), gen in zip(chunk, gens, strict=True):
                    p_ids = encoded[i]
                    samples.append(
                        Sample(items[i], tok.decode(gen.ids), p_ids + gen.ids, len(p_ids), gen.probs.tolist())
                    )
                bar.update(len(chunk))
    else:
        encoded = [tok.encode(item) for item in items]
        for item, ids, pr in zip(items, encoded, token_probs_batch(model, encoded, batch_size), strict=True):
            samples.append(Sample(None, item, ids, 0, pr.tolist()))

    spans: list[MinedSpan] = []
    for k, smp in enumerate(samples):
        start = max(smp.n_prompt, 1)
        for a, b in low_perplexity_runs(smp.probs, window=window, threshold=threshold, start=start):
            sid = smp.ids[a:b]
            p = np.asarray(smp.probs[a:b])
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
                    standalone_ppl=float("nan"),
                )
            )
    # the perplexity of each span read on its own, without the text before it
    for s, sp in zip(spans, token_probs_batch(model, [s.ids for s in spans], batch_size), strict=True):
        if len(sp) > 1:
            s.standalone_ppl = float(np.exp(-np.mean(np.log(np.clip(sp[1:], 1e-12, 1.0)))))
    if index is not None:
        _trace_spans(index, tok, spans, window, docs_per_span, context)
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


def _trace_spans(
    index: Any, tok: Tokenizer, spans: list[MinedSpan], window: int, docs_per_span: int, context: int
) -> None:
    """Counts, documents, buckets and matching parts of every span, the longest matches found in one pass."""
    same = index.tokenizer.fingerprint == tok.fingerprint
    queries = [s.ids if same else s.text.strip() for s in spans]
    found = index.maximal_spans_batch(queries, min_len=window, word_boundary=True)
    for s, q, parts in zip(spans, queries, found, strict=True):
        ids = index.encode(q)
        if len(ids) == 0:
            s.count, s.bucket = 0, bucket(0)
            continue
        s.count = index.count(ids)
        s.bucket = bucket(s.count)
        if s.count:
            s.docs = index.occurrences(ids, limit=docs_per_span, window=context)
        for m in parts:
            sub = ids[m.start : m.end]
            occ = index.occurrences(sub, limit=docs_per_span, window=context)
            s.matches.append(Match(m.start, m.end, sub.tolist(), m.text, m.count, bucket(m.count), occ))


def check_mining_options(**options: Any) -> None:
    """Refuse mining options (keywords of `mine_low_perplexity`, checked where given) that cannot mean
    anything, before any work is done."""
    whole = {"window": 1, "max_new_tokens": 1, "samples_per_prompt": 1, "docs_per_span": 1, "batch_size": 1,
             "context": 0, "top_k": 1}
    for name, low in whole.items():
        v = options.get(name, low)
        if name == "top_k" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise CorpusError(f"{name}={v!r} must be a whole number >= {low}")
    threshold, temperature = options.get("threshold", 0.0), options.get("temperature", 0.0)
    top_p = options.get("top_p")
    if not (isinstance(threshold, int | float) and 0 <= threshold <= 1):
        raise CorpusError(f"threshold={threshold!r} must be a probability in [0, 1]")
    if not (isinstance(temperature, int | float) and temperature >= 0):
        raise CorpusError(f"temperature={temperature!r} must be >= 0 (0 means greedy)")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise CorpusError(f"top_p={top_p!r} must be a probability in (0, 1]")

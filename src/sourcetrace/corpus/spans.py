"""Span results and the OLMoTrace span logic: maximal spans, ranking, density, merging, BM25 re-ranking."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Occurrence:
    """One place in the corpus where a token sequence occurs."""

    doc_index: int  # position of the document in the index (0-based)
    doc_id: str
    offset: int  # token offset of the match inside the document
    length: int
    meta: dict[str, Any] = field(default_factory=dict)
    before: str = ""
    match: str = ""
    after: str = ""
    context_ids: list[int] = field(default_factory=list, repr=False)
    bm25: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("context_ids")
        return d


@dataclass
class Span:
    """A run of tokens `[start, end)` of a traced text that occurs verbatim in the corpus."""

    start: int
    end: int
    count: int
    text: str = ""
    unigram_logprob: float = 0.0
    docs: list[Occurrence] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "length": self.length,
            "count": self.count,
            "text": self.text,
            "unigram_logprob": self.unigram_logprob,
            "docs": [d.to_dict() for d in self.docs],
        }


def select_maximal(
    lengths: np.ndarray,
    *,
    min_len: int = 1,
    edges: tuple[np.ndarray, np.ndarray] | None = None,
    delimiters: np.ndarray | None = None,
    size: Callable[[int, int], int] | None = None,
) -> list[tuple[int, int]]:
    """Turn per-position longest matches into maximal spans, as OLMoTrace does.

    For each start `l` the span is `[l, l + lengths[l])`, cut after the first delimiter token and, with
    `edges` (from `word_edges`), shortened to the longest part that starts and ends with a whole word.
    Maximality is decided on these final spans: one is kept only if it reaches past the right end of the
    previous kept span, so none is contained in another. Spans whose `size(a, b)` (default: tokens) is
    below `min_len` are dropped.
    """
    L = len(lengths)
    out: list[tuple[int, int]] = []
    last_end = 0
    delim_pos = np.flatnonzero(delimiters) if delimiters is not None else np.zeros(0, dtype=np.int64)
    if edges is not None:
        can_start, can_end = edges
        # the largest allowed end <= r, for every r
        end_at_most = np.maximum.accumulate(np.where(can_end, np.arange(L + 1), -1))
    for lft in range(L):
        r = lft + int(lengths[lft])
        if r <= lft:
            continue
        if delim_pos.size:
            k = np.searchsorted(delim_pos, lft)
            if k < delim_pos.size and delim_pos[k] < r:
                r = int(delim_pos[k]) + 1
        if edges is not None:
            if not can_start[lft]:
                continue
            r = int(end_at_most[r])
        if r <= last_end or r <= lft:
            continue
        if (size(lft, r) if size is not None else r - lft) < max(min_len, 1):
            continue
        out.append((lft, r))
        last_end = r
    return out


RANKINGS = ("unigram", "length")


def keep_densest(spans: list[Span], n_tokens: int, density: float | None, rank_by: str) -> list[Span]:
    """Keep the K = ceil(density * n_tokens) best spans (longest, or lowest unigram log-probability sum)."""
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be 'length' or 'unigram', not {rank_by!r}")
    if rank_by == "length":
        ranked = sorted(spans, key=lambda s: (-s.length, s.start))
    else:
        ranked = sorted(spans, key=lambda s: (s.unigram_logprob, s.start))
    if density is not None:
        ranked = ranked[: max(1, math.ceil(density * n_tokens))] if spans else []
    return sorted(ranked, key=lambda s: s.start)


def merge_spans(spans: Sequence[Span]) -> list[dict[str, Any]]:
    """Overlapping spans become one highlight: `[{"start", "end", "spans": [indices]}]`."""
    merged: list[dict[str, Any]] = []
    for i, s in sorted(enumerate(spans), key=lambda t: (t[1].start, t[1].end)):
        if merged and s.start < merged[-1]["end"]:
            merged[-1]["end"] = max(merged[-1]["end"], s.end)
            merged[-1]["spans"].append(i)
        else:
            merged.append({"start": s.start, "end": s.end, "spans": [i]})
    return merged


def bm25_scores(
    docs: Sequence[Sequence[int]], query: Sequence[int], k1: float = 1.5, b: float = 0.75
) -> np.ndarray:
    """Okapi BM25 of each document against the query, statistics taken over `docs` (as rank_bm25 does)."""
    n = len(docs)
    if n == 0:
        return np.zeros(0)
    tfs = [Counter(int(t) for t in d) for d in docs]
    lens = np.array([len(d) for d in docs], dtype=float)
    avgdl = lens.mean() if lens.mean() > 0 else 1.0
    df: Counter[int] = Counter()
    for tf in tfs:
        df.update(tf.keys())
    out = np.zeros(n)
    for t, qn in Counter(int(t) for t in query).items():
        nt = df.get(t, 0)
        if nt == 0:
            continue
        idf = math.log((n - nt + 0.5) / (nt + 0.5) + 1.0)
        for i, tf in enumerate(tfs):
            f = tf.get(t, 0)
            if f:
                out[i] += qn * idf * f * (k1 + 1) / (f + k1 * (1 - b + b * lens[i] / avgdl))
    return out

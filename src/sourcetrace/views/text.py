"""Text helpers of the views: keyword summaries (TF-IDF) and word-level diffs."""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

WORD = re.compile(r"[^\W\d_][\w'-]*", re.UNICODE)
STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "been", "but", "by", "for", "from", "had", "has", "have",
    "he", "her", "his", "i", "if", "in", "into", "is", "it", "its", "me", "my", "no", "not", "of", "on",
    "or", "our", "she", "so", "that", "the", "their", "them", "then", "there", "these", "they", "this",
    "to", "was", "we", "were", "what", "when", "which", "who", "will", "with", "you", "your",
))


def words(text: str) -> list[str]:
    """Lower-cased words of a text, without stop words (what keyword summaries count)."""
    return [w for w in (m.group().lower() for m in WORD.finditer(text)) if w not in STOPWORDS and len(w) > 1]


class Keywords:
    """TF-IDF keywords of a few shown texts, scored against a whole training set (as LLM Attributor does).

    idf uses the smoothed form log((1 + N) / (1 + df)) + 1, so a word in every document still counts a little.
    """

    def __init__(self, corpus: Sequence[str]):
        self.n = len(corpus)
        df: Counter[str] = Counter()
        for text in corpus:
            df.update(set(words(text)))
        self.df = df

    def idf(self, word: str) -> float:
        return math.log((1 + self.n) / (1 + self.df.get(word, 0))) + 1

    def top(self, texts: Sequence[str], k: int = 10) -> list[tuple[str, float]]:
        """The k words with the highest tf·idf over the given texts (tf: share of their words)."""
        tf = Counter(w for t in texts for w in words(t))
        total = sum(tf.values())
        if not total:
            return []
        scored = sorted(((w, c / total * self.idf(w)) for w, c in tf.items()), key=lambda x: (-x[1], x[0]))
        return [(w, round(s, 5)) for w, s in scored[:k]]


def word_diff(a: Sequence[str], b: Sequence[str]) -> dict[str, Any]:
    """A word-level diff of token lists `a` (the model's) and `b` (the user's).

    Returns the opcodes, the positions of `a` that were removed or replaced and the positions of `b` that were
    added or replaced: the selections the compare view attributes on each side.
    """
    norm_a = [t.strip().lower() for t in a]
    norm_b = [t.strip().lower() for t in b]
    ops: list[dict[str, Any]] = []
    removed: list[int] = []
    added: list[int] = []
    for tag, i0, i1, j0, j1 in difflib.SequenceMatcher(a=norm_a, b=norm_b, autojunk=False).get_opcodes():
        ops.append({"op": tag, "a": [i0, i1], "b": [j0, j1]})
        if tag in ("delete", "replace"):
            removed.extend(range(i0, i1))
        if tag in ("insert", "replace"):
            added.extend(range(j0, j1))
    return {"ops": ops, "removed": removed, "added": added}


def joiner(tokens: Sequence[str]) -> str:
    """How tokens are shown together: as-is when they carry their own spaces (BPE), else with spaces."""
    return "" if any(t[:1].isspace() or t[-1:].isspace() for t in tokens) else " "

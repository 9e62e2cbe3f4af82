"""Low-perplexity mining: window chaining, flags, buckets, probabilities, and the end-to-end demo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sourcetrace.corpus import CorpusIndex, WordTokenizer
from sourcetrace.corpus.mining import (
    bucket,
    generate,
    is_degenerate,
    low_perplexity_runs,
    mine_low_perplexity,
    token_probs,
)
from sourcetrace.errors import CorpusError, EmptyDataError


def test_windows_chain_into_runs():
    p = [np.nan, 0.95, 0.99, 0.91, 0.97, 0.93, 0.9, 0.5, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.2]
    # 1..6 is exactly one window; 8..14 is two overlapping windows chained
    assert low_perplexity_runs(p, window=6, threshold=0.9) == [(1, 7), (8, 15)]
    assert low_perplexity_runs(p, window=6, threshold=0.9, start=2) == [(8, 15)]
    assert low_perplexity_runs(p, window=8, threshold=0.9) == []
    # brute force: union of all qualifying windows
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.choice([0.5, 0.95], size=30)
        w = int(rng.integers(1, 7))
        cover = np.zeros(30, dtype=bool)
        for i in range(30 - w + 1):
            if (q[i : i + w] >= 0.9).all():
                cover[i : i + w] = True
        runs = low_perplexity_runs(q, window=w, threshold=0.9)
        got = np.zeros(30, dtype=bool)
        for a, b in runs:
            got[a:b] = True
        assert (got == cover).all()


def test_buckets_and_flags():
    assert [bucket(c) for c in (0, 1, 5, 6, 50, 51)] == [
        "synthetic coherence",
        "memorisation",
        "memorisation",
        "segmental replication",
        "segmental replication",
        "frequent text",
    ]
    assert is_degenerate([1, 2, 1, 2, 1, 2]) and is_degenerate([3, 3, 3, 3, 3, 3])
    assert not is_degenerate([1, 2, 3, 4, 5, 6])


class Bigram(torch.nn.Module):
    """A plain module returning logits: token t -> t + 1 with probability ~0.99."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*ids.shape, self.vocab), -10.0, dtype=torch.float64)
        logits.scatter_(-1, ((ids + 1) % self.vocab)[..., None], 0.0)
        return logits


def test_token_probs_and_generation_with_plain_module():
    m = Bigram(10)
    p = token_probs(m, [1, 2, 3, 5])
    assert math.isnan(p[0])
    expect = 1 / (1 + 9 * math.exp(-10))
    assert p[1] == pytest.approx(expect) and p[2] == pytest.approx(expect) and p[3] < 1e-3
    assert generate(m, [3], max_new_tokens=4, temperature=0) == [4, 5, 6, 7]
    assert generate(m, [3], max_new_tokens=4) == [4, 5, 6, 7]  # top-p 0.8 keeps only the best token


def test_mining_with_index_and_flags(tmp_path):
    words = [f"w{i}" for i in range(10)]
    tok = WordTokenizer(["<unk>", *words])
    m = Bigram(tok.vocab_size)  # id k -> k + 1, i.e. w(k-1) -> wk
    idx = CorpusIndex.build(
        ["w1 w2 w3 w4 w5 w6 w7 w8", "w0 w9"], tok, tmp_path / "ix", engine="portable", progress=False
    )
    rep = mine_low_perplexity(m, tok, prompts=["w0"], index=idx, max_new_tokens=10)
    s = rep.spans[0]
    assert s.start == 1 and s.text.strip().startswith("w1 w2 w3 w4 w5 w6")
    assert (
        s.count == 0 and s.bucket == "synthetic coherence"
    )  # runs on past w8 (w9 <unk> w0): never in the corpus
    assert any(m_.text.strip() == "w1 w2 w3 w4 w5 w6 w7 w8" and m_.count == 1 for m_ in s.matches)
    rep2 = mine_low_perplexity(m, tok, texts=["w2 w3 w4 w5 w6 w7 w8"], index=idx)
    s2 = rep2.spans[0]
    assert (s2.start, s2.end, s2.count, s2.bucket) == (1, 7, 1, "memorisation")
    assert [d.doc_id for d in s2.docs] == ["0"] and not s2.in_prompt and not s2.degenerate
    rep3 = mine_low_perplexity(m, tok, prompts=["w3 w4 w5 w6 w7 w8 w9 mystery w0 w1 w2"], max_new_tokens=6)
    assert rep3.spans and rep3.spans[0].in_prompt  # it generates "w3 w4 w5 w6 w7 w8", copied from the prompt
    summ = rep2.summary()
    assert summ["all"]["matched_share"] == 1.0 and summ["all"]["buckets"]["memorisation"] == 1.0
    assert "<mark" in rep2.to_html()
    with pytest.raises(CorpusError):
        mine_low_perplexity(m, tok)
    with pytest.raises(EmptyDataError):
        mine_low_perplexity(m, tok, texts=[])
    idx.close()


@pytest.mark.slow
def test_demo_finds_planted_passages(tmp_path):
    """End to end: tiny LM trained on a generated corpus; mining recovers the planted passages.

    About 15-20 s of CPU on one thread (1,500 training steps of a 2-layer GPT-2), hence `slow`. Seeds 0-9
    all reach recall 1.0, every generated passage token at p >= 0.998, so one fixed seed is a fair check.
    """
    from sourcetrace.corpus.demo import run_demo

    out = run_demo(str(tmp_path / "demo"), engine="auto")
    assert out["recall"] >= 0.9, out["found"]
    # the copies it makes of fresh random keys are confident but new: "synthetic coherence"
    generic = out["generic_buckets"]
    assert generic and generic.count("synthetic coherence") / len(generic) >= 0.75
    out["index"].close()

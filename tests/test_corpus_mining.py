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
    sample_next,
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
    assert generate(m, [[3]], max_new_tokens=4, temperature=0)[0].ids == [4, 5, 6, 7]
    assert generate(m, [[3]], max_new_tokens=4)[0].ids == [4, 5, 6, 7]  # top-p 0.8 keeps the best token


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


# ---------------------------------------------------------------------- cached, batched generation


def reference_generate(model, prompt, n_new, seed, **pick):
    """The uncached path: re-read the whole (last max_len tokens of the) context at every step, one prompt
    at a time, then score the sequence by teacher forcing in one pass."""
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    max_len = model.config.n_positions
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(input_ids=torch.tensor([ids[-max_len:]])).logits[0, -1].double()
            ids.append(sample_next(logits, generator=g, **pick))
        if len(ids) > max_len:
            return ids[len(prompt) :], None
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
        probs = logp[:-1].gather(1, x[0, 1:, None])[:, 0].exp().numpy()
    return ids[len(prompt) :], np.concatenate([[np.nan], probs])


@pytest.fixture(scope="module")
def gpt2():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=50, n_positions=40, n_layer=2, n_head=2, n_embd=16, bos_token_id=None, eos_token_id=None
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


@pytest.mark.parametrize(
    "pick",
    [
        {"temperature": 0.0, "top_k": None, "top_p": None},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.8},
        {"temperature": 1.3, "top_k": None, "top_p": None},
    ],
)
def test_cached_batched_generation_equals_the_uncached_path(gpt2, pick):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 50, size=int(n)).tolist() for n in (1, 5, 12, 3, 8)]
    seeds = [11, 12, 13, 14, 15]
    shapes = []
    hook = gpt2.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    gens = generate(gpt2, prompts, max_new_tokens=15, seeds=seeds, batch_size=3, **pick)
    hook.remove()
    # two batches (3 + 2 prompts), each one pass over the prompts and then one token per row per step
    assert shapes[0] == (3, 12) and shapes[1:15] == [(3, 1)] * 14 and shapes[15] == (2, 8)
    for p, sd, gen in zip(prompts, seeds, gens, strict=True):
        ids, probs = reference_generate(gpt2, p, 15, sd, **pick)
        assert gen.ids == ids
        np.testing.assert_allclose(np.log(gen.probs[1:]), np.log(probs[1:]), rtol=0, atol=1e-10)
        assert math.isnan(gen.probs[0])
    # a prompt's tokens do not depend on the batch it is generated in
    alone = generate(gpt2, prompts[2:3], max_new_tokens=15, seeds=seeds[2:3], **pick)
    assert alone[0].ids == gens[2].ids


def test_generation_past_the_context_slides_like_the_uncached_path(gpt2):
    """Prompts of 30 and 38 tokens with 12 new tokens outgrow the 40-token context: the cache stops and the
    remaining tokens are generated from the last 40 tokens, as the uncached path does."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 50, size=n).tolist() for n in (30, 38, 4)]
    gens = generate(
        gpt2, prompts, max_new_tokens=12, temperature=0.9, top_k=None, top_p=None, seeds=[1, 2, 3]
    )
    for p, sd, gen in zip(prompts, [1, 2, 3], gens, strict=True):
        ids, _ = reference_generate(gpt2, p, 12, sd, temperature=0.9, top_k=None, top_p=None)
        assert gen.ids == ids
        np.testing.assert_allclose(gen.probs, token_probs(gpt2, p + ids), rtol=0, atol=1e-12)


def test_mining_options_are_checked_before_any_work(gpt2):
    tok = WordTokenizer(["<unk>", "a", "b"])
    for bad in ({"window": 0}, {"threshold": 1.5}, {"top_p": 0}, {"max_new_tokens": 0}, {"batch_size": 0}):
        with pytest.raises(CorpusError, match=f"{next(iter(bad))}="):
            mine_low_perplexity(gpt2, tok, prompts=["a b"], **bad)


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


def test_blocked_top_k_equals_torch_topk():
    from sourcetrace.corpus.mining import top_k_rows

    g = torch.Generator().manual_seed(0)
    for vocab, k in ((50_000, 20), (50_257, 20), (12_000, 7), (300, 20)):
        x = torch.randn(5, vocab, generator=g)
        vals, idx = top_k_rows(x, k)
        ref = torch.topk(x, k, dim=-1)
        assert torch.equal(vals, ref.values) and torch.equal(idx, ref.indices)
    ties = torch.zeros(3, 20_000)
    ties[:, 7] = 1.0
    vals, idx = top_k_rows(ties, 20)
    assert torch.equal(vals, torch.topk(ties, 20).values) and (idx[:, 0] == 7).all()
    assert torch.equal(ties.gather(1, idx), vals)  # every index points at its value

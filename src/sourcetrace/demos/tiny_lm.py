"""A tiny GPT-2 with a word-level Hugging Face tokenizer, trained in seconds on sentences from three made-up
sources: what the LM views' tests, screenshots and demos attribute. Built locally, nothing downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..views.llm import LMBackend, torch_threads

# GPT-2's layers that per-layer hooks capture (transformers' Conv1D); LayerNorm and position embeddings
# would fall back to slower per-example torch.func, and add little for the demo.
GPT2_MODULES = ("*.attn.c_attn", "*.attn.c_proj", "*.mlp.c_fc", "*.mlp.c_proj")
SPECIALS = ("<pad>", "<unk>", "<s>")
WORDS = r"[\w']+|[^\w\s]"

TOPICS = {
    "cookbook": (["the chef", "the cook", "my grandmother", "the baker"],
                 ["chops", "stirs", "bakes", "tastes", "serves"],
                 ["the onions", "the soup", "fresh bread", "a spicy stew", "the garlic"],
                 ["in the kitchen", "with butter", "before dinner", "on a low flame"]),
    "space-wiki": (["the rocket", "the astronaut", "the probe", "the crew"],
                   ["orbits", "reaches", "leaves", "photographs", "lands on"],
                   ["the moon", "a distant comet", "the red planet", "the space station"],
                   ["at night", "after launch", "in deep space", "beyond the clouds"]),
    "farm-diary": (["the farmer", "the old dog", "the shepherd", "our neighbour"],
                   ["feeds", "chases", "milks", "counts", "guards"],
                   ["the cows", "the sheep", "the hungry goats", "the chickens"],
                   ["at dawn", "in the barn", "across the field", "every morning"]),
}


def word_tokenizer(texts: Sequence[str]) -> Any:
    """A lower-casing word-level `PreTrainedTokenizerFast` (words and punctuation) fitted on `texts`.

    `<pad>`, `<unk>` and `<s>` (both BOS and EOS) come first; it saves and loads like any Hugging Face
    tokenizer (`save_pretrained`, `AutoTokenizer.from_pretrained`).
    """
    import re

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(WORDS, t.lower())})
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(WORDS), "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="<s>")


def gpt2_from_config(vocab_size: int, seed: int = 0, n_layer: int = 4, n_embd: int = 128, n_head: int = 4,
                     n_positions: int = 96, attention: str = "sdpa") -> nn.Module:
    """GPT-2 built from its config (no download; about 0.8M parameters at the defaults), no dropout, the
    word tokenizer's special ids (pad 0, `<s>` 2), SDPA attention by default."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                     n_positions=n_positions, bos_token_id=2, eos_token_id=2, pad_token_id=0, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attention)  # type: ignore[call-arg]
    return GPT2LMHeadModel(cfg).eval()


def tiny_gpt2(vocab_size: int, n_positions: int = 64, seed: int = 0, attention: str = "sdpa") -> nn.Module:
    """`gpt2_from_config` at 2 layers, 32 wide (the explorer's example and tests)."""
    return gpt2_from_config(vocab_size, seed, n_layer=2, n_embd=32, n_head=2, n_positions=n_positions,
                            attention=attention)


def text_example(tokenizer: Any, text: str) -> dict[str, list[int]]:
    """`<s>` + text + `<s>`, every token after the first a label (as `LMBackend` makes training examples)."""
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
           tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": [-100, *ids[1:]]}


def train_lm(model: nn.Module, tokenizer: Any, texts: Sequence[str], steps: int = 200,
             lr: float = 1e-2) -> nn.Module:
    """Full-batch Adam on the texts (written out: torch.optim imports torch._dynamo, slow on small CPUs)."""
    from ..tasks import CausalLMTask

    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    batch = task.collate([text_example(tokenizer, t) for t in texts])
    params = [p for p in model.parameters() if p.requires_grad]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    model.train()
    for step in range(1, steps + 1):
        grads = torch.autograd.grad(task.train_loss(model, batch).mean(), params)
        with torch.no_grad():
            for p, g, m_, v_ in zip(params, grads, m, v):
                m_.mul_(0.9).add_(g, alpha=0.1)
                v_.mul_(0.999).addcmul_(g, g, value=0.001)
                p.sub_(lr * (m_ / (1 - 0.9**step)) / ((v_ / (1 - 0.999**step)).sqrt() + 1e-8))
    return model.eval()


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new: int = 12) -> str:
    """Greedy continuation of a prompt, stopping at EOS; returns the generated text (with its spaces)."""
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    out: list[int] = []
    for _ in range(max_new):
        logits = model(torch.tensor([ids + out])).logits[0, -1]
        logits[[tokenizer.pad_token_id, tokenizer.unk_token_id]] = float("-inf")
        nxt = int(logits.argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
    return " " + tokenizer.decode(out)


def tiny_corpus(per_topic: int = 24, seed: int = 0) -> list[dict[str, str]]:
    """Short sentences from three made-up sources (a cookbook, a space wiki, a farm diary)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for source, parts in TOPICS.items():
        seen: set[str] = set()
        while len(seen) < per_topic:
            text = " ".join(p[int(torch.randint(len(p), (1,), generator=g))] for p in parts) + " ."
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "source": source})
    return rows


def tiny_lm_example(workdir: str | os.PathLike | None = None, steps: int = 200
                    ) -> tuple[LMBackend, list[dict[str, Any]], list[dict[str, Any]]]:
    """A tiny GPT-2 trained on `tiny_corpus`, its backend, and items for two generated answers."""
    corpus = tiny_corpus()
    texts = [r["text"] for r in corpus]
    tok = word_tokenizer(texts)
    with torch_threads(1):
        model = train_lm(tiny_gpt2(len(tok)), tok, texts, steps=steps)
    backend = LMBackend(model, tok, texts, train_ids=[f"{r['source']}-{i}" for i, r in enumerate(corpus)],
                        modules=GPT2_MODULES, fallback=False, features="identity",  # tiny: exact grad-dot
                        workdir=None if workdir is None else Path(workdir) / "attributor", threads=1)
    train_items = [{"text": r["text"], "tokens": backend.tokenize(r["text"]), "source": r["source"]}
                   for r in corpus]
    query_items = []
    for prompt in ("the chef", "the astronaut"):
        with torch_threads(1):
            tokens = backend.tokenize(generate(model, tok, prompt))
        query_items.append({"prompt": prompt, "tokens": tokens, "selection": list(range(len(tokens)))})
    return backend, train_items, query_items

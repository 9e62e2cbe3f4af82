"""The language-model path end to end: a GPT-2 built from its config, trained on generated documents with
planted sentences, then attributed. The corpus maker here is what the README's LLM example, the
`llm-trial` benchmark and their tests use; nothing is downloaded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .tiny_lm import TOPICS, gpt2_from_config, text_example, train_lm, word_tokenizer

#: made-up names that start each planted sentence: they occur nowhere else in the corpus
PLANTED_NAMES = ("zorbin", "quelda", "marvik", "tessaly")
#: GPT-2's per-layer weights (transformers' Conv1D): the modules the README example attributes through
GPT2_LAYERS = ("*.attn.c_attn", "*.attn.c_proj", "*.mlp.c_fc", "*.mlp.c_proj")


def planted_documents(n_docs: int = 300, sentences: int = 4, copies: int = 3, seed: int = 0
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Documents of `sentences` generated sentences each, and one fact per name in PLANTED_NAMES.

    A fact is a sentence "NAME verb object place ." whose verb, object and place come from three different
    topics (a combination no other document has); it opens `copies` random documents, so a query that
    prompts with the name after BOS sees the context the model was trained on. Returns
    the documents as rows {"id", "text", "planted"} (planted: the fact's index, or -1) and the facts as rows
    {"id", "prompt", "completion", "documents"} (the completion with its leading space).
    """
    rng = random.Random(seed)
    parts = list(TOPICS.values())
    docs = [[" ".join(rng.choice(p) for p in parts[rng.randrange(len(parts))]) + " ."
             for _ in range(sentences)] for _ in range(n_docs)]
    planted = [-1] * n_docs
    facts = []
    hosts = rng.sample(range(n_docs), copies * len(PLANTED_NAMES))
    for f, name in enumerate(PLANTED_NAMES):
        verb_topic, object_topic, place_topic = rng.sample(range(len(parts)), 3)
        rest = " ".join((rng.choice(parts[verb_topic][1]), rng.choice(parts[object_topic][2]),
                         rng.choice(parts[place_topic][3]))) + " ."
        mine = sorted(hosts[f * copies:(f + 1) * copies])
        for d in mine:
            docs[d].insert(0, f"{name} {rest}")
            planted[d] = f
        facts.append({"id": name, "prompt": name, "completion": " " + rest, "documents": mine})
    rows = [{"id": d, "text": " ".join(s), "planted": planted[d]} for d, s in enumerate(docs)]
    return rows, facts


def train_minibatches(model: nn.Module, tokenizer: Any, texts: Sequence[str], epochs: int = 30,
                      batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Adam on shuffled minibatches of `<s> text <s>` (written out, as `tiny_lm.train_lm`)."""
    import torch

    from ..tasks import CausalLMTask

    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    examples = [text_example(tokenizer, t) for t in texts]
    params = [p for p in model.parameters() if p.requires_grad]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    g = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    for _ in range(epochs):
        for ids in torch.randperm(len(examples), generator=g).split(batch_size):
            step += 1
            batch = task.collate([examples[i] for i in ids.tolist()])
            grads = torch.autograd.grad(task.train_loss(model, batch).mean(), params)
            with torch.no_grad():
                for p, gr, m_, v_ in zip(params, grads, m, v):
                    m_.mul_(0.9).add_(gr, alpha=0.1)
                    v_.mul_(0.999).addcmul_(gr, gr, value=0.001)
                    p.sub_(lr * (m_ / (1 - 0.9**step)) / ((v_ / (1 - 0.999**step)).sqrt() + 1e-8))
    return model.eval()


def run(out: Path, n_docs: int = 120, epochs: int = 30, seed: int = 0) -> Path:
    """`sourcetrace demo llm`: a GPT-2 from its config learns planted sentences; what it writes after each
    planted name is explained by both kinds of evidence on one page per output: gradient attribution (EK-FAC
    on the compact store, through `LMBackend`, so `sourcetrace serve OUT` attributes new selections with
    the same scores) and verbatim spans traced into a suffix-array index of the training documents."""
    from ..corpus.index import CorpusIndex
    from ..views import LMBackend, save_view
    from ..views.llm import torch_threads
    from .tiny_lm import generate

    out = Path(out)
    docs, facts = planted_documents(n_docs=n_docs, sentences=2, seed=seed)
    texts = [d["text"] for d in docs]
    tokenizer = word_tokenizer(texts)
    with torch_threads(1):
        model = train_minibatches(gpt2_from_config(len(tokenizer), seed, n_layer=2, n_embd=64), tokenizer,
                                  texts, epochs=epochs, seed=seed)
        backend = LMBackend(model, tokenizer, texts, train_ids=[d["id"] for d in docs], method="ekfac",
                            modules=list(GPT2_LAYERS), threads=1)
        # each output up to its first full stop: the sentence the model completes after the name
        written = [f["prompt"] + generate(model, tokenizer, f["prompt"], max_new=10).split(" .")[0] + " ."
                   for f in facts]
    index = CorpusIndex.build(docs, tokenizer, out / "index", overwrite=True, progress=False)
    query_items, examples = [], []
    for f, text in zip(facts, written, strict=True):
        tokens = backend.tokenize(text)
        selection = list(range(len(backend.tokenize(f["prompt"])), len(tokens)))
        traced = index.trace(text, min_len=3, density=None)
        query_items.append({"prompt": f["prompt"], "tokens": tokens, "selection": selection,
                            "spans": [s.to_dict() for s in traced.spans] if traced.pieces == tokens else [],
                            "label": f"planted in documents {f['documents']}"})
        examples.append(backend.example(tokens, selection, []))
    with torch_threads(1):
        scores = backend.attributor.score(examples, ids=[f["id"] for f in facts])
    train_items = [{"text": d["text"], "source": "planted" if d["planted"] >= 0 else "filler"} for d in docs]
    save_view(out, scores, train_items=train_items, query_items=query_items, backend=backend,
              title="sourcetrace demo: what a small GPT-2 wrote, and where it came from")
    return out / "report.html"


__all__ = ["GPT2_LAYERS", "PLANTED_NAMES", "gpt2_from_config", "planted_documents", "run", "train_lm",
           "train_minibatches", "word_tokenizer"]

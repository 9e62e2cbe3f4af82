"""Attributing token selections of a language model's text on demand: the backend of the app and widget.

`Backend` is the protocol the web app and the notebook widget call when a user selects tokens;
`LMBackend` implements it for any causal LM with a tokenizer, through `Attributor(model, CausalLMTask())`
with the measurement restricted to the selected tokens (labels -100 elsewhere). `WordTokenizer` and
`tiny_gpt2` make a small GPT-2 that trains in seconds, for tests, screenshots and the demo.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import ShapeError
from ..scores import Scores

# GPT-2's layers that per-layer hooks capture (transformers' Conv1D); LayerNorm and position embeddings
# would fall back to slow per-example torch.func, and add little.
GPT2_MODULES = ("*.attn.c_attn", "*.attn.c_proj", "*.mlp.c_fc", "*.mlp.c_proj")


@runtime_checkable
class Backend(Protocol):
    """What the app and the widget need to attribute a new token selection."""

    train_ids: list[Any]

    def tokenize(self, text: str) -> list[str]:
        """The tokens of a text, as the model sees them (what the user selects from)."""
        ...

    def attribute(self, tokens: Sequence[str], selection: Sequence[int], prompt: str = "") -> Scores:
        """Scores [1, n_train] of the log-probability of `tokens[i] for i in selection`, given the prompt
        and the tokens before them."""
        ...


class WordTokenizer:
    """A word-level tokenizer: lower-cased words and punctuation, ids from a fixed vocabulary."""

    PAD, UNK, BOS = "<pad>", "<unk>", "<s>"
    PATTERN = re.compile(r"[\w']+|[^\w\s]")

    def __init__(self, vocab: Sequence[str]):
        self.vocab = list(vocab)
        if self.vocab[:3] != [self.PAD, self.UNK, self.BOS]:
            self.vocab = [self.PAD, self.UNK, self.BOS] + [w for w in self.vocab if w not in
                                                         (self.PAD, self.UNK, self.BOS)]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def fit(cls, texts: Sequence[str]) -> WordTokenizer:
        words = sorted({w for t in texts for w in cls.PATTERN.findall(t.lower())})
        return cls(words)

    pad_id, unk_id, bos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        return self.PATTERN.findall(text.lower())

    def encode(self, tokens: str | Sequence[str]) -> list[int]:
        if isinstance(tokens, str):
            tokens = self.tokenize(tokens)
        return [self.index.get(t.strip().lower(), self.unk_id) for t in tokens]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.vocab[int(i)] for i in ids]

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.vocab))

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        return cls(json.loads(Path(path).read_text()))


def tiny_gpt2(vocab_size: int, n_positions: int = 64, seed: int = 0) -> nn.Module:
    """A 2-layer, 32-wide GPT-2 built from its config (no download), eager attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=n_positions,
                     bos_token_id=WordTokenizer.bos_id, eos_token_id=WordTokenizer.bos_id,
                     pad_token_id=WordTokenizer.pad_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def lm_example(tokenizer: WordTokenizer, tokens: Sequence[str], selection: Sequence[int] | None = None,
               prompt: Sequence[str] = ()) -> dict[str, list[int]]:
    """A `CausalLMTask` example: BOS + prompt + tokens, with labels on `selection`.

    Without a selection it is a training example: every token is a label, and so is a final end (BOS).
    """
    ids = [tokenizer.bos_id] + tokenizer.encode(list(prompt)) + tokenizer.encode(list(tokens))
    start = 1 + len(prompt)
    if selection is None:
        labels = [-100] * start + ids[start:] + [tokenizer.bos_id]
        return {"input_ids": ids + [tokenizer.bos_id], "labels": labels}
    chosen = selection
    labels = [-100] * len(ids)
    for i in chosen:
        if not 0 <= int(i) < len(tokens):
            raise ShapeError(f"selected token {i} is outside the text's {len(tokens)} tokens")
        labels[start + int(i)] = ids[start + int(i)]
    return {"input_ids": ids, "labels": labels}


def train_lm(model: nn.Module, tokenizer: WordTokenizer, texts: Sequence[str], steps: int = 200,
             lr: float = 1e-2) -> nn.Module:
    """Full-batch Adam on the texts (written out: torch.optim imports torch._dynamo, slow on small CPUs)."""
    from ..tasks import CausalLMTask

    task = CausalLMTask(pad_token_id=tokenizer.pad_id)
    batch = task.collate([lm_example(tokenizer, tokenizer.tokenize(t)) for t in texts])
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
def generate(model: nn.Module, tokenizer: WordTokenizer, prompt: str, max_new: int = 12) -> list[str]:
    """Greedy continuation of a prompt, stopping at BOS/EOS; returns the generated tokens."""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    out: list[int] = []
    for _ in range(max_new):
        logits = model(torch.tensor([ids + out])).logits[0, -1]
        logits[[tokenizer.pad_id, tokenizer.unk_id]] = float("-inf")
        nxt = int(logits.argmax())
        if nxt == tokenizer.bos_id:
            break
        out.append(nxt)
    return tokenizer.decode(out)


class LMBackend:
    """Attribute selected tokens of a causal LM's text to its training texts (grad-dot by default).

    Scores are cached per (prompt, tokens, selection). `token_contributions` splits the grad-dot score over
    the training example's tokens (it sums exactly to the grad-dot score; for other methods it is labelled as
    grad-dot shares, see `token_note`). `threads` sets torch's thread count while attributing (1 is much
    faster for tiny models on a busy machine). A `workdir` made for other settings is refused unless
    `overwrite=True`, as with the `Attributor`.
    """

    #: the method `token_contributions` computes, whatever the backend's method
    token_method = "grad-dot"

    @property
    def token_note(self) -> str:
        """How to read the token shading, naming the method it comes from."""
        if self.attributor.method.name == self.token_method:
            return "shaded: each token's share of the score (green supports, red opposes)"
        return ("shaded: each token's share of the grad-dot score (green supports, red opposes); the "
                f"ranking uses {self.attributor.method.name}, whose scores are not split by token")

    def __init__(self, model: nn.Module, tokenizer: WordTokenizer, train_texts: Sequence[str], *,
                 train_ids: Sequence[Any] | None = None, method: str = "grad-dot",
                 modules: Sequence[str] | None = GPT2_MODULES, workdir: str | os.PathLike | None = None,
                 threads: int | None = None, overwrite: bool = False, **options: Any):
        from ..attributor import Attributor
        from ..tasks import CausalLMTask

        self.model, self.tokenizer = model, tokenizer
        self.task = CausalLMTask(pad_token_id=tokenizer.pad_id)
        self.train_texts = list(train_texts)
        self.train_ids = list(train_ids) if train_ids is not None else list(range(len(self.train_texts)))
        self.modules = list(modules) if modules is not None else None
        if self.modules is not None:
            options.setdefault("fallback", False)
        self.attributor = Attributor(model, self.task, method, workdir, progress=False, overwrite=overwrite,
                                     modules=self.modules, **options)
        self.train_examples = [lm_example(tokenizer, tokenizer.tokenize(t)) for t in self.train_texts]
        self.threads = threads
        with torch_threads(threads):
            self.attributor.fit(self.train_examples, ids=self.train_ids)
        self._cache: OrderedDict[Any, Scores] = OrderedDict()
        self._shares: OrderedDict[Any, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def tokenize(self, text: str) -> list[str]:
        return self.tokenizer.tokenize(text)

    def attribute(self, tokens: Sequence[str], selection: Sequence[int], prompt: str = "") -> Scores:
        key = (prompt, tuple(tokens), tuple(sorted(set(int(i) for i in selection))))
        with self._lock, torch_threads(self.threads):
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            example = lm_example(self.tokenizer, tokens, key[2], self.tokenize(prompt))
            scores = self.attributor.score([example], ids=["selection"])
            scores.matrix = scores.matrix.detach() if scores.matrix is not None else None
            self._cache[key] = scores
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
            return scores

    def token_contributions(self, tokens: Sequence[str], selection: Sequence[int], train_index: int,
                            prompt: str = "") -> list[float]:
        """Each token's share of training example `train_index`'s score: -∇m(q)·∇L_t(i) for every token t.

        One forward-mode pass (a Jacobian-vector product of the per-token losses along ∇m(q)); only exact
        for grad-dot (other methods precondition ∇m(q) first).
        """
        from torch.func import jvp

        from ..grads.capture import select_parameters

        key = (prompt, tuple(tokens), tuple(sorted(set(int(i) for i in selection))), int(train_index))
        with self._lock:
            if key in self._shares:
                return self._shares[key]
        with self._lock, torch_threads(self.threads):
            params = select_parameters(self.model, self.modules)
            query = self.task.collate([lm_example(self.tokenizer, tokens, selection, self.tokenize(prompt))])
            grads = torch.autograd.grad(self.task.measurement(self.model, query).sum(), list(params.values()))
            train = self.task.collate([self.train_examples[train_index]])
            frozen = {k: v.detach() for k, v in params.items()}

            def token_losses(p: dict[str, torch.Tensor]) -> torch.Tensor:
                model = _Bound(self.model, p)
                return -self.task.token_logprobs(model, train)[0]

            directional = jvp(token_losses, (frozen,), ({k: g for k, g in zip(params, grads)},))[1]
        # loss t predicts input token t + 1 (BOS is never predicted); the end-of-text share goes to the
        # last token, so the list aligns with the example's tokens and still sums to the score
        out = [-float(x) for x in directional.detach()]
        n = len(self.train_examples[train_index]["input_ids"]) - 2
        out = out[:n - 1] + [sum(out[n - 1:])] if n >= 1 else out
        with self._lock:
            self._shares[key] = out
            while len(self._shares) > 4096:
                self._shares.popitem(last=False)
        return out

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model (safetensors), its config, the vocabulary and the training texts to `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        state.pop("lm_head.weight", None)  # tied to the token embedding
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text(self.model.config.to_json_string())  # type: ignore
        self.tokenizer.save(folder / "vocab.json")
        (folder / "train.json").write_text(json.dumps({"texts": self.train_texts, "ids": self.train_ids}))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, **kwargs: Any) -> LMBackend:
        """The backend `save` wrote: a GPT-2 with a word-level tokenizer."""
        from safetensors.torch import load_file
        from transformers import GPT2Config, GPT2LMHeadModel

        folder = Path(folder)
        cfg = GPT2Config.from_json_file(folder / "config.json")
        cfg._attn_implementation = "eager"
        model = GPT2LMHeadModel(cfg)
        model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
        model.tie_weights()
        train = json.loads((folder / "train.json").read_text())
        return cls(model.eval(), WordTokenizer.load(folder / "vocab.json"), train["texts"],
                   train_ids=train["ids"], **kwargs)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None: leave torch's setting alone)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Bound(nn.Module):
    """`model` with some parameters replaced (for torch.func transforms), callable like the model."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.params = model, params

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.func import functional_call

        return functional_call(self.inner, self.params, args, kwargs)


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
    tok = WordTokenizer.fit(texts)
    with torch_threads(1):
        model = train_lm(tiny_gpt2(len(tok)), tok, texts, steps=steps)
    backend = LMBackend(model, tok, texts, train_ids=[f"{r['source']}-{i}" for i, r in enumerate(corpus)],
                        workdir=None if workdir is None else Path(workdir) / "attributor", threads=1)
    train_items = [{"text": r["text"], "tokens": tok.tokenize(r["text"]), "source": r["source"]}
                   for r in corpus]
    query_items = []
    for prompt in ("the chef", "the astronaut"):
        with torch_threads(1):
            gen = generate(model, tok, prompt)
        query_items.append({"prompt": prompt, "tokens": gen, "selection": list(range(len(gen)))})
    return backend, train_items, query_items

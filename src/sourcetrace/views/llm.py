"""Attributing token selections of a language model's text on demand: the backend of the app and widget.

`Backend` is the protocol the web app and the notebook widget call when a user selects tokens;
`LMBackend` implements it for any Hugging Face causal LM and its (fast) tokenizer, through
`Attributor(model, CausalLMTask(), method, modules=...)` with the measurement restricted to the selected
tokens (labels -100 elsewhere). Tokens are shown as the slices of the text the tokenizer's offsets give,
so joined they give the text back, spacing included.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import InvalidOptionError, ShapeError
from ..scores import Scores


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


class LMBackend:
    """Attribute selected tokens of a causal LM's text to its training texts (grad-dot by default).

    `tokenizer` is a Hugging Face fast tokenizer (e.g. `AutoTokenizer.from_pretrained(folder)`). A training
    text becomes the example BOS + text + EOS (each where the tokenizer has one), every token after BOS a
    label; a selection is scored as the log-probability of the selected tokens given BOS, the prompt and
    the tokens before them. `method`, `modules` and further options go to the `Attributor` unchanged, so
    the scores are the Attributor's. Scores are cached per (prompt, tokens, selection).

    `token_contributions` splits the grad-dot score over the training example's tokens (it sums to the
    grad-dot score; for other methods the shading says so, see `token_note`). `threads` sets torch's thread
    count while attributing (1 is much faster for tiny models on a busy machine). A `workdir` made for
    other settings is refused unless `overwrite=True`, as with the `Attributor`.
    """

    #: the method `token_contributions` computes, whatever the backend's method
    token_method = "grad-dot"

    def __init__(self, model: nn.Module, tokenizer: Any, train_texts: Sequence[str], *,
                 train_ids: Sequence[Any] | None = None, method: str = "grad-dot",
                 modules: Sequence[str] | None = None, workdir: str | os.PathLike | None = None,
                 threads: int | None = None, overwrite: bool = False, **options: Any):
        from ..attributor import Attributor
        from ..tasks import CausalLMTask

        if not callable(tokenizer) or not hasattr(tokenizer, "is_fast"):
            raise InvalidOptionError(f"tokenizer must be a Hugging Face tokenizer (got "
                                     f"{type(tokenizer).__name__}); load one with "
                                     "transformers.AutoTokenizer.from_pretrained(folder)")
        if not tokenizer.is_fast:
            raise InvalidOptionError(f"{type(tokenizer).__name__} is a slow tokenizer without offsets; load "
                                     "the fast one: AutoTokenizer.from_pretrained(folder, use_fast=True)")
        self.model, self.tokenizer = model, tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self.task = CausalLMTask(pad_token_id=pad)
        self.train_texts = list(train_texts)
        self.train_ids = list(train_ids) if train_ids is not None else list(range(len(self.train_texts)))
        self.method_name, self.modules, self.options = method, \
            (list(modules) if modules is not None else None), dict(options)
        self.attributor = Attributor(model, self.task, method, workdir, progress=False, overwrite=overwrite,
                                     modules=self.modules, **options)
        self.train_examples = [self.example(self.tokenize(t)) for t in self.train_texts]
        self.threads = threads
        with torch_threads(threads):
            self.attributor.fit(self.train_examples, ids=self.train_ids)
        self._cache: OrderedDict[Any, Scores] = OrderedDict()
        self._shares: OrderedDict[Any, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def token_note(self) -> str:
        """How to read the token shading, naming the method it comes from."""
        if self.attributor.method.name == self.token_method:
            return "shaded: each token's share of the score (green supports, red opposes)"
        return ("shaded: each token's share of the grad-dot score (green supports, red opposes); the "
                f"ranking uses {self.attributor.method.name}, whose scores are not split by token")

    # ---- text and examples ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        """The tokens of `text` as slices of it (each with the spaces before it): joined, they are the
        text."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces, prev = [], 0
        for _, end in enc["offset_mapping"]:
            end = max(end, prev)
            pieces.append(text[prev:end])
            prev = end
        return pieces

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """The token ids of tokens that `tokenize` made (their text is encoded again, so they must join)."""
        if not tokens:
            return []
        ids = self.tokenizer("".join(tokens), add_special_tokens=False)["input_ids"]
        if len(ids) != len(tokens):
            raise ShapeError(f"{len(tokens)} tokens encode to {len(ids)} token ids; give tokens as "
                             "LMBackend.tokenize makes them")
        return list(ids)

    def example(self, tokens: Sequence[str], selection: Sequence[int] | None = None,
                prompt: Sequence[str] = ()) -> dict[str, list[int]]:
        """A `CausalLMTask` example: BOS + prompt + tokens, labels on `selection`.

        Without a selection it is a training example: every token is a label, and so is a final EOS.
        """
        ids = self.bos + self.encode(list(prompt)) + self.encode(list(tokens))
        start = len(ids) - len(tokens)
        if selection is None:
            labels = [-100] * len(self.bos) + ids[len(self.bos):] + self.eos
            return {"input_ids": ids + self.eos, "labels": labels}
        labels = [-100] * len(ids)
        for i in selection:
            if not 0 <= int(i) < len(tokens):
                raise ShapeError(f"selected token {i} is outside the text's {len(tokens)} tokens")
            labels[start + int(i)] = ids[start + int(i)]
        return {"input_ids": ids, "labels": labels}

    # ---- attributing ---------------------------------------------------------------------------------
    def attribute(self, tokens: Sequence[str], selection: Sequence[int], prompt: str = "") -> Scores:
        key = (prompt, tuple(tokens), tuple(sorted(set(int(i) for i in selection))))
        with self._lock, torch_threads(self.threads):
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            example = self.example(tokens, key[2], self.tokenize(prompt))
            scores = self.attributor.score([example], ids=["selection"])
            scores.matrix = scores.matrix.detach() if scores.matrix is not None else None
            self._cache[key] = scores
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
            return scores

    def token_contributions(self, tokens: Sequence[str], selection: Sequence[int], train_index: int,
                            prompt: str = "") -> list[float]:
        """Each token's share of training example `train_index`'s grad-dot score: -∇m(q)·∇L_t(i) per token t.

        Reverse mode only (one backward pass per predicted token), so it works with any attention kernel
        (SDPA has no forward-mode derivative).
        """
        from ..grads.capture import select_parameters

        key = (prompt, tuple(tokens), tuple(sorted(set(int(i) for i in selection))), int(train_index))
        with self._lock:
            if key in self._shares:
                return self._shares[key]
        with self._lock, torch_threads(self.threads):
            params = list(select_parameters(self.model, self.modules).values())
            query = self.task.collate([self.example(tokens, selection, self.tokenize(prompt))])
            direction = torch.autograd.grad(self.task.measurement(self.model, query).sum(), params)
            example = self.train_examples[train_index]
            train = self.task.collate([example])
            losses = -self.task.token_logprobs(self.model, train)[0]  # [T-1]: loss t predicts input t+1
            predicted = [t for t, label in enumerate(example["labels"][1:]) if label != -100]
            per_step = {}
            for n, t in enumerate(predicted):
                grads = torch.autograd.grad(losses[t], params, retain_graph=n + 1 < len(predicted),
                                            allow_unused=True)
                per_step[t] = -sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)
        # a text token's share is the loss of predicting it; the end-of-text share goes to the last token,
        # so the list aligns with the example's tokens and sums to the score
        n_text = len(example["input_ids"]) - len(self.bos) - len(self.eos)
        out = [0.0] * max(n_text, 1)
        for t, value in per_step.items():
            out[min(t + 1 - len(self.bos), len(out) - 1)] += value
        with self._lock:
            self._shares[key] = out
            while len(self._shares) > 4096:
                self._shares.popitem(last=False)
        return out

    # ---- on disk -------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model and tokenizer (`save_pretrained`), the training texts and the method to
        `folder`."""
        if not hasattr(self.model, "save_pretrained"):
            raise ShapeError(f"{type(self.model).__name__} has no save_pretrained, so a saved view cannot "
                             "reload it; serve it live: views.create_app(views.Session(scores, ..., "
                             "backend=backend))")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder / "model")  # type: ignore[operator]
        self.tokenizer.save_pretrained(folder / "tokenizer")
        spec = {"texts": self.train_texts, "ids": self.train_ids, "method": self.method_name,
                "modules": self.modules, "options": self.options}
        (folder / "backend.json").write_text(json.dumps(spec))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, **kwargs: Any) -> LMBackend:
        """The backend `save` wrote, with the same method, modules and options (from local files only)."""
        from ..errors import require

        transformers = require("transformers", "llm")
        folder = Path(folder)
        spec = json.loads((folder / "backend.json").read_text())
        model = transformers.AutoModelForCausalLM.from_pretrained(folder / "model", local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        return cls(model.eval(), tokenizer, spec["texts"], train_ids=spec["ids"], method=spec["method"],
                   modules=spec["modules"], **{**spec["options"], **kwargs})


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

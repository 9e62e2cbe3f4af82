"""Tasks say how to compute a per-example training loss and a per-example query measurement.

Measurements are "higher is better" (a margin, a log-probability); a loss enters as its negative. Both
functions return one value per example, shape [B], so that per-example gradients are well defined.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeGuard, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import EmptyDataError, InvalidOptionError, NonFiniteError, ShapeError

Batch = Any


@runtime_checkable
class Task(Protocol):
    """How a model is trained and what is measured on a query."""

    def train_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example training loss, shape [B]."""
        ...

    def measurement(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example query measurement, higher is better, shape [B]."""
        ...


@runtime_checkable
class OutputTask(Task, Protocol):
    """A task that also exposes the model outputs, which the Gauss-Newton (GGN) curvature linearises at.

    `train_loss(model, batch)` must equal `loss_from_outputs(outputs(model, batch), batch)`.
    """

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model outputs the loss is computed from, [B, ...]."""
        ...

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-example training loss from the outputs, shape [B]."""
        ...


def has_outputs(task: Task) -> TypeGuard[OutputTask]:
    """Whether the task has `outputs` and `loss_from_outputs` (an `OutputTask`).

    Looked up with `hasattr`, so a wrapper that delegates through `__getattr__` qualifies too.
    """
    return all(hasattr(task, a) for a in ("outputs", "loss_from_outputs"))


def check_task(task: Any) -> Task:
    """Refuse what is not a task (None, a class instead of an instance, an object missing a method)."""
    if task is None:
        raise InvalidOptionError("task is None; give a Task, e.g. st.ClassificationTask(), "
                                 "st.RegressionTask() or st.CausalLMTask()")
    if isinstance(task, type):
        raise InvalidOptionError(f"task is the class {task.__name__}, not a task; create one: "
                                 f"{task.__name__}()")
    missing = [m for m in ("train_loss", "measurement") if not callable(getattr(task, m, None))]
    if missing:
        raise InvalidOptionError(f"task {type(task).__name__} has no {' or '.join(missing)}; a Task defines "
                                 "train_loss(model, batch) and measurement(model, batch), each returning one "
                                 "value per example")
    return task


def collate(task: Task, examples: Sequence[Any]) -> Batch:
    """Stack examples into a batch with the task's own `collate` if it has one."""
    own = getattr(task, "collate", None)
    if own is not None:
        return own(examples)
    if examples and all(isinstance(ex, Mapping) for ex in examples):
        keys = set(examples[0])
        for i, ex in enumerate(examples[1:], 1):
            if set(ex) != keys:
                raise ShapeError(f"examples in one batch have different keys: {sorted(map(str, keys))} and "
                                 f"{sorted(map(str, ex))} (batch position {i}); give every example the "
                                 "same fields")
    return torch.utils.data.default_collate([_numbers_as_tensors(ex) for ex in examples])


def _numbers_as_tensors(example: Any) -> Any:
    """A dict example's lists of numbers (e.g. a JSONL row's features) as tensors.

    default_collate would otherwise transpose a list field into one tensor per position.
    """
    if not isinstance(example, Mapping):
        return example
    out = dict(example)
    for key, value in example.items():
        if isinstance(value, list) and value and _numeric(value):
            with contextlib.suppress(ValueError):  # a ragged list is left as it is
                out[key] = torch.as_tensor(value)
    return out


def _numeric(value: Any) -> bool:
    if isinstance(value, list):
        return all(_numeric(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checked(values: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """Refuse a per-example loss or measurement of the wrong shape or with NaN/inf values."""
    if values.dim() != 1 or values.shape[0] != batch_size:
        raise ShapeError(f"{what} must return one value per example, shape [{batch_size}]; "
                         f"got {tuple(values.shape)}. Reduce over every axis but the batch axis")
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise NonFiniteError(f"{what} is NaN or infinite for {bad} of {batch_size} examples; "
                             "check the inputs and the model (e.g. a diverged checkpoint)")
    return values


def _split(batch: Batch, input_key: str, target_key: str) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        missing = [k for k in (input_key, target_key) if k not in batch]
        if missing:
            raise ShapeError(f"examples are dicts with keys {sorted(map(str, batch))} but the task reads "
                             f"{input_key!r} and {target_key!r} ({', '.join(map(repr, missing))} missing); "
                             "rename the fields or pass input_key=... and target_key=... to the task")
        return batch[input_key], batch[target_key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    what = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else \
        type(batch).__name__
    raise ShapeError(f"each example must be (inputs, target) or a dict with keys {input_key!r} and "
                     f"{target_key!r}; got {what}")


class ClassificationTask:
    """Cross-entropy training loss; the measurement is the margin (default) or the negative loss.

    margin = logit_y - logsumexp_{k != y} logit_k, i.e. the log-odds of the correct class.
    """

    def __init__(self, measurement: str = "margin", input_key: str = "x", target_key: str = "y"):
        if measurement not in ("margin", "loss"):
            raise InvalidOptionError(f"measurement must be 'margin' or 'loss'; got {measurement!r}")
        self.kind = measurement
        self.input_key, self.target_key = input_key, target_key

    def _logits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = _split(batch, self.input_key, self.target_key)
        logits = model(inputs)
        if logits.dim() != 2:
            raise ShapeError(f"a classifier must return logits [B, classes]; got {tuple(logits.shape)}")
        targets = torch.as_tensor(targets, device=logits.device)
        if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
            raise ShapeError(f"labels must have shape [{logits.shape[0]}] (one class index per example); "
                             f"got {tuple(targets.shape)}")
        if targets.dtype.is_floating_point:
            raise ShapeError("labels must be integer class indices; got floating-point labels "
                             "(use RegressionTask for real-valued targets)")
        n_classes = logits.shape[1]
        low, high = _values(targets, torch.amin), _values(targets, torch.amax)
        if low is not None and high is not None and (low < 0 or high >= n_classes):
            raise ShapeError(f"label {low if low < 0 else high} is out of range for a classifier with "
                             f"{n_classes} classes; labels must be class indices in [0, {n_classes})")
        return logits, targets.long()

    def train_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits, targets = self._logits(model, batch)
        return F.cross_entropy(logits, targets, reduction="none")

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The logits [B, classes]: the outputs the Gauss-Newton curvature linearises the model at."""
        return self._logits(model, batch)[0]

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-example training loss from the logits; `train_loss` = `loss_from_outputs(outputs(...))`."""
        _, targets = _split(batch, self.input_key, self.target_key)
        targets = torch.as_tensor(targets, device=outputs.device).long()
        return F.cross_entropy(outputs, targets, reduction="none")

    def sampled_loss(self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
        """Loss against labels drawn from the model's own prediction (its gradients give the true Fisher)."""
        logits, _ = self._logits(model, batch)
        probs = torch.softmax(logits.detach().double(), dim=1).cpu()
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
        return F.cross_entropy(logits, drawn, reduction="none")

    def measurement(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits, targets = self._logits(model, batch)
        if self.kind == "loss":
            return -F.cross_entropy(logits, targets, reduction="none")
        correct = logits.gather(1, targets[:, None]).squeeze(1)
        others = logits.scatter(1, targets[:, None], float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    def config(self) -> dict[str, Any]:
        return {"task": type(self).__name__, "measurement": self.kind}


class RegressionTask:
    """Squared-error training loss (½(f-y)², summed over outputs); the measurement is its negative."""

    def __init__(self, input_key: str = "x", target_key: str = "y"):
        self.input_key, self.target_key = input_key, target_key

    def train_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets = _split(batch, self.input_key, self.target_key)
        preds = model(inputs)
        targets = torch.as_tensor(targets, device=preds.device, dtype=preds.dtype)
        if targets.shape != preds.shape:
            if targets.numel() == preds.numel():
                targets = targets.reshape(preds.shape)
            else:
                raise ShapeError(f"targets of shape {tuple(targets.shape)} do not match the model's "
                                 f"output {tuple(preds.shape)}")
        return 0.5 * (preds - targets).pow(2).reshape(preds.shape[0], -1).sum(1)

    def measurement(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return -self.train_loss(model, batch)

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The predictions: the outputs the Gauss-Newton curvature linearises the model at."""
        inputs, _ = _split(batch, self.input_key, self.target_key)
        return model(inputs)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-example squared error from the predictions; `train_loss` = this of `outputs(...)`."""
        _, targets = _split(batch, self.input_key, self.target_key)
        targets = torch.as_tensor(targets, device=outputs.device, dtype=outputs.dtype)
        if targets.shape != outputs.shape and targets.numel() == outputs.numel():
            targets = targets.reshape(outputs.shape)
        return 0.5 * (outputs - targets).pow(2).reshape(outputs.shape[0], -1).sum(1)

    def sampled_loss(self, model: nn.Module, batch: Batch, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
        """Squared error against targets drawn from N(prediction, I): its gradients give the true Fisher."""
        inputs, _ = _split(batch, self.input_key, self.target_key)
        preds = model(inputs)
        noise = torch.randn(preds.shape, generator=generator, dtype=preds.dtype).to(preds.device)
        return 0.5 * (preds - (preds.detach() + noise)).pow(2).reshape(preds.shape[0], -1).sum(1)

    def config(self) -> dict[str, Any]:
        return {"task": type(self).__name__}


class CausalLMTask:
    """Next-token loss of the completion tokens only; the measurement is the completion's log-probability.

    A batch is a dict with `input_ids`, optional `attention_mask` and `labels` where prompt and padding
    positions hold -100. Examples may be such dicts of token lists, or `{"prompt": ids, "completion": ids}`,
    which `collate` turns into masked, right-padded tensors. Works with Hugging Face causal LMs (output
    with `.logits`) and plain PyTorch LMs returning logits [B, T, V].
    """

    def __init__(self, pad_token_id: int = 0, loss_per_token: bool = False):
        self.pad_token_id = pad_token_id
        self.loss_per_token = loss_per_token

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = []
        for ex in examples:
            if isinstance(ex, str):
                raise ShapeError(f"an LM example is token ids, not text (got {ex[:40]!r}); tokenize first: "
                                 "{'input_ids': tokenizer(text)['input_ids']}, or {'prompt': ids, "
                                 "'completion': ids} to score only the completion")
            if not isinstance(ex, Mapping):
                raise ShapeError(f"an LM example is a dict with 'input_ids' (and optional 'labels') or with "
                                 f"'prompt' and 'completion'; got a {type(ex).__name__}")
            if "prompt" in ex or "completion" in ex:
                if "prompt" not in ex or "completion" not in ex:
                    given = "prompt" if "prompt" in ex else "completion"
                    raise ShapeError(f"an LM example with {given!r} needs both 'prompt' and 'completion' "
                                     "(token ids; the prompt may be empty)")
                prompt, completion = _token_list(ex["prompt"]), _token_list(ex["completion"])
                ids = prompt + completion
                row_labels = [-100] * len(prompt) + completion
            elif "input_ids" in ex:
                ids = _token_list(ex["input_ids"])
                row_labels = _token_list(ex["labels"]) if "labels" in ex else list(ids)
            else:
                raise ShapeError(f"an LM example needs 'input_ids' or 'prompt' and 'completion'; got keys "
                                 f"{sorted(map(str, ex))}")
            if len(ids) != len(row_labels):
                raise ShapeError("input_ids and labels of an example must have the same length")
            if not any(lab != -100 for lab in row_labels[1:]):
                raise EmptyDataError("an LM example has no tokens to score (empty completion, or every label "
                                     "after the first token is -100), so its loss and measurement would be 0 "
                                     "and every score 0; give at least one completion token")
            rows.append((ids, row_labels))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.as_tensor(ids)
            labels[r, : len(lab)] = torch.as_tensor(lab)
            mask[r, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _logits(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"]
        vocab = _vocab_size(model)
        low, high = _values(input_ids, torch.amin), _values(input_ids, torch.amax)
        if vocab is not None and low is not None and high is not None and (low < 0 or high >= vocab):
            raise ShapeError(f"token id {high if high >= vocab else low} is outside the model's vocabulary "
                             f"of {vocab} tokens; encode the text with the model's own tokenizer (and use a "
                             "pad_token_id below the vocabulary size)")
        mask = batch.get("attention_mask")
        takes_ids, takes_mask = _lm_arguments(model)
        if mask is not None and not takes_mask and _values(_left_padding(mask), torch.amax):
            raise ShapeError(f"{type(model).__name__}.forward takes no attention_mask, but the batch has "
                             "padding before real tokens; pad on the right (CausalLMTask.collate does) or "
                             "give the model an attention_mask argument")
        if takes_ids:  # Hugging Face style
            out = model(input_ids=input_ids, **({"attention_mask": mask} if mask is not None and takes_mask
                                                else {}))
        else:  # a plain PyTorch LM taking token ids only; right padding cannot change earlier positions
            out = model(input_ids)
        logits = out.logits if hasattr(out, "logits") else out
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ShapeError(f"a causal LM must return logits [B, T, V] (or an output with .logits); "
                             f"got {got}")
        labels = batch.get("labels")
        top = _values(labels, torch.amax) if labels is not None else None
        if top is not None and top >= logits.shape[-1]:
            raise ShapeError(f"label token {top} is outside the model's vocabulary of {logits.shape[-1]} "
                             "tokens; encode the text with the model's own tokenizer")
        return logits

    def token_logprobs(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Log-probability of each label token given its prefix, 0 where the label is -100; [B, T-1]."""
        return self._logprobs(self._logits(model, batch), batch)

    def _logprobs(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"].to(logits.device)
        targets = labels[:, 1:]
        keep = targets != -100
        shifted = logits[:, :-1]
        if shifted.dtype in (torch.float16, torch.bfloat16):  # upcast half precision; keep float64 as is
            shifted = shifted.float()
        logp = torch.log_softmax(shifted, dim=-1)
        picked = logp.gather(2, targets.clamp_min(0)[..., None]).squeeze(2)
        return torch.where(keep, picked, torch.zeros_like(picked)).to(logits.dtype)

    def sampled_loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor],
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Completion loss against tokens drawn from the model itself (gradients give the true Fisher)."""
        with torch.no_grad():
            logits = self._logits(model, batch)
            probs = torch.softmax(logits[:, :-1].double(), dim=-1).cpu()
            drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            drawn = drawn.reshape(probs.shape[:2]).to(logits.device)
        labels = batch["labels"].clone()
        keep = labels[:, 1:] != -100
        labels[:, 1:] = torch.where(keep, drawn, labels[:, 1:])
        return -self.token_logprobs(model, {**batch, "labels": labels}).sum(1)

    def outputs(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The logits [B, T, V]: the outputs the Gauss-Newton curvature linearises the model at."""
        return self._logits(model, batch)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example completion loss from the logits; `train_loss` = this of `outputs(...)`."""
        total = -self._logprobs(outputs, batch).sum(1)
        if self.loss_per_token:
            total = total / (batch["labels"][:, 1:] != -100).sum(1).clamp_min(1)
        return total

    def train_loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch)

    def measurement(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.token_logprobs(model, batch).sum(1)

    def config(self) -> dict[str, Any]:
        return {"task": type(self).__name__, "pad_token_id": self.pad_token_id,
                "loss_per_token": self.loss_per_token}


def _as_list(x: Any) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _token_list(x: Any) -> list[int]:
    """Token ids as a list of ints; text or nested lists are refused with what to give instead."""
    if isinstance(x, str):
        raise ShapeError(f"token ids expected, got text {x[:40]!r}; encode it with the model's tokenizer "
                         "first")
    ids = _as_list(x)
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in ids):
        raise ShapeError("token ids must be a flat list of ints (one example per row); got "
                         f"{[type(i).__name__ for i in ids[:3]]}...")
    return [int(i) for i in ids]


def _vocab_size(model: nn.Module) -> int | None:
    """The number of rows of the model's input embedding, when it says (Hugging Face models do)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        with contextlib.suppress(Exception):
            emb = get()
    size = getattr(emb, "num_embeddings", None)
    return int(size) if isinstance(size, int) else None


def _lm_arguments(model: nn.Module) -> tuple[bool, bool]:
    """Whether the model's forward takes `input_ids=` and `attention_mask=` (or any keyword)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False, False
    any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return ("input_ids" in params or any_kw), ("attention_mask" in params or any_kw)


def _left_padding(mask: torch.Tensor) -> torch.Tensor:
    """1 where a padded position comes before a real token (the mask is not ones-then-zeros)."""
    m = mask.to(torch.long)
    return (m[..., 1:] > m[..., :-1]).to(torch.long)


def _values(t: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> int | None:
    """`reduce(t)` as an int, or None inside a torch.func transform (checked on the plain call instead)."""
    if t.numel() == 0:
        return None
    try:
        return int(reduce(t))
    except RuntimeError:  # vmap: data-dependent Python values are unavailable
        return None


def task_config(task: Task) -> dict[str, Any]:
    """What identifies a task in a manifest."""
    cfg: Callable[[], dict[str, Any]] | None = getattr(task, "config", None)
    return cfg() if cfg is not None else {"task": type(task).__qualname__}

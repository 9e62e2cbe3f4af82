"""Dataset adapters: any sized collection of examples becomes an `Examples` with stable ids."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import EmptyDataError, ShapeError


class Examples:
    """A sized, indexable collection of examples with stable ids.

    Accepts a list, a map-style `torch.utils.data.Dataset`, a Hugging Face `datasets.Dataset` (an `id`
    column, when present, gives the ids), a `(inputs, targets)` pair of tensors/arrays, or the path of a
    JSONL file (one JSON object per line; an `id` field gives the ids). Ids default to positions.
    """

    def __init__(self, data: Any, ids: Sequence[Any] | None = None, name: str = "data"):
        if isinstance(data, Examples):
            self.items: Any = data.items
            ids = data.ids if ids is None else ids
        elif isinstance(data, (str, os.PathLike)):
            self.items = _read_jsonl(Path(data))
        elif _is_tensor_pair(data):
            inputs, targets = (torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t
                               for t in data)
            if len(inputs) != len(targets):
                raise ShapeError(f"{name}: {len(inputs)} inputs but {len(targets)} targets; "
                                 "give one target per example")
            self.items = torch.utils.data.TensorDataset(inputs, targets)
        else:
            self.items = data
        try:
            n = len(self.items)
        except TypeError as exc:
            raise ShapeError(f"{name} must be sized (a list, a map-style Dataset, a JSONL path); "
                             f"got {type(data).__name__}") from exc
        if n == 0:
            raise EmptyDataError(f"{name} is empty; give at least one example")
        if ids is None:
            ids = _own_ids(self.items, n)
        ids = [i.item() if isinstance(i, (np.generic, torch.Tensor)) else i for i in ids]
        if len(ids) != n:
            raise ShapeError(f"{name}: {len(ids)} ids for {n} examples")
        if len(set(ids)) != n:
            raise ShapeError(f"{name}: example ids must be unique")
        self.ids: list[Any] = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[int, list[Any]]]:
        """Yield `(offset, examples)` for consecutive slices of [start, stop)."""
        stop = len(self) if stop is None else stop
        for lo in range(start, stop, batch_size):
            yield lo, [self.items[i] for i in range(lo, min(lo + batch_size, stop))]

    def fingerprint(self) -> str:
        """A hash of the ids and of every example's content: another dataset gets another fingerprint."""
        h = hashlib.sha256()
        h.update(json.dumps(self.ids, default=str).encode())
        for i in range(len(self)):
            _hash_into(h, self.items[i])
        return h.hexdigest()[:16]


def _is_tensor_pair(data: Any) -> bool:
    return (isinstance(data, tuple) and len(data) == 2
            and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in data))


def _own_ids(items: Any, n: int) -> list[Any]:
    names = getattr(items, "column_names", None)
    if names is not None and "id" in names:
        return list(items["id"])
    if isinstance(items, list) and all(isinstance(x, dict) and "id" in x for x in items):
        return [x["id"] for x in items]
    return list(range(n))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a JSONL file with one example per line")
    rows = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ShapeError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from exc
    return rows


def _hash_into(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_into(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for x in obj:
            _hash_into(h, x)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's parameters and buffers (names, shapes, dtypes, values)."""
    return state_fingerprint(model.state_dict())


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        _hash_into(h, state[name])
    return h.hexdigest()[:16]

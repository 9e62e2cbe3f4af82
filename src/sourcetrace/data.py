"""Dataset adapters: any sized collection of examples becomes an `Examples` with stable ids."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import EmptyDataError, InvalidOptionError, ShapeError


class Examples:
    """A sized, indexable collection of examples with stable ids.

    Accepts a list, a map-style `torch.utils.data.Dataset`, a Hugging Face `datasets.Dataset` (an `id`
    column, when present, gives the ids), a `(inputs, targets)` pair of tensors/arrays, or the path of a
    JSONL file (one JSON object per line; an `id` field gives the ids). Ids default to positions.
    """

    def __init__(self, data: Any, ids: Sequence[Any] | None = None, name: str = "data"):
        _refuse_unsupported(data, name)
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
        elif isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise ShapeError(f"{name}: ids must be a list with one id per example; got {type(ids).__name__}")
        ids = [plain_id(i, name) for i in ids]
        if len(ids) != n:
            raise ShapeError(f"{name}: {len(ids)} ids for {n} examples; give one id per example")
        if len(set(ids)) != n:
            seen: set[Any] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            raise ShapeError(f"{name}: example ids must be unique; {dup!r} appears more than once")
        self.ids: list[Any] = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[int, list[Any]]]:
        """Yield `(offset, examples)` for consecutive slices of [start, stop)."""
        check_batch_size(batch_size)
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


ID_TYPES = "an int, a str, or a tuple of them"


def plain_id(value: Any, name: str = "data") -> Any:
    """An example id as a plain Python value (int, float, str, bool, None or a tuple of them).

    Numpy and torch scalars become Python numbers and a 1-d tensor becomes a tuple, so ids hash, compare
    and survive `Scores.save`/`load` (JSON) unchanged.
    """
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 and value.dim() == 0 else tuple(value.tolist())
    elif isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else tuple(value.tolist())
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, tuple):
        return tuple(plain_id(v, name) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ShapeError(f"{name}: example id {value!r} is a {type(value).__name__}; an id must be {ID_TYPES} "
                     "(it is stored as JSON beside the scores)")


def check_batch_size(batch_size: Any) -> int:
    """Refuse a batch size that is not a positive int (e.g. the string "64" from a config file)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        hint = f"; pass batch_size={int(batch_size)}" if isinstance(batch_size, str) and \
            batch_size.strip().isdigit() and int(batch_size) > 0 else ""
        raise InvalidOptionError(f"batch_size must be a positive int; got {batch_size!r} "
                                 f"({type(batch_size).__name__}){hint}")
    return int(batch_size)


def _refuse_unsupported(data: Any, name: str) -> None:
    """Clear errors for the containers users most often pass by mistake."""
    if isinstance(data, torch.utils.data.DataLoader):
        raise ShapeError(f"{name} is a DataLoader; pass its dataset (loader.dataset) instead: sourcetrace "
                         "batches the examples itself (set batch_size=... on the Attributor)")
    if isinstance(data, (list, tuple)) and len(data) >= 2 and \
            all(isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim >= 1 for t in data):
        lengths = {len(t) for t in data}
        if isinstance(data, tuple) and len(data) > 2 and len(lengths) == 1:
            raise ShapeError(f"{name} is a tuple of {len(data)} arrays; give (inputs, targets), two arrays "
                             "with one row per example (or a list of examples)")
        if isinstance(data, list) and len(data) == 2 and len(lengths) == 1 and len(data[0]) > 2 \
                and data[0].ndim >= 2 and data[1].ndim == 1:
            raise ShapeError(f"{name} is a list of two arrays of {len(data[0])} rows; for inputs and "
                             "targets pass a tuple (x, y), not a list [x, y]")
    if isinstance(data, Mapping):
        columns = ", ".join(map(str, list(data)[:4]))
        raise ShapeError(f"{name} is a mapping of columns ({columns}); give a list of examples, e.g. "
                         "[{'input_ids': ids} for ids in enc['input_ids']] for a tokenizer's output, a "
                         "Dataset, an (inputs, targets) tuple or a JSONL path")


def _is_tensor_pair(data: Any) -> bool:
    return (isinstance(data, tuple) and len(data) == 2
            and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in data))


def _own_ids(items: Any, n: int) -> list[Any]:
    names = getattr(items, "column_names", None)
    if names is not None and "id" in names:
        return list(items["id"])
    if isinstance(items, list) and items and all(isinstance(x, dict) and "id" in x for x in items):
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

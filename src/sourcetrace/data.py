"""Dataset adapters: any sized collection of examples becomes an `Examples` with stable ids."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import EmptyDataError, InvalidOptionError, ShapeError


class Examples:
    """A sized, indexable collection of examples with stable ids.

    Accepts a list, a map-style `torch.utils.data.Dataset`, a Hugging Face `datasets.Dataset` or any
    sequence of dict rows (an `id` column, when present, gives the ids; text rows for a language model go
    through `lm_examples` first), a `(inputs, targets)` pair of tensors/arrays, or the path of a
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
        if len(ids) != n:
            raise ShapeError(f"{name}: {len(ids)} ids for {n} examples; give one id per example")
        self.ids: Ids = ids if isinstance(ids, Ids) else Ids(ids, name)
        self.ids.check_unique(name)

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
        for part in self.ids.json_parts():
            h.update(part)
        for i in range(len(self)):
            _hash_into(h, self.items[i])
        return h.hexdigest()[:16]


ID_TYPES = "an int, a str, or a tuple of them"
CHUNK = 8192  # ids converted or encoded at a time


class Ids(Sequence[Any]):
    """Example ids without a Python object per example: a `range` (ids that are positions, the common
    case), an int64 array, or strings packed as UTF-8 bytes with their end offsets. Other ids (tuples,
    floats, mixed types) stay a list. Items read back as plain Python values; an `Ids` equals a list or
    range of the same ids, and `index` looks an id up in O(log n) (a sorted array built on first use)."""

    def __init__(self, values: Any, name: str = "data"):
        self._range: range | None = None
        self._ints: np.ndarray | None = None
        self._text: tuple[np.ndarray, np.ndarray] | None = None  # (UTF-8 bytes, end offset of each id)
        self._list: list[Any] | None = None
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (sorted keys, their positions)
        if isinstance(values, range):
            self._range = values
            return
        if isinstance(values, torch.Tensor) and values.dim() == 1 and not values.dtype.is_floating_point \
                and values.dtype != torch.bool:
            values = values.cpu().numpy()
        if not hasattr(values, "__getitem__"):
            values = list(values)
        if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iu":
            self._set_ints(values.astype(np.int64))
            return
        first = plain_id(values[0], name) if len(values) else 0
        if type(first) is int:
            try:
                self._set_ints(np.fromiter((_int_id(v) for v in values), dtype=np.int64, count=len(values)))
                return
            except (_Other, OverflowError):
                pass
        elif isinstance(first, str):
            try:
                self._text = _pack_text(values)
                return
            except _Other:
                pass
        self._list = [plain_id(v, name) for v in values]

    def _set_ints(self, ints: np.ndarray) -> None:
        n = len(ints)
        if n and int(ints[-1]) - int(ints[0]) == n - 1 and bool(np.all(np.diff(ints) == 1)):
            self._range = range(int(ints[0]), int(ints[0]) + n)
        else:
            self._ints = ints

    def __len__(self) -> int:
        if self._range is not None:
            return len(self._range)
        if self._ints is not None:
            return len(self._ints)
        if self._text is not None:
            return len(self._text[1])
        return len(self._list)  # type: ignore[arg-type]

    def __getitem__(self, i: Any) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return self._slice(i)
        i = int(i.__index__())
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"id position {i} out of range for {n} ids")
        i %= n
        if self._range is not None:
            return self._range[i]
        if self._ints is not None:
            return int(self._ints[i])
        if self._text is not None:
            blob, ends = self._text
            return bytes(blob[(ends[i - 1] if i else 0): ends[i]]).decode()
        return self._list[i]  # type: ignore[index]

    def _slice(self, s: slice) -> Ids:
        if self._range is not None:
            return Ids(self._range[s])
        out = Ids(range(0))
        out._range = None
        if self._ints is not None:
            out._ints = self._ints[s]
        elif self._text is not None and s.step in (None, 1):
            lo, hi, _ = s.indices(len(self))
            blob, ends = self._text
            start = int(ends[lo - 1]) if lo else 0
            out._text = (blob[start: int(ends[hi - 1]) if hi > lo else start], ends[lo:max(lo, hi)] - start)
        else:
            out._list = [self[j] for j in range(*s.indices(len(self)))]
        return out

    def __iter__(self) -> Iterator[Any]:
        if self._range is not None:
            yield from self._range
        elif self._ints is not None:
            for lo in range(0, len(self._ints), CHUNK):
                yield from self._ints[lo: lo + CHUNK].tolist()
        elif self._text is not None:
            blob, ends = self._text
            start = 0
            for end in ends.tolist():
                yield bytes(blob[start:end]).decode()
                start = end
        else:
            yield from self._list  # type: ignore[misc]

    def __contains__(self, value: Any) -> bool:
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        """The position of the id `value` (ValueError if it is not one)."""
        if start != 0 or stop is not None:
            return super().index(value, start, len(self) if stop is None else stop)
        if self._range is not None:
            return self._range.index(value)
        if self._list is not None:
            return self._list.index(value)
        found = -1
        if isinstance(value, np.integer):
            value = int(value)
        if self._ints is not None and type(value) is int and -2**63 <= value < 2**63:
            keys, where = self._sorted()
            j = int(np.searchsorted(keys, value))
            found = int(where[j]) if j < len(keys) and keys[j] == value else -1
        elif self._text is not None and isinstance(value, str):
            keys, where = self._sorted()
            h = hash(value)
            j = int(np.searchsorted(keys, h))
            while found < 0 and j < len(keys) and keys[j] == h:
                found = int(where[j]) if self[int(where[j])] == value else -1
                j += 1
        if found < 0:
            raise ValueError(f"{value!r} is not among the ids")
        return found

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """Each id's key (the int, or a string's hash), sorted, with the positions they came from."""
        if self._lookup is None:
            keys = self._ints if self._ints is not None else \
                np.fromiter((hash(x) for x in self), dtype=np.int64, count=len(self))
            where = np.argsort(keys, kind="stable")
            self._lookup = (keys[where], where)
        return self._lookup

    def check_unique(self, name: str = "data") -> None:
        """Refuse ids that appear more than once (sorting arrays; no set of the ids is built)."""
        if self._range is not None:
            return
        if self._list is not None:
            dup = _first_duplicate(self._list)
        else:
            keys, where = self._sorted()
            same = np.flatnonzero(keys[1:] == keys[:-1])  # equal ints, or strings with equal hashes
            dup = None
            for j in same.tolist():
                a, b = self[int(where[j])], self[int(where[j + 1])]
                if a == b:
                    dup = a
                    break
                run = [self[int(w)] for w in where[keys == keys[j]]]  # a hash shared by other strings
                dup = _first_duplicate(run)
                if dup is not None:
                    break
        if dup is not None:
            raise ShapeError(f"{name}: example ids must be unique; {dup!r} appears more than once")

    def json_parts(self) -> Iterator[bytes]:
        """`json.dumps(list(ids))` in pieces, so a fingerprint of a million ids builds no such string."""
        yield b"["
        for lo in range(0, len(self), CHUNK):
            part = json.dumps(list(self[lo: lo + CHUNK]), default=str)[1:-1]
            yield (", " + part if lo else part).encode()
        yield b"]"

    def tolist(self) -> list[Any]:
        return list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ids) and self._range is not None and other._range is not None:
            return self._range == other._range
        if not isinstance(other, (Ids, list, range)) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if self._range is not None:
            return f"Ids({self._range!r})"
        head = list(self[:3])
        return f"Ids({head!r}{' + ' + str(len(self) - 3) + ' more' if len(self) > 3 else ''})"


class _Other(Exception):
    """An id of another kind than the first one (the ids stay a list)."""


def _int_id(value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, np.integer) or (isinstance(value, torch.Tensor) and value.dim() == 0
                                         and not value.dtype.is_floating_point and value.dtype != torch.bool):
        return int(value)
    raise _Other


def _pack_text(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Strings as one UTF-8 byte array and each one's end offset."""
    ends = np.empty(len(values), dtype=np.int64)
    blocks, end = [], 0
    for lo in range(0, len(values), CHUNK):
        encoded = []
        for j in range(lo, min(lo + CHUNK, len(values))):
            v = values[j]
            if isinstance(v, np.str_):
                v = str(v)
            if type(v) is not str:
                raise _Other
            b = v.encode()
            encoded.append(b)
            end += len(b)
            ends[j] = end
        blocks.append(b"".join(encoded))
    return np.frombuffer(b"".join(blocks), dtype=np.uint8), ends


def _first_duplicate(values: Iterable[Any]) -> Any:
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


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


def _own_ids(items: Any, n: int) -> Sequence[Any]:
    names = getattr(items, "column_names", None)
    if names is not None and "id" in names:
        return list(items["id"]) if _has_columns(items) else [items[i]["id"] for i in range(n)]
    if isinstance(items, list) and items and all(isinstance(x, dict) and "id" in x for x in items):
        return [x["id"] for x in items]
    return range(n)


def _has_columns(items: Any) -> bool:
    """Whether `items["id"]` gives a whole column (a `datasets.Dataset` does; a plain sequence may not)."""
    try:
        return len(items["id"]) == len(items)
    except (TypeError, KeyError, IndexError):
        return False


class LMExamples:
    """Rows of text mapped to `CausalLMTask` examples by a tokenizer, lazily (row i is tokenized when read).

    `rows` is any sequence of dict rows: a list of dicts, a JSONL path, or anything with `__len__` and
    `__getitem__(i)` returning a dict, such as a Hugging Face `datasets.Dataset` (its `column_names`, when
    present, are checked up front). The mapping, for each row:

    - `{"text": t}` (the column named by `text`) → `{"input_ids": tokenizer(t)["input_ids"]}`: every token
      after the first is scored (labels = input_ids);
    - `{"prompt": p, "completion": c}` (the columns named by `prompt`, `completion`) →
      `{"prompt": tokenizer(p)["input_ids"], "completion": ids of c without special tokens}`: only the
      completion is scored. The two are tokenized apart, so give the completion its leading space
      (" Paris") where the tokenizer marks spaces (GPT-2's BPE does);
    - a row that already has `input_ids` (token ids) is kept as it is (with its `labels`, if any).

    The tokenizer's own special tokens are added to `t` and `p` (Llama's adds BOS, GPT-2's adds none);
    `bos=True` / `eos=True` add the tokenizer's BOS before and EOS after when it does not. `max_length`
    keeps the first `max_length` tokens. An `id` column gives the example ids (as `Examples` reads it).
    """

    def __init__(self, rows: Any, tokenizer: Any, *, text: str = "text", prompt: str = "prompt",
                 completion: str = "completion", bos: bool = False, eos: bool = False,
                 max_length: int | None = None):
        if isinstance(rows, (str, os.PathLike)):
            rows = _read_jsonl(Path(rows))
        if isinstance(rows, Mapping) or not (hasattr(rows, "__len__") and hasattr(rows, "__getitem__")):
            raise ShapeError(f"rows must be a sequence of dict rows (a list of dicts, a datasets.Dataset, a "
                             f"JSONL path); got {type(rows).__name__}")
        if not callable(tokenizer):
            raise InvalidOptionError(f"tokenizer must be callable like a Hugging Face tokenizer "
                                     f"(tokenizer(text)['input_ids']); got {type(tokenizer).__name__}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise InvalidOptionError(f"max_length must be an int >= 2 (tokens kept per example); got "
                                     f"{max_length!r}")
        self.rows, self.tokenizer = rows, tokenizer
        self.text, self.prompt, self.completion = text, prompt, completion
        self.bos, self.eos, self.max_length = bos, eos, max_length
        names = getattr(rows, "column_names", None)
        if names is not None and text not in names and not {prompt, completion} <= set(names) \
                and "input_ids" not in names:
            raise ShapeError(f"rows have columns {list(names)}; an LM example needs {text!r}, or {prompt!r} "
                             f"and {completion!r}, or 'input_ids' (name yours with text=..., prompt=..., "
                             "completion=...)")
        first = rows[0] if names is None and len(rows) else None
        has_id = "id" in names if names is not None else isinstance(first, Mapping) and "id" in first
        self.column_names = ["id"] if has_id else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, str):  # the id column, as Examples reads it
            return [self.rows[j]["id"] for j in range(len(self))] if i == "id" else self.rows[i]
        return self.example(self.rows[i])

    def example(self, row: Any) -> dict[str, list[int]]:
        """One row as a `CausalLMTask` example (see the class docstring for the mapping)."""
        if isinstance(row, str):
            row = {self.text: row}
        if not isinstance(row, Mapping):
            raise ShapeError(f"each row must be a dict (e.g. {{{self.text!r}: '...'}}); got "
                             f"{type(row).__name__}")
        if "input_ids" in row:
            return {k: list(row[k]) for k in ("input_ids", "labels") if k in row}
        if self.prompt in row and self.completion in row:
            start = self._ids(row[self.prompt], self.prompt, special=True, eos=False)
            end = self._ids(row[self.completion], self.completion, special=False, bos=False)
            if self.max_length is not None:
                end = end[: max(0, self.max_length - len(start))]
            return {"prompt": start, "completion": end}
        if self.text in row:
            ids = self._ids(row[self.text], self.text, special=True)
            return {"input_ids": ids[: self.max_length] if self.max_length else ids}
        raise ShapeError(f"a row has keys {sorted(map(str, row))}; an LM example needs {self.text!r}, or "
                         f"{self.prompt!r} and {self.completion!r}, or 'input_ids' (name yours with "
                         "text=..., prompt=..., completion=...)")

    def _ids(self, value: Any, column: str, special: bool, bos: bool = True, eos: bool = True) -> list[int]:
        if not isinstance(value, str):
            raise ShapeError(f"column {column!r} must hold text; got {type(value).__name__} (rows of token "
                             "ids go in 'input_ids', or straight to the Attributor)")
        ids = list(self.tokenizer(value, add_special_tokens=special)["input_ids"])
        first = getattr(self.tokenizer, "bos_token_id", None)
        last = getattr(self.tokenizer, "eos_token_id", None)
        if bos and self.bos and first is not None and ids[:1] != [first]:
            ids = [first, *ids]
        if eos and self.eos and last is not None and ids[-1:] != [last]:
            ids = [*ids, last]
        return ids


def lm_examples(rows: Any, tokenizer: Any, **mapping: Any) -> LMExamples:
    """Text rows (a list of dicts, a `datasets.Dataset`, a JSONL path) as `CausalLMTask` examples.

    `LMExamples` documents the mapping and its options (`text=`, `prompt=`, `completion=`, `bos=`, `eos=`,
    `max_length=`); pass the result to `Attributor.fit` or `score`.
    """
    return LMExamples(rows, tokenizer, **mapping)


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

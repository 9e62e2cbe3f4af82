"""Retraining ground truth: train many models on subsets of the training data and measure the queries.

`retrain_subsets` trains one model per (random half of the data, seed) and records the query
measurements: the ground truth of the linear datamodeling score (`evaluate.lds`). `retrain_leave_one_out`
trains without one example at a time: the ground truth of `evaluate.loo`. Both run through one loop that
writes each finished model's measurements atomically into `workdir`, so a killed run resumes where it
stopped and gives the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .artifacts import atomic_write, atomic_write_json, check_manifest, read_json
from .errors import EmptyDataError, InvalidOptionError, NonFiniteError, ShapeError

TrainFn = Callable[[np.ndarray, int], Any]
MeasureFn = Callable[[Any], Any]

_ARRAYS = "arrays.npz"
_INFO = "info.json"


@dataclass(frozen=True, eq=False)  # arrays inside: == would be ambiguous
class SubsetRetraining:
    """Measurements of models trained on random subsets: `masks[m, i]` is True when example i was in subset m.

    `per_seed[m, s]` holds the query measurements of the model trained on subset m with `seeds[s]`;
    `measurements` is their mean over seeds, the quantity LDS correlates with.
    """

    masks: np.ndarray  # bool [M, n_train]
    measurements: np.ndarray  # float64 [M, n_query]
    per_seed: np.ndarray  # float64 [M, S, n_query]

    @property
    def n_train(self) -> int:
        return int(self.masks.shape[1])

    @property
    def n_query(self) -> int:
        return int(self.measurements.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write to folder `path` (arrays + a small JSON); read back with `SubsetRetraining.load`."""
        return _save(path, "subset-retraining", masks=self.masks, per_seed=self.per_seed)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SubsetRetraining:
        arrays = _load(path, "subset-retraining")
        per_seed = arrays["per_seed"]
        return cls(masks=arrays["masks"].astype(bool), measurements=per_seed.mean(axis=1), per_seed=per_seed)


@dataclass(frozen=True, eq=False)  # arrays inside: == would be ambiguous
class LeaveOneOut:
    """Measurements of the model trained on all data (`full`) and without each of `indices` (`removed`).

    `full - removed[k]` is the actual effect of training example `indices[k]` on each query: positive for a
    proponent, matching the sign of scores.
    """

    indices: np.ndarray  # int64 [K]
    full: np.ndarray  # float64 [n_query], mean over seeds
    removed: np.ndarray  # float64 [K, n_query], mean over seeds
    n_train: int
    full_per_seed: np.ndarray  # float64 [S, n_query]
    removed_per_seed: np.ndarray  # float64 [K, S, n_query]

    @property
    def effect(self) -> np.ndarray:
        """Actual effect of removal, `full - removed`, [K, n_query]."""
        return self.full[None, :] - self.removed

    def save(self, path: str | os.PathLike) -> Path:
        """Write to folder `path` (arrays + a small JSON); read back with `LeaveOneOut.load`."""
        return _save(
            path,
            "leave-one-out",
            indices=self.indices,
            n_train=np.asarray(self.n_train),
            full_per_seed=self.full_per_seed,
            removed_per_seed=self.removed_per_seed,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> LeaveOneOut:
        a = _load(path, "leave-one-out")
        return cls(
            indices=a["indices"],
            full=a["full_per_seed"].mean(axis=0),
            removed=a["removed_per_seed"].mean(axis=1),
            n_train=int(a["n_train"]),
            full_per_seed=a["full_per_seed"],
            removed_per_seed=a["removed_per_seed"],
        )


def retrain_subsets(
    train_fn: TrainFn,
    measure_fn: MeasureFn,
    n_train: int,
    *,
    n_subsets: int = 100,
    fraction: float = 0.5,
    seeds: Sequence[int] = (0, 1, 2),
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    fingerprint: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SubsetRetraining:
    """Train `n_subsets` × `len(seeds)` models, each on a random `fraction` of the training set.

    `train_fn(indices, seed)` trains a model on those training indices; `measure_fn(model)` returns its
    query measurements [n_query] (higher is better). Subsets are drawn from `seed`. With `workdir`, every
    finished model's measurements are kept on disk and a rerun skips them; `fingerprint` (e.g. of the model
    and data) is recorded in the manifest so that a workdir made for something else is refused.
    """
    n_train = _check_n_train(n_train)
    seeds = _check_seeds(seeds)
    if int(n_subsets) < 2:
        raise InvalidOptionError(
            f"n_subsets must be at least 2 (got {n_subsets}); LDS correlates over subsets"
        )
    n_subsets = int(n_subsets)
    if not 0.0 < float(fraction) < 1.0:
        raise InvalidOptionError(f"fraction must be strictly between 0 and 1 (got {fraction})")
    size = int(round(float(fraction) * n_train))
    if not 0 < size < n_train:
        raise InvalidOptionError(
            f"fraction {fraction} of {n_train} training examples gives subsets of {size}; "
            "choose a fraction that keeps at least one example in and one out"
        )

    folder = None if workdir is None else Path(workdir)
    masks = None
    if folder is not None:
        manifest = {
            "kind": "subset-retraining",
            "n_train": n_train,
            "n_subsets": n_subsets,
            "fraction": float(fraction),
            "seeds": list(seeds),
            "seed": int(seed),
            "fingerprint": fingerprint,
        }
        if check_manifest(folder, manifest, overwrite=overwrite) and (folder / "masks.npy").exists():
            # Reuse the stored subsets: a newer numpy may draw other ones from the same seed.
            masks = np.load(folder / "masks.npy")
    if masks is None:
        masks = _draw_masks(n_train, n_subsets, size, seed)
        if folder is not None:
            _write_npy(folder / "masks.npy", masks)

    jobs: list[tuple[Hashable, np.ndarray, int]] = [
        (("subset", m, s), np.flatnonzero(masks[m]), s) for m in range(n_subsets) for s in seeds
    ]
    done = _run(jobs, train_fn, measure_fn, folder, progress, "subset retraining")
    per_seed = np.stack([np.stack([done[("subset", m, s)] for s in seeds]) for m in range(n_subsets)])
    return SubsetRetraining(masks=masks, measurements=per_seed.mean(axis=1), per_seed=per_seed)


def retrain_leave_one_out(
    train_fn: TrainFn,
    measure_fn: MeasureFn,
    n_train: int,
    indices: Sequence[int] | np.ndarray,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    workdir: str | os.PathLike | None = None,
    fingerprint: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> LeaveOneOut:
    """Train on all data and once without each of `indices`, for every seed; cached like `retrain_subsets`.

    The same seed is used for the full model and the models without one example, so that their difference
    isolates the removal from the seed's own noise.
    """
    n_train = _check_n_train(n_train)
    seeds = _check_seeds(seeds)
    idx = np.asarray(indices)
    if idx.size == 0:
        raise EmptyDataError("indices is empty; pass the training indices to leave out one at a time")
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ShapeError(
            f"indices must be a 1-d sequence of integers, got dtype {idx.dtype} shape {idx.shape}"
        )
    idx = idx.astype(np.int64)
    if idx.min() < 0 or idx.max() >= n_train:
        raise ShapeError(
            f"indices must lie in 0..{n_train - 1} (n_train={n_train}); got {idx.min()}..{idx.max()}"
        )
    if np.unique(idx).size != idx.size:
        raise InvalidOptionError("indices contains repeated entries; each example is left out once")

    folder = None if workdir is None else Path(workdir)
    if folder is not None:
        digest = hashlib.sha256(idx.tobytes()).hexdigest()[:16]
        manifest = {
            "kind": "leave-one-out",
            "n_train": n_train,
            "n_indices": int(idx.size),
            "indices_sha256": digest,
            "seeds": list(seeds),
            "fingerprint": fingerprint,
        }
        check_manifest(folder, manifest, overwrite=overwrite)

    everything = np.arange(n_train)
    jobs: list[tuple[Hashable, np.ndarray, int]] = [(("full", s), everything, s) for s in seeds]
    jobs += [(("loo", int(i), s), np.delete(everything, i), s) for i in idx for s in seeds]
    done = _run(jobs, train_fn, measure_fn, folder, progress, "leave-one-out retraining")
    full = np.stack([done[("full", s)] for s in seeds])
    removed = np.stack([np.stack([done[("loo", int(i), s)] for s in seeds]) for i in idx])
    return LeaveOneOut(
        indices=idx,
        full=full.mean(axis=0),
        removed=removed.mean(axis=1),
        n_train=n_train,
        full_per_seed=full,
        removed_per_seed=removed,
    )


def _run(
    jobs: list[tuple[Hashable, np.ndarray, int]],
    train_fn: TrainFn,
    measure_fn: MeasureFn,
    folder: Path | None,
    progress: bool,
    desc: str,
) -> dict[Hashable, np.ndarray]:
    """Train and measure each (key, indices, seed) job, reusing and writing per-job files in `folder`."""
    results: dict[Hashable, np.ndarray] = {}
    todo = []
    for key, indices, s in jobs:
        path = None if folder is None else folder / "items" / (_item_name(key) + ".npy")
        if path is not None and path.exists():
            results[key] = _check_measurement(np.load(path), results, f"stored {path.name}")
        else:
            todo.append((key, indices, s, path))
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, disable=not progress) as bar:
        for key, indices, s, path in todo:
            model = train_fn(indices, s)
            values = _check_measurement(measure_fn(model), results, "measure_fn(model)")
            del model
            if path is not None:
                _write_npy(path, values)
            results[key] = values
            bar.update(1)
    return results


def _check_measurement(values: Any, seen: dict[Hashable, np.ndarray], what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly bfloat16 or on an accelerator
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim > 1:
        raise ShapeError(f"{what} returned shape {arr.shape}; return one value per query, shape [n_query]")
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise EmptyDataError(f"{what} returned no values; it should return one measurement per query")
    if seen:
        expected = next(iter(seen.values())).shape[0]
        if arr.shape[0] != expected:
            raise ShapeError(
                f"{what} returned {arr.shape[0]} values, earlier models gave {expected}; "
                "measure the same queries every time"
            )
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError(f"{what} returned NaN or infinite measurements; check the model's training")
    return arr


def _draw_masks(n_train: int, n_subsets: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for m in range(n_subsets):
        masks[m, rng.permutation(n_train)[:size]] = True
    return masks


def _item_name(key: Hashable) -> str:
    parts = key if isinstance(key, tuple) else (key,)
    return "-".join(str(p) for p in parts)


def _check_n_train(n_train: int) -> int:
    if int(n_train) <= 0:
        raise EmptyDataError(f"n_train is {n_train}; retraining needs a non-empty training set")
    return int(n_train)


def _check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(s) for s in seeds)
    if not out:
        raise InvalidOptionError("seeds is empty; pass at least one training seed, e.g. seeds=(0,)")
    if len(set(out)) != len(out):
        raise InvalidOptionError(f"seeds has repeated entries {out}; each seed trains one model per subset")
    return out


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object, so numpy does not append its own ".npy"
            np.save(fh, array)

    atomic_write(path, write)


def _save(path: str | os.PathLike, kind: str, **arrays: np.ndarray) -> Path:
    folder = Path(path)
    named: dict[str, Any] = arrays

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **named)

    atomic_write(folder / _ARRAYS, write)
    atomic_write_json(folder / _INFO, {"kind": kind, "shapes": {k: list(v.shape) for k, v in arrays.items()}})
    return folder


def _load(path: str | os.PathLike, kind: str) -> dict[str, np.ndarray]:
    folder = Path(path)
    if not (folder / _INFO).exists():
        raise FileNotFoundError(f"{folder} holds no saved retraining results ({_INFO} is missing)")
    found = read_json(folder / _INFO).get("kind")
    if found != kind:
        raise InvalidOptionError(
            f"{folder} holds {found!r} results, not {kind!r}; load it with the matching class"
        )
    with np.load(folder / _ARRAYS) as data:
        return {k: data[k] for k in data.files}

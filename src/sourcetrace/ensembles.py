"""Retraining: subsets of the training data as ground truth, and encoded ensembles for generative models.

`retrain_subsets` trains one model per (random half of the data, seed) and records the query
measurements: the ground truth of the linear datamodeling score (`evaluate.lds`). `retrain_leave_one_out`
trains without one example at a time: the ground truth of `evaluate.loo`. Both run through one loop that
writes each finished model's measurements atomically into `workdir`, so a killed run resumes where it
stopped and gives the same numbers as an uninterrupted one.

Encoded ensembles (`balanced_codes`, `train_members`, `EncodedEnsemble`) are retraining done once, up front:
every example is left out of half the members, so its removal is simulated by dropping them (diffusion
samples resampled with the same stored noise, or any mixed measurement).
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


# ---- encoded ensembles (Dai & Gifford 2023, arXiv 2306.02174) ------------------------------------------
def balanced_codes(n_examples: int, n_members: int, seed: int = 0) -> np.ndarray:
    """Unique random binary codes [n_examples, n_members] with exactly n_members / 2 ones each.

    Member j trains on the examples whose bit j is set; removing an example = dropping the members that
    saw it.
    """
    from math import comb

    n, e = _check_n_train(n_examples), int(n_members)
    if e < 2 or e % 2:
        raise InvalidOptionError(f"n_members must be even and at least 2 (got {n_members}): "
                                 "codes have E/2 ones")
    if comb(e, e // 2) < n:
        need = next(k for k in range(e, 64, 2) if comb(k, k // 2) >= n)
        raise InvalidOptionError(f"{e} members give only {comb(e, e // 2)} distinct balanced codes for {n} "
                                 f"examples; use n_members >= {need}")
    rng = np.random.default_rng(seed)
    if comb(e, e // 2) <= 200_000:  # enumerate and draw without replacement
        from itertools import combinations

        pool = list(combinations(range(e), e // 2))
        chosen = [pool[k] for k in rng.choice(len(pool), size=n, replace=False)]
    else:  # rejection: duplicates are rare when the code space is this large
        seen: set[tuple[int, ...]] = set()
        chosen = []
        while len(chosen) < n:
            ones = tuple(sorted(rng.choice(e, size=e // 2, replace=False).tolist()))
            if ones not in seen:
                seen.add(ones)
                chosen.append(ones)
    codes = np.zeros((n, e), dtype=bool)
    for row, ones in enumerate(chosen):
        codes[row, list(ones)] = True
    return codes


def train_members(
    train_fn: Callable[[np.ndarray, int], Any],
    codes: np.ndarray,
    *,
    workdir: str | os.PathLike | None = None,
    build_fn: Callable[[], Any] | None = None,
    fingerprint: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Any]:
    """Train member j of an encoded ensemble on the examples whose bit j is set, one after another.

    `train_fn(indices, j)` returns the trained torch module; one that uses the same training seed for every
    member (common random numbers) makes members differ only by their data, which shrinks the part of a
    counterfactual that comes from dropping other members' seeds (benchmarks/diffusion-digits.md). With
    `workdir`, each finished member's state_dict is written there atomically and a rerun loads it into
    `build_fn()` instead of retraining (so a killed run resumes); the codes and `fingerprint` are in the
    manifest, another ensemble is refused.
    """
    import torch

    codes = np.asarray(codes, dtype=bool)
    if codes.ndim != 2 or codes.shape[1] < 2:
        raise ShapeError(f"codes must be [n_examples, n_members]; got shape {codes.shape}")
    folder = None if workdir is None else Path(workdir)
    if folder is not None:
        if build_fn is None:
            raise InvalidOptionError("with workdir, give build_fn (a function returning an untrained member) "
                                     "so stored members can be loaded")
        manifest = {"kind": "encoded-ensemble",
                    "codes_sha256": hashlib.sha256(codes.tobytes()).hexdigest()[:16],
                    "shape": list(codes.shape), "fingerprint": fingerprint}
        check_manifest(folder, manifest, overwrite=overwrite)
    members = []
    for j in tqdm(range(codes.shape[1]), desc="ensemble members", disable=not progress):
        path = None if folder is None else folder / "members" / f"member-{j}.pt"
        if path is not None and path.exists():
            model = build_fn()  # type: ignore[misc]
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            model = train_fn(np.flatnonzero(codes[:, j]), j)
            if path is not None:
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}

                def write(tmp: str, state: dict[str, Any] = state) -> None:
                    torch.save(state, tmp)

                atomic_write(path, write)
        members.append(model)
    return members


class EncodedEnsemble:
    """Members trained on coded halves of the data; their ε predictions averaged at every reverse step.

    `weights` [E] mix the members' ε (default 1/E each). Removing a group of examples drops every member
    that saw any of them and spreads the weight over the rest: with the same stored noise, the resampled
    image is the counterfactual "what the ensemble makes without those examples".
    """

    def __init__(self, members: Sequence[Any], codes: np.ndarray, train_ids: Sequence[Any] | None = None):
        self.members = list(members)
        self.codes = np.asarray(codes, dtype=bool)
        if self.codes.ndim != 2 or self.codes.shape[1] != len(self.members):
            raise ShapeError(f"codes of shape {self.codes.shape} for {len(self.members)} members; "
                             "give one column per member")
        self.train_ids = list(range(self.codes.shape[0])) if train_ids is None else list(train_ids)
        if len(self.train_ids) != self.codes.shape[0]:
            raise ShapeError(f"{len(self.train_ids)} train ids for {self.codes.shape[0]} codes")

    @property
    def n_members(self) -> int:
        return len(self.members)

    def uniform_weights(self) -> Any:
        import torch

        return torch.full((self.n_members,), 1.0 / self.n_members)

    def weights_without(self, indices: int | Sequence[int]) -> Any:
        """Uniform weights over the members that saw none of the training examples at `indices`."""
        import torch

        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        keep = ~self.codes[idx].any(axis=0)
        if not keep.any():
            raise InvalidOptionError(f"every member saw one of the {idx.size} examples removed; no member is "
                                     "left to sample from (remove a smaller group or train more members)")
        return torch.as_tensor(keep / keep.sum(), dtype=torch.float32)

    def eps_fn(self, weights: Any = None, labels: Any = None, flatten: bool | None = None) -> Callable:
        """ε(x [N, *shape], t [N]) = Σ_j w_j ε_j; `weights` is [E] or one row per sample [N, E]."""
        from .diffusion import predict_eps

        w = self.uniform_weights() if weights is None else weights

        def eps(x: Any, t: Any) -> Any:
            y = None if labels is None else labels[:, None]
            total = 0.0
            for j, member in enumerate(self.members):
                wj = w[j] if w.dim() == 1 else w[:, j].reshape(-1, *([1] * (x.dim() - 1)))
                if w.dim() == 1 and not w.requires_grad and float(wj) == 0.0:
                    continue
                total = total + wj * predict_eps(member, x[:, None], t[:, None], y, flatten)[:, 0]
            return total

        return eps

    def sample(self, noise: Any, scheduler: Any, *, weights: Any = None, labels: Any = None,
               **sampling: Any) -> Any:
        """The ensemble's samples from the stored noise (a `diffusion.StoredNoise`); `sampling` holds the
        options of `diffusion.sample` (kind, num_steps, clip), the same for every call that is compared."""
        from .diffusion import sample

        return sample(self.eps_fn(weights, labels), noise, scheduler, **sampling)

    def counterfactual(self, noise: Any, scheduler: Any, remove: int | Sequence[int], *, labels: Any = None,
                       **sampling: Any) -> Any:
        """The samples the ensemble makes, from the same noise, without the training examples `remove`."""
        return self.sample(noise, scheduler, weights=self.weights_without(remove), labels=labels, **sampling)

    def influence(self, noise: Any, scheduler: Any, *, labels: Any = None, embed: Callable | None = None,
                  chunk: int = 128,
                  tolerance: float = 0.05, query_ids: Sequence[Any] | None = None,
                  progress: bool = True, **sampling: Any) -> Any:
        """Scores[q, i] = ‖sample_q − counterfactual_q without example i‖ (L2, or in `embed`'s space).

        Every training example gets its own counterfactual (codes are unique), sampled `chunk` codes at a
        time. Metadata: each query's counterfactual radius (its largest score; ABC, arXiv 2406.07908) and the
        "unattributable" flag: radius below `tolerance` × ‖sample‖ (no single example changes it).
        """
        import torch

        from .diffusion import StoredNoise, sample

        with torch.no_grad():
            full = self.sample(noise, scheduler, labels=labels, **sampling)
            n, q = self.codes.shape[0], len(noise)
            matrix = torch.zeros(q, n)
            ref = full if embed is None else embed(full)
            for lo in tqdm(range(0, n, chunk), desc="counterfactuals", disable=not progress):
                rows = np.arange(lo, min(lo + chunk, n))
                keep = torch.as_tensor(~self.codes[rows], dtype=torch.float32)
                w = (keep / keep.sum(1, keepdim=True)).repeat_interleave(q, 0)  # [C·Q, E]
                rep = StoredNoise(noise.start.repeat(len(rows), *([1] * (noise.start.dim() - 1))),
                                  noise.steps.repeat(1, len(rows), *([1] * (noise.steps.dim() - 2))))
                y = None if labels is None else labels.repeat(len(rows))
                cf = sample(self.eps_fn(w, y), rep, scheduler, **sampling)
                cf = cf if embed is None else embed(cf)
                diff = (cf.reshape(len(rows), q, -1) - ref.reshape(1, q, -1)).norm(dim=2)
                matrix[:, lo: lo + len(rows)] = diff.T
        return self._scores(matrix, full, tolerance, query_ids, "ensemble-counterfactual",
                            "l2" if embed is None else "embedding")

    def differential_ablation(self, noise: Any, scheduler: Any, *, labels: Any = None,
                              tolerance: float = 0.05,
                              query_ids: Sequence[Any] | None = None, **sampling: Any) -> Any:
        """First-order counterfactuals: ‖J δ_i‖, J = ∂sample/∂weights from `torch.func.jvp` (one per member).

        δ_i = weights_without(i) − uniform weights; E forward-mode passes replace n resamplings.
        """
        import torch

        jac = self.weight_jacobian(noise, scheduler, labels=labels, **sampling)
        full = jac["sample"]
        w0 = self.uniform_weights()
        keep = torch.as_tensor(~self.codes, dtype=torch.float32)
        delta = (keep / keep.sum(1, keepdim=True) - w0).to(full.dtype)  # [n, E]
        change = torch.einsum("ne,eqd->qnd", delta, jac["jacobian"].reshape(self.n_members, len(noise), -1))
        return self._scores(change.norm(dim=2), full, tolerance, query_ids, "ensemble-differential", "l2")

    def weight_jacobian(self, noise: Any, scheduler: Any, *, labels: Any = None, **sampling: Any
                        ) -> dict[str, Any]:
        """{"sample": [N, *shape], "jacobian": [E, N, *shape]}: ∂sample/∂w_j at the uniform weights."""
        import torch
        from torch.func import jvp

        from .diffusion import sample

        w0 = self.uniform_weights().to(noise.start.dtype)

        def run(w: Any) -> Any:
            return sample(self.eps_fn(w, labels), noise, scheduler, **sampling)

        cols = []
        out = None
        with torch.no_grad():
            for j in range(self.n_members):
                primal_and_tangent = jvp(run, (w0,), (torch.eye(self.n_members, dtype=w0.dtype)[j],))
                out = primal_and_tangent[0]
                cols.append(primal_and_tangent[1])
        return {"sample": out, "jacobian": torch.stack(cols)}

    def ablation_scores(self, task: Any, queries: Any, ids: Sequence[Any] | None = None,
                        batch_size: int = 64) -> Any:
        """Scores[q, i] = m(q; all members) − m(q; members that did not see i): the ensemble's removal effect.

        `task` must have `outputs` and `measurement_from_outputs` (e.g. DiffusionTask with "loss" or
        "square-norm"): the members' outputs are mixed with the weights, then measured. Positive = proponent.
        """
        import torch

        from .data import Examples
        from .scores import Scores
        from .tasks import collate

        if not (hasattr(task, "outputs") and hasattr(task, "measurement_from_outputs")):
            raise InvalidOptionError("ablation_scores needs a task with outputs() and "
                                     "measurement_from_outputs() "
                                     "(e.g. DiffusionTask with measurement 'loss' or 'square-norm')")
        examples = Examples(queries, ids, name="queries")
        keep = torch.as_tensor(~self.codes, dtype=torch.float32)
        weights = torch.cat([self.uniform_weights()[None], keep / keep.sum(1, keepdim=True)])  # [1 + n, E]
        rows = []
        with torch.no_grad():
            for _, chunk in examples.batches(batch_size):
                batch = collate(task, chunk)
                outs = torch.stack([task.outputs(m, batch) for m in self.members])  # [E, B, ...]
                mixed = [torch.einsum("e,e...->...", w.to(outs.dtype), outs) for w in weights]
                values = torch.stack([task.measurement_from_outputs(m, batch) for m in mixed])  # [1 + n, B]
                rows.append((values[0][None] - values[1:]).T)
        return Scores(torch.cat(rows).float(), list(self.train_ids), list(examples.ids),
                      method="ensemble-ablation", metadata={"members": self.n_members})

    def _scores(self, matrix: Any, full: Any, tolerance: float, query_ids: Sequence[Any] | None, method: str,
                distance: str) -> Any:
        from .scores import Scores

        radius = matrix.max(dim=1).values
        norms = full.reshape(full.shape[0], -1).norm(dim=1)
        qids = list(range(matrix.shape[0])) if query_ids is None else list(query_ids)
        return Scores(matrix.float(), list(self.train_ids), qids, method=method,
                      metadata={"distance": distance, "radius": radius.tolist(),
                                "unattributable": (radius < tolerance * norms).tolist(),
                                "members": self.n_members})

"""GradientStore: per-example feature rows (gradients or their projections) on disk, in shards.

Each shard holds `shard_size` consecutive rows in a `.npy` file that is preallocated under a temporary
name, filled batch by batch through a memory map and renamed into place once complete (so a shard on disk
is always whole). Reading maps one shard at a time (`np.load(mmap_mode=...)`) and unmaps it before the
next, so scoring streams a store of any size without holding it in RAM. A fit that is killed resumes by
computing only the shards that are missing. Rows may be kept in float64, float32, float16 or bfloat16
(numpy has no bfloat16: its bits are stored as uint16 and viewed back as torch.bfloat16).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artifacts import atomic_write, check_manifest, read_json

DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


class GradientStore:
    """Rows [n, dim] of per-example features, sharded on disk under `folder` (persist=False: in memory)."""

    def __init__(self, folder: str | os.PathLike, n: int, dim: int, *, dtype: str = "float32",
                 shard_size: int = 4096, key: dict[str, Any] | None = None, overwrite: bool = False,
                 persist: bool = True):
        if dtype not in DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
        self.folder = Path(folder)
        self.n, self.dim, self.dtype, self.shard_size = n, dim, dtype, max(1, int(shard_size))
        layout = {"kind": "gradient-store", "n": n, "dim": dim, "dtype": dtype, "shard_size": self.shard_size}
        check_manifest(self.folder, {**layout, **(key or {})}, overwrite=overwrite, what="gradient store")
        self.persist = persist  # False: shards live in memory only (a throwaway workdir)
        self._memory: dict[int, np.ndarray] = {}
        self._norms: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, folder: str | os.PathLike) -> GradientStore:
        """Open an existing store read-only (its manifest says how it is laid out)."""
        m = read_json(Path(folder) / "manifest.json")
        store = cls.__new__(cls)
        store.folder, store.n, store.dim = Path(folder), m["n"], m["dim"]
        store.dtype, store.shard_size = m["dtype"], m["shard_size"]
        store._memory, store._norms, store.persist = {}, {}, True
        return store

    # ---- layout --------------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the rows on disk (headers aside)."""
        return self.n * self.dim * np.dtype(DTYPES[self.dtype]).itemsize

    def bounds(self, k: int) -> tuple[int, int]:
        lo = k * self.shard_size
        return lo, min(lo + self.shard_size, self.n)

    def _path(self, k: int) -> Path:
        return self.folder / f"shard-{k:05d}.npy"

    def _norms_path(self, k: int) -> Path:
        return self.folder / f"sqnorm-{k:05d}.npy"

    def missing(self) -> list[int]:
        if not self.persist:
            return [k for k in range(self.num_shards) if k not in self._memory]
        return [k for k in range(self.num_shards) if not self._path(k).exists()]

    @property
    def complete(self) -> bool:
        return not self.missing()

    # ---- writing -------------------------------------------------------------------------------------
    def fill(self, rows: Callable[[int, int], torch.Tensor], *, batch_size: int, progress: bool = True,
             desc: str = "collect") -> None:
        """Compute every missing shard with `rows(lo, hi) -> [hi-lo, dim]` and write it atomically."""
        todo = self.missing()
        if not todo:
            return
        if self.persist:  # preallocated shards of a killed fill: one writer per store, so none is in use
            for stale in self.folder.glob(".*.tmp"):
                if stale.name.startswith((".shard-", ".sqnorm-")):
                    stale.unlink(missing_ok=True)
        done = self.n - sum(self.bounds(k)[1] - self.bounds(k)[0] for k in todo)
        with tqdm(total=self.n, initial=done, desc=desc, unit="ex", disable=not progress) as bar:
            for k in todo:
                lo, hi = self.bounds(k)

                def write(into: np.ndarray, lo: int = lo, hi: int = hi, k: int = k) -> None:
                    norms = np.empty(hi - lo, dtype=np.float64)
                    for start in range(lo, hi, batch_size):
                        stop = min(start + batch_size, hi)
                        block = rows(start, stop)
                        if block.shape != (stop - start, self.dim):
                            raise ValueError(f"feature rows of shape {tuple(block.shape)}, expected "
                                             f"{(stop - start, self.dim)}")
                        stored = self.to_numpy(block)
                        into[start - lo: stop - lo] = stored
                        back = self.to_torch(stored).double()  # the norms of the rows as stored
                        norms[start - lo: stop - lo] = back.pow(2).sum(1).numpy()
                        bar.update(stop - start)
                    self._norms[k] = norms

                shape = (hi - lo, self.dim)
                if not self.persist:
                    shard = np.empty(shape, dtype=DTYPES[self.dtype])
                    write(shard)
                    self._memory[k] = shard
                    continue
                # the norms first, so that a shard on disk always has its norms beside it
                atomic_write(self._path(k), functools.partial(_fill_npy, shape=shape,
                                                              dtype=DTYPES[self.dtype], write=write,
                                                              before=functools.partial(self._save_norms, k)))

    def write_at(self, indices: Any, rows: torch.Tensor) -> None:
        """Write rows at these positions, in any order (a shuffled training batch): each shard is gathered
        in a preallocated partial file and renamed into place once all its rows are written, so a killed
        run keeps what it wrote. A row already written keeps its first value."""
        if not self.persist:
            raise ValueError("write_at needs a store on disk (persist=True)")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.shape != (len(idx), self.dim):
            raise ValueError(f"{len(idx)} positions but rows of shape {tuple(rows.shape)}; expected "
                             f"{(len(idx), self.dim)}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"row positions must lie in [0, {self.n})")
        values = self.to_numpy(rows)
        shard_of = idx // self.shard_size
        for k in (int(k) for k in np.unique(shard_of)):
            if self._path(k).exists():
                continue
            lo, hi = self.bounds(k)
            part, seen = self.folder / f"partial-{k:05d}.npy", self.folder / f"partial-{k:05d}.mask.npy"
            mode = "r+" if part.exists() and seen.exists() else "w+"
            shape = (hi - lo, self.dim)
            mm = np.lib.format.open_memmap(part, mode=mode, dtype=DTYPES[self.dtype], shape=shape)
            mask = np.lib.format.open_memmap(seen, mode=mode, dtype=np.bool_, shape=(hi - lo,))
            at = np.nonzero(shard_of == k)[0]
            local = idx[at] - lo
            fresh = ~mask[local]
            mm[local[fresh]] = values[at[fresh]]
            mm.flush()
            mask[local[fresh]] = True  # after the rows: a row marked written is on disk
            mask.flush()
            full = bool(mask.all())
            if full:
                self._norms[k] = self.to_torch(np.asarray(mm)).double().pow(2).sum(1).numpy()
            del mm, mask
            if full:
                self._save_norms(k)
                with open(part, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(part, self._path(k))
                seen.unlink()

    def _save_norms(self, k: int) -> None:
        """Write shard k's squared norms beside it and drop them from memory (read back when needed)."""
        atomic_write(self._norms_path(k), functools.partial(_save_npy, array=self._norms.pop(k)))

    def to_numpy(self, rows: torch.Tensor) -> np.ndarray:
        """Rows as this store keeps them (bfloat16 as its uint16 bits)."""
        t = rows.detach().cpu().to(TORCH_DTYPES[self.dtype])
        return t.view(torch.int16).numpy().view(np.uint16) if self.dtype == "bfloat16" else t.numpy()

    def to_torch(self, array: np.ndarray) -> torch.Tensor:
        """A stored block as a tensor of the store's dtype (no copy: a memory map stays a memory map)."""
        if self.dtype == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)

    # ---- reading -------------------------------------------------------------------------------------
    def shards(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield `(lo, hi, rows)` per shard; a stored shard is a memory map (copy-on-write), opened when it
        is reached and released when the next is, so at most one shard's pages are mapped at a time."""
        missing = self.missing()
        if missing:
            raise FileNotFoundError(f"gradient store {self.folder} is incomplete ({len(missing)} shards "
                                    "missing); run fit() again to finish it")
        for k in range(self.num_shards):
            lo, hi = self.bounds(k)
            shard = self._memory.get(k)
            if shard is None:
                shard = np.load(self._path(k), mmap_mode="c")
            yield lo, hi, self.to_torch(shard)
            del shard

    def sqnorms(self) -> torch.Tensor:
        """Squared norm of every row [n] (float64), kept while filling: free self-influence and cosines."""
        parts = [self._norms[k] if k in self._norms else np.load(self._norms_path(k), mmap_mode="r")
                 for k in range(self.num_shards)]
        return torch.from_numpy(np.concatenate(parts))

    def take(self, indices: Any) -> torch.Tensor:
        """Rows at `indices` (any order), in that order: each shard holding some is mapped once."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"row indices must lie in [0, {self.n})")
        out = torch.empty(len(idx), self.dim, dtype=TORCH_DTYPES[self.dtype])
        shard_of = idx // self.shard_size
        for k in np.unique(shard_of):
            at = np.nonzero(shard_of == k)[0]
            shard = self._memory.get(int(k))
            if shard is None:
                shard = np.load(self._path(int(k)), mmap_mode="r")
            rows = np.ascontiguousarray(shard[idx[at] - k * self.shard_size])
            out[torch.from_numpy(at)] = self.to_torch(rows)
        return out

    def read(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Rows [lo, hi) as one tensor in memory (for small stores and tests)."""
        hi = self.n if hi is None else hi
        parts = [r[max(lo, a) - a: min(hi, b) - a].clone() for a, b, r in self.shards() if a < hi and b > lo]
        return torch.cat(parts) if parts else torch.empty(0, self.dim, dtype=TORCH_DTYPES[self.dtype])


def _fill_npy(path: str, shape: tuple[int, int], dtype: Any, write: Callable[[np.ndarray], None],
              before: Callable[[], None]) -> None:
    """Preallocate a .npy file at `path`, fill it through a memory map, and flush it."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        write(mm)
        mm.flush()
    finally:
        del mm
    before()


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)

"""GradientStore: per-example feature rows (gradients or their projections) on disk, in shards.

Each shard holds `shard_size` consecutive rows as a `.npy` file, written atomically, and is read back
as a memory map, so scoring streams the store without loading it into RAM. A fit that is killed
resumes by computing only the shards that are missing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..artifacts import atomic_write, check_manifest, read_json

DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}
MEMORY_BUDGET = 1 << 30  # shards a store has just written stay in memory up to this many bytes


class GradientStore:
    """Rows [n, dim] of per-example features, sharded on disk under `folder`."""

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
        done = self.n - sum(self.bounds(k)[1] - self.bounds(k)[0] for k in todo)
        # shards are written by a background thread while the next one is computed
        with tqdm(total=self.n, initial=done, desc=desc, unit="ex", disable=not progress) as bar, \
                ThreadPoolExecutor(max_workers=1) as writer:
            pending: list[Future] = []
            for k in todo:
                lo, hi = self.bounds(k)
                shard = np.empty((hi - lo, self.dim), dtype=DTYPES[self.dtype])
                for start in range(lo, hi, batch_size):
                    stop = min(start + batch_size, hi)
                    block = rows(start, stop)
                    if block.shape != (stop - start, self.dim):
                        raise ValueError(f"feature rows of shape {tuple(block.shape)}, expected "
                                         f"{(stop - start, self.dim)}")
                    shard[start - lo: stop - lo] = block.detach().cpu().numpy()
                    bar.update(stop - start)
                self._norms[k] = np.einsum("ij,ij->i", shard, shard, dtype=np.float64)
                if self.persist:
                    pending.append(writer.submit(self._write, k, shard))
                held = sum(a.nbytes for a in self._memory.values()) + shard.nbytes
                if not self.persist or held <= MEMORY_BUDGET:
                    self._memory[k] = shard
            for done_write in pending:
                done_write.result()  # a failed write raises here

    def _write(self, k: int, shard: np.ndarray) -> None:
        # squared row norms first, so that a shard on disk always has its norms beside it
        atomic_write(self._norms_path(k), functools.partial(_save_npy, array=self._norms[k]))
        atomic_write(self._path(k), functools.partial(_save_npy, array=shard))

    # ---- reading -------------------------------------------------------------------------------------
    def shards(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield `(lo, hi, rows)` per shard: from memory if this store just wrote it, else from disk."""
        missing = self.missing()
        if missing:
            raise FileNotFoundError(f"gradient store {self.folder} is incomplete ({len(missing)} shards "
                                    "missing); run fit() again to finish it")
        for k in range(self.num_shards):
            lo, hi = self.bounds(k)
            shard = self._memory.get(k)
            if shard is None:
                shard = np.load(self._path(k))  # one shard in memory at a time
            yield lo, hi, torch.from_numpy(shard)

    def sqnorms(self) -> torch.Tensor:
        """Squared norm of every row [n] (float64), kept while filling: free self-influence and cosines."""
        parts = [self._norms[k] if k in self._norms else np.load(self._norms_path(k))
                 for k in range(self.num_shards)]
        return torch.from_numpy(np.concatenate(parts))

    def read(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Rows [lo, hi) as one tensor (for small stores and tests)."""
        hi = self.n if hi is None else hi
        parts = [r[max(lo, a) - a: min(hi, b) - a] for a, b, r in self.shards() if a < hi and b > lo]
        return torch.cat(parts) if parts else torch.empty(0, self.dim)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)

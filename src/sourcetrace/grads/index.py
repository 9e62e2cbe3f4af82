"""GradientIndex: a FAISS inner-product index over a GradientStore, for interactive top-k queries.

A score is an inner product, score(q, i) = w · (-(P q)ᵀ g_i), so a query's strongest proponents are the
largest inner products of the stored rows with -w P q and its strongest opponents those with +w P q.
`kind="flat"` searches exactly (FAISS IndexFlatIP, every row in RAM as float32); `kind="ivfflat"` clusters
the rows (IVF) and searches the `nprobe` clusters nearest each query, over uncompressed rows (scores exact,
which rows make the top k approximate); `kind="ivfpq"` clusters
the rows (IVF) and compresses them (product quantisation) for stores of millions of rows, searches
`rerank` × k candidates and rescores them exactly from the store, so the returned scores are exact and only
which rows make the top k is approximate (`recall` measures it against exact streaming). `kind="auto"`
is flat below IVF_THRESHOLD rows and IVF-Flat from there. FAISS is an extra: `pip install sourcetrace[index]`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import atomic_write, check_manifest
from ..errors import InvalidOptionError, MissingExtraError, ShapeError
from ..scores import Scores
from .store import GradientStore

KINDS = ("auto", "flat", "ivfflat", "ivfpq")
IVF_THRESHOLD = 100_000  # rows from which kind="auto" builds IVF-Flat instead of the exact flat index


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise MissingExtraError("the gradient index needs FAISS: pip install sourcetrace[index] "
                                "(faiss-cpu)") from exc
    return faiss


class GradientIndex:
    """An inner-product index over the rows of `store` (normalize=True: over unit rows, for cosines).

    `folder`: where the index is kept (a rerun with the same store and settings loads it); nlist, m and
    nprobe: the IVF indexes' number of clusters, (IVF-PQ's) sub-quantisers and clusters searched (defaults
    scale with n).
    """

    def __init__(self, store: GradientStore, *, kind: str = "auto", normalize: bool = False,
                 folder: str | os.PathLike | None = None, nlist: int | None = None, m: int | None = None,
                 nprobe: int | None = None, rerank: int = 10, seed: int = 0, progress: bool = True):
        if kind not in KINDS:
            raise InvalidOptionError(f"index kind must be one of {', '.join(KINDS)}; got {kind!r}")
        faiss = _faiss()
        self.store, self.normalize, self.rerank = store, normalize, max(1, int(rerank))
        self.kind = kind if kind != "auto" else ("ivfflat" if store.n >= IVF_THRESHOLD else "flat")
        n, dim = store.n, store.dim
        self.nlist = nlist or max(1, min(int(math.sqrt(n)), n // 39))  # FAISS wants ≥ 39 rows a cluster
        self.m = m or _subquantisers(dim)
        self.nprobe = nprobe or max(1, self.nlist // 16)
        path = None
        if folder is not None:
            key = {"kind": "gradient-index", "index": self.kind, "store": str(store.folder), "n": n,
                   "dim": dim, "normalize": normalize, "nlist": self.nlist, "m": self.m, "seed": seed}
            folder = Path(folder)
            path = folder / "index.faiss"
            if check_manifest(folder, key, what="gradient index") and path.exists():
                self.index = faiss.read_index(str(path))
                if self.kind != "flat":
                    self.index.nprobe = self.nprobe
                return
        if self.kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        elif self.kind == "ivfflat":
            self._quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFFlat(self._quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.train(self._sample(40 * self.nlist, seed))
        else:
            if dim % self.m:
                raise InvalidOptionError(f"m={self.m} sub-quantisers must divide the row width {dim}")
            quantizer = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFPQ(quantizer, dim, self.nlist, self.m, 8, faiss.METRIC_INNER_PRODUCT)
            self._quantizer = quantizer
            # 40 rows a cluster, and 10,000 for the 256 codewords of each sub-quantiser
            self.index.train(self._sample(max(40 * self.nlist, 10_000), seed))
        from tqdm.auto import tqdm

        if self.kind == "flat":
            for _, _, rows in tqdm(store.shards(), total=store.num_shards, desc="index",
                                   disable=not progress):
                self.index.add(self._prepare(rows))
        else:
            self._add_presized(faiss, progress)
            self.index.nprobe = self.nprobe
        if path is not None:
            atomic_write(path, lambda tmp: faiss.write_index(self.index, tmp))

    def _add_presized(self, faiss: Any, progress: bool) -> None:
        """Add the rows to the IVF lists, each list allocated once at its final size: a first pass assigns
        every row to its cluster, a second adds the rows with those assignments. (Lists grown shard by
        shard reallocate and end up to twice their size: 1.6 × the rows at 10^6 rows.)"""
        from tqdm.auto import tqdm

        assign = np.empty(self.store.n, dtype=np.int64)  # 8 bytes a row, as FAISS keeps each row's id
        for lo, hi, rows in self.store.shards():
            assign[lo:hi] = self._quantizer.assign(self._prepare(rows), 1)[:, 0]
        lists = self.index.invlists
        for cluster, size in enumerate(np.bincount(assign, minlength=self.nlist).tolist()):
            lists.resize(cluster, size)  # capacity = size; resizing to 0 keeps the capacity
            lists.resize(cluster, 0)
        for lo, hi, rows in tqdm(self.store.shards(), total=self.store.num_shards, desc="index",
                                 disable=not progress):
            x, ids = self._prepare(rows), np.arange(lo, hi, dtype=np.int64)
            self.index.add_core(hi - lo, faiss.swig_ptr(x), faiss.swig_ptr(ids),
                                faiss.swig_ptr(assign[lo:hi]))
        self.index.ntotal = self.store.n

    def _prepare(self, rows: torch.Tensor) -> np.ndarray:
        x = rows.float()
        if self.normalize:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return np.ascontiguousarray(x.numpy())

    def _sample(self, size: int, seed: int) -> np.ndarray:
        """A seeded sample of the rows, for training the clusters and codebooks."""
        n = self.store.n
        take = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
        return self._prepare(self.store.take(take))

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest inner products of each query row with the stored rows: values and row indices
        [n_query, k], descending (float64 values; IVF-PQ's recomputed exactly from the store)."""
        if queries.dim() != 2 or queries.shape[1] != self.store.dim:
            raise ShapeError(f"query rows must be [n, {self.store.dim}]; got {tuple(queries.shape)}")
        k = min(int(k), self.store.n)
        q = np.ascontiguousarray(queries.float().numpy())
        if self.kind != "ivfpq":  # flat and IVF-Flat hold the rows themselves: their scores are exact
            values, index = self.index.search(q, k)
            return torch.from_numpy(values).double(), torch.from_numpy(index).long()
        _, cand = self.index.search(q, min(self.store.n, self.rerank * k))
        out_v = torch.full((len(q), k), -math.inf, dtype=torch.float64)
        out_i = torch.full((len(q), k), -1, dtype=torch.long)
        for r in range(len(q)):
            ids = cand[r][cand[r] >= 0]
            rows = self.store.take(ids).double()
            if self.normalize:
                rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            exact = rows @ queries[r].double()
            v, j = exact.topk(min(k, len(ids)))
            out_v[r, :len(v)], out_i[r, :len(v)] = v, torch.from_numpy(ids)[j]
        return out_v, out_i

    def scores(self, queries: torch.Tensor, k: int, *, train_ids: Sequence[Any], query_ids: Sequence[Any],
               weight: float = 1.0, method: str = "", metadata: dict[str, Any] | None = None) -> Scores:
        """Top-k `Scores` of preconditioned query rows, with score(q, i) = -weight · qᵀ g_i (the sign
        convention of `sourcetrace.scores`): proponents from the largest of -weight·q, opponents from +."""
        if len(train_ids) != self.store.n:
            raise ShapeError(f"{len(train_ids)} training ids for a store of {self.store.n} rows")
        top_v, top_i = self.search(-weight * queries.double(), k)
        neg_v, bot_i = self.search(weight * queries.double(), k)
        return Scores(matrix=None, train_ids=train_ids, query_ids=query_ids, method=method,
                      metadata={"index": self.kind, **(metadata or {})}, top_values=top_v, top_indices=top_i,
                      bottom_values=-neg_v, bottom_indices=bot_i)


def _subquantisers(dim: int) -> int:
    """The most sub-quantisers (at most 64) that divide `dim` into pieces of at least 8 dimensions: one
    byte per 8 dimensions, the usual PQ trade-off (its candidates are rescored exactly anyway)."""
    for m in range(min(64, dim // 8), 0, -1):
        if dim % m == 0:
            return m
    return 1


def index_attributor(attributor: Any, **options: Any) -> AttributorIndex:
    """A `GradientIndex` over a fitted Attributor's training store, queried with the Attributor's own query
    features (`AttributorIndex.score`). Compositions with one checkpoint and no per-example column or
    final rescaling (grad-dot, grad-cos, influence with any preconditioner, LoGra) score as inner products;
    others (TRAK's ensemble, DDA, RelatIF) are refused."""
    return AttributorIndex(attributor, **options)


class AttributorIndex:
    """A FAISS index bound to a fitted Attributor: `score(queries, k)` returns its top-k `Scores`."""

    def __init__(self, attributor: Any, **options: Any):
        method: Any = getattr(attributor, "method", None)
        stores = getattr(method, "stores", None)
        if not getattr(attributor, "is_fitted", False) or not stores:
            raise InvalidOptionError("index a fitted Attributor of a gradient method: call fit() first")
        comb = method.combination
        cosine = bool(method.options.cosine)
        if len(stores) != 1 or method.final is not None or comb.columns[0] is not None or comb.standardize:
            raise InvalidOptionError(f"method {method.name!r} with these options rescales scores per "
                                     "training example or combines checkpoints, which an inner-product "
                                     "index cannot hold; score it with attributor.score(queries, top_k=k)")
        self.attributor, self.method, self.weight = attributor, method, float(comb.weights[0])
        folder = options.pop("folder", attributor.workdir / "index" if method.stores[0].persist else None)
        self.index = GradientIndex(stores[0], normalize=cosine, folder=folder, **options)

    def score(self, queries: Any, k: int = 10, ids: list[Any] | None = None) -> Scores:
        from ..data import Examples

        examples = Examples(queries, ids, name="queries")
        rows = self.method.query_features(self.attributor.ctx, examples)[0]
        return self.index.scores(rows, k, train_ids=self.method.train_ids, query_ids=examples.ids,
                                 weight=self.weight, method=self.method.name)


__all__ = ["IVF_THRESHOLD", "KINDS", "AttributorIndex", "GradientIndex", "index_attributor"]

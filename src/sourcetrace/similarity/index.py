"""SimilarityIndex: unit vectors of training items in FAISS, with their ids and metadata, searched by cosine.

Layout of an index folder:

    manifest.json      format, embedder fingerprint, dimension, count, FAISS kind and its settings
    vectors.npy        the vectors [n, d] (float32, unit rows): exact re-scoring and per-track aggregation
    items.jsonl        one JSON object per vector: its `id` and metadata (e.g. `track`, `offset`)
    faiss.index        the FAISS index (flat inner product, IVF or HNSW)
    embedder.json/.npz the embedder's name, settings and fitted state, when it can be rebuilt from them

A build embeds its units (files, batches) into parts inside a hidden sibling folder, one part per unit,
each written atomically; rerun with the same units and embedder, it resumes after the last finished part.
The finished folder is renamed into place, so an interrupted build never leaves a half-written index.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import atomic_write, atomic_write_json, check_manifest, read_json
from ..errors import EmptyDataError, InvalidOptionError, ShapeError, SourcetraceError, require
from ..scores import Scores
from .clips import TrackMatch, aggregate_tracks

FORMAT = "sourcetrace.similarity/1"
FLAT_MAX = 200_000  # "auto" keeps exact search up to this many vectors, IVF past it
KINDS = ("auto", "flat", "ivf", "hnsw")


class IndexMismatchError(SourcetraceError, ValueError):
    """Query vectors made by another embedder than the index's."""


def _faiss() -> Any:
    return require("faiss", "index")


def unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def make_faiss(vectors: np.ndarray, kind: str, *, nlist: int | None = None, nprobe: int = 16,
               hnsw_m: int = 32, ef_search: int = 128, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A FAISS inner-product index over `vectors` and the settings that made it."""
    faiss = _faiss()
    n, d = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else "ivf"
    if kind == "flat":
        index, settings = faiss.IndexFlatIP(d), {}
    elif kind == "ivf":
        nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
        index.cp.seed = seed
        index.train(np.ascontiguousarray(sample))
        index.nprobe = min(nprobe, nlist)
        settings = {"nlist": nlist, "nprobe": index.nprobe}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
        settings = {"m": hnsw_m, "ef_search": ef_search}
    else:
        raise InvalidOptionError(f"index kind must be one of {', '.join(KINDS)}; got {kind!r}")
    for start in range(0, n, 65536):
        index.add(np.ascontiguousarray(vectors[start:start + 65536]))
    return index, {"kind": kind, **settings}


class SimilarityIndex:
    """A built index folder, opened for search (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "manifest.json").exists():
            raise FileNotFoundError(f"{self.path} holds no similarity index (manifest.json is missing); "
                                    "build one with `sourcetrace similarity build`")
        self.manifest = read_json(self.path / "manifest.json")
        if self.manifest.get("format") != FORMAT:
            raise SourcetraceError(f"{self.path} is not a {FORMAT} index "
                                   f"(format {self.manifest.get('format')!r})")
        self.vectors = np.load(self.path / "vectors.npy", mmap_mode="r")
        with open(self.path / "items.jsonl", encoding="utf-8") as fh:
            self.items = [json.loads(line) for line in fh]
        self.ids = [item["id"] for item in self.items]
        self._faiss: Any = None

    # -- building -----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, path: str | os.PathLike, units: Sequence[str],
              embed_unit: Callable[[int], tuple[np.ndarray, list[dict[str, Any]]]], *, fingerprint: str,
              embedder: Any = None, kind: str = "auto", info: dict[str, Any] | None = None,
              overwrite: bool = False, progress: bool = True, **faiss_options: Any) -> SimilarityIndex:
        """Embed each unit (`embed_unit(i) -> (vectors [m, d], one metadata dict per vector)`) and index them.

        `units` name the work (e.g. file paths with sizes); with `fingerprint` they decide whether a killed
        build resumes. Every metadata dict needs a unique `id`. `embedder` (optional) is stored so that
        queries can rebuild it. `info` is kept in the manifest.
        """
        from tqdm.auto import tqdm

        if kind not in KINDS:
            raise InvalidOptionError(f"index kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if not units:
            raise EmptyDataError("nothing to index: no units (files or batches) were given")
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise SourcetraceError(f"{path} already exists; choose another output folder or pass "
                                   "--overwrite (overwrite=True) to replace it")
        building = path.parent / f".{path.name}.building"
        plan = {"format": FORMAT, "fingerprint": fingerprint, "units": list(units), "kind": kind,
                "faiss_options": faiss_options}
        check_manifest(building, plan, overwrite=True, what="partial index build")
        parts = building / "parts"
        for i in tqdm(range(len(units)), desc="embed", unit="unit", disable=not progress):
            part = parts / f"{i:07d}.npz"
            if part.exists():
                continue
            vectors, metas = embed_unit(i)
            vectors = np.asarray(vectors, dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(metas):
                raise ShapeError(f"unit {units[i]!r} gave vectors of shape {vectors.shape} for {len(metas)} "
                                 "metadata entries; give one metadata dict per vector")
            text = json.dumps(metas, default=str)
            atomic_write(part, functools.partial(save_npz, vectors=vectors, meta=text))
        blocks, items = [], []
        for i in range(len(units)):
            with np.load(parts / f"{i:07d}.npz") as z:
                blocks.append(z["vectors"])
                items += json.loads(str(z["meta"]))
        dims = {b.shape[1] for b in blocks if len(b)}
        if not items:
            raise EmptyDataError("no vectors to index: every unit gave none")
        if len(dims) != 1:
            raise ShapeError(f"units gave vectors of different widths {sorted(dims)}; use one embedder")
        ids = [item.get("id") for item in items]
        if None in ids or len(set(map(str, ids))) != len(ids):
            raise ShapeError("every indexed item needs a unique `id` in its metadata")
        vectors = unit(np.concatenate([b for b in blocks if len(b)]))
        done = building / "done"
        if done.exists():
            shutil.rmtree(done)
        done.mkdir()
        np.save(done / "vectors.npy", vectors)
        with open(done / "items.jsonl", "w", encoding="utf-8") as fh:
            for item in items:
                fh.write(json.dumps(item, default=str) + "\n")
        index, settings = make_faiss(vectors, kind, **faiss_options)
        _faiss().write_index(index, str(done / "faiss.index"))
        if embedder is not None and hasattr(embedder, "state_dict"):
            atomic_write_json(done / "embedder.json", {"name": embedder.name, "config": embedder.config})
            save_npz(str(done / "embedder.npz"), **embedder.state_dict())
        atomic_write_json(done / "manifest.json", {
            "format": FORMAT, "fingerprint": fingerprint, "dim": int(vectors.shape[1]), "count": len(items),
            "faiss": settings, "info": info or {}})
        if path.exists():
            shutil.rmtree(path)
        os.replace(done, path)
        shutil.rmtree(building)
        return cls(path)

    # -- searching ----------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def faiss_index(self) -> Any:
        if self._faiss is None:
            self._faiss = _faiss().read_index(str(self.path / "faiss.index"))
        return self._faiss

    def __len__(self) -> int:
        return len(self.items)

    def check(self, vectors: np.ndarray, fingerprint: str) -> np.ndarray:
        if fingerprint != self.fingerprint:
            raise IndexMismatchError(
                f"the index {self.path} was built with embedder {self.fingerprint[:80]!r}, but the query "
                f"vectors come from {fingerprint[:80]!r}; embed queries with the index's embedder "
                "(SimilarityIndex.embedder()) or build an index with this one")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.manifest["dim"]:
            raise ShapeError(f"query vectors of shape {vectors.shape}; the index holds "
                             f"{self.manifest['dim']}-d vectors")
        return unit(vectors)

    def search(self, vectors: np.ndarray, k: int = 10, *, fingerprint: str) -> Scores:
        """The k most similar indexed items of each query vector (cosine), as top-k `Scores`."""
        q = self.check(vectors, fingerprint)
        k = max(1, min(int(k), len(self)))
        values, indices = self.faiss_index.search(q, k)
        missing = (indices < 0).any(axis=1)
        if missing.any():  # an IVF probe that found fewer than k: answer those rows exactly
            exact = q[missing] @ np.asarray(self.vectors).T
            order = np.argsort(-exact, axis=1)[:, :k]
            indices[missing], values[missing] = order, np.take_along_axis(exact, order, 1)
        import torch

        return Scores(None, self.ids, [f"q{i}" for i in range(len(q))], method="similarity",
                      metadata={"embedder": self.fingerprint, "index": self.manifest["faiss"]},
                      top_values=torch.from_numpy(values.copy()),
                      top_indices=torch.from_numpy(indices.copy()))

    def track_of(self, row: int) -> str:
        item = self.items[int(row)]
        return str(item.get("track", item["id"]))

    def tracks(self) -> dict[str, np.ndarray]:
        """Rows of each track (items with a `track` key), in index order."""
        if not hasattr(self, "_tracks"):
            rows: dict[str, list[int]] = {}
            for i in range(len(self.items)):
                rows.setdefault(self.track_of(i), []).append(i)
            self._tracks = {t: np.asarray(r) for t, r in rows.items()}
        return self._tracks

    def match_tracks(self, vectors: np.ndarray, offsets: np.ndarray, *, fingerprint: str, k: int = 10,
                     how: str = "max", candidates: int = 64) -> list[TrackMatch]:
        """Training tracks most similar to one query track (its clips' vectors and offsets), best first.

        Tracks holding one of each query clip's `candidates` nearest clips are re-scored exactly over all
        their clip pairs (`max` or `mean` cosine, see `clips.aggregate_tracks`).
        """
        q = self.check(vectors, fingerprint)
        near = self.search(q, candidates, fingerprint=fingerprint).top_indices.numpy()  # type: ignore[union-attr]
        tracks = self.tracks()
        names = list(dict.fromkeys(self.track_of(i) for i in near.ravel()))
        order = np.sort(np.concatenate([tracks[t] for t in names]))
        train = np.asarray(self.vectors[order])
        labels = [self.track_of(i) for i in order]
        starts = np.asarray([float(self.items[i].get("offset", 0.0)) for i in order])
        return aggregate_tracks(q, np.asarray(offsets, dtype=float), train, labels, starts, how)[:k]

    def embedder(self) -> Any:
        """The embedder the index was built with, rebuilt from its stored name, settings and state."""
        from .embedders import make_embedder

        spec_path = self.path / "embedder.json"
        if not spec_path.exists():
            raise SourcetraceError(f"{self.path} does not store its embedder; embed queries yourself with "
                                   f"the embedder whose fingerprint is {self.fingerprint[:80]!r}")
        spec = read_json(spec_path)
        emb = make_embedder(spec["name"], **spec["config"])
        with np.load(self.path / "embedder.npz") as z:
            emb.load_state_dict({k: z[k] for k in z.files})
        if emb.fingerprint != self.fingerprint:
            raise IndexMismatchError(f"the embedder stored in {self.path} no longer gives the fingerprint "
                                     "the index was built with; rebuild the index")
        return emb

    def __repr__(self) -> str:
        return f"SimilarityIndex({self.path}, {len(self)} vectors, {self.manifest['faiss']})"


def save_npz(path: str, **arrays: Any) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)

"""Suffix-array engines behind a CorpusIndex: the packaged infini-gram engine and a portable numpy one.

Both read the same shard files, written by the index in infini-gram's on-disk layout:

- `tokenized.SSSS`: for each document a separator (all bits set) followed by its token ids, little-endian;
- `offset.SSSS`: one u64 byte offset per document.

The infini-gram engine adds `table.SSSS` (its suffix array, built by its packaged `rust_indexing` binary);
the portable engine adds `sa.SSSS.npy` (built by pydivsufsort). An engine answers four questions, every
one over all shards: `count`, `ranges` (suffix-array rank ranges), `positions` (token positions for ranks)
and `longest_matches` (for each start of a query, the longest prefix that occurs in the corpus).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import atomic_write
from ..errors import CorpusError, require

DTYPES = {"u8": np.uint8, "u16": np.uint16, "u32": np.uint32}
WIDTHS = {"u8": 1, "u16": 2, "u32": 4}


def shard_name(kind: str, s: int) -> str:
    return f"{kind}.{s:04d}"


def separator(dtype: str) -> int:
    return (1 << (8 * WIDTHS[dtype])) - 1


class Engine:
    """What a CorpusIndex asks of an engine."""

    name = "engine"

    def __init__(self, shard_dir: Path, dtype: str, n_shards: int, max_id: int):
        self.shard_dir = Path(shard_dir)
        self.dtype = dtype
        self.width = WIDTHS[dtype]
        self.n_shards = n_shards
        self.max_id = max_id
        self.tokens = [
            np.memmap(self.shard_dir / shard_name("tokenized", s), dtype=DTYPES[dtype], mode="r")
            for s in range(n_shards)
        ]

    @classmethod
    def index_shard(cls, shard_dir: Path, s: int, dtype: str, *, cpus: int, mem_bytes: int) -> None:
        raise NotImplementedError

    def count(self, q: np.ndarray) -> int:
        return int(sum(hi - lo for lo, hi in self.ranges(q)))

    def ranges(self, q: np.ndarray) -> list[tuple[int, int]]:
        raise NotImplementedError

    def positions(self, s: int, ranks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def longest_matches(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.int64)
        best = np.zeros(len(q), dtype=np.int64)
        if len(q) == 0:
            return best
        for s in range(self.n_shards):
            best = np.maximum(best, self._longest_in_shard(s, q))
        return best

    def _longest_in_shard(self, s: int, q: np.ndarray) -> np.ndarray:
        """Matching statistics by a lockstep binary search of every query suffix at once.

        The corpus suffix sharing the longest prefix with a pattern sits next to the pattern's insertion
        point in the suffix array, so one lower-bound search per start position suffices.
        """
        tokens = _Keyed(self.tokens[s], self.key)
        q = self.key(q)
        n, L = len(tokens), len(q)
        starts = np.arange(L, dtype=np.int64)
        lo = np.zeros(L, dtype=np.int64)
        hi = np.full(L, n, dtype=np.int64)
        while True:
            act = np.flatnonzero(lo < hi)
            if act.size == 0:
                break
            mid = (lo[act] + hi[act]) // 2
            _, sign = _compare(tokens, n, self.positions(s, mid), q, starts[act])
            less = sign < 0
            lo[act[less]] = mid[less] + 1
            hi[act[~less]] = mid[~less]
        out = np.zeros(L, dtype=np.int64)
        for nb in (lo - 1, lo):
            ok = (nb >= 0) & (nb < n)
            idx = np.flatnonzero(ok)
            if idx.size:
                lcp, _ = _compare(tokens, n, self.positions(s, nb[idx]), q, starts[idx])
                out[idx] = np.maximum(out[idx], lcp)
        return out

    def key(self, values: np.ndarray) -> np.ndarray:
        """Token values mapped so that numeric order is the suffix array's order."""
        return np.asarray(values, dtype=np.int64)

    def close(self) -> None:
        self.tokens = []


class _Keyed:
    """A token array seen through `key`, indexed like a numpy array."""

    def __init__(self, tokens: np.ndarray, key: Callable[[np.ndarray], np.ndarray]):
        self.tokens, self.key = tokens, key

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, idx: Any) -> np.ndarray:
        return self.key(self.tokens[idx])


# --------------------------------------------------------------------------- portable engine


class PortableEngine(Engine):
    """Suffix arrays from pydivsufsort, searched with numpy; runs wherever numpy does."""

    name = "portable"

    def __init__(self, shard_dir: Path, dtype: str, n_shards: int, max_id: int):
        super().__init__(shard_dir, dtype, n_shards, max_id)
        self.sa = [
            np.load(self.shard_dir / (shard_name("sa", s) + ".npy"), mmap_mode="r") for s in range(n_shards)
        ]

    @classmethod
    def index_shard(cls, shard_dir: Path, s: int, dtype: str, *, cpus: int, mem_bytes: int) -> None:
        pydivsufsort = require("pydivsufsort", "corpus")
        tokens = np.fromfile(shard_dir / shard_name("tokenized", s), dtype=DTYPES[dtype])
        sa = pydivsufsort.divsufsort(tokens)
        sa = sa.astype(np.uint32 if len(tokens) < 2**32 else np.int64, copy=False)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, sa)

        atomic_write(shard_dir / (shard_name("sa", s) + ".npy"), write)

    # One binary search for one pattern; the query never contains the separator, so matches never cross
    # document boundaries.
    def _bound(self, s: int, q: np.ndarray, upper: bool) -> int:
        tokens, sa = self.tokens[s], self.sa[s]
        n, m = len(tokens), len(q)
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            p = int(sa[mid])
            seg = np.asarray(tokens[p : p + m])
            k = len(seg)
            ne = np.flatnonzero(seg != q[:k])
            c = (-1 if seg[ne[0]] < q[ne[0]] else 1) if ne.size else -1 if k < m else 0
            if c < 0 or (upper and c == 0):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def ranges(self, q: np.ndarray) -> list[tuple[int, int]]:
        q = np.asarray(q, dtype=np.int64)
        if len(q) == 0:
            return [(0, len(t)) for t in self.tokens]
        return [(self._bound(s, q, False), self._bound(s, q, True)) for s in range(self.n_shards)]

    def positions(self, s: int, ranks: np.ndarray) -> np.ndarray:
        return np.asarray(self.sa[s][np.asarray(ranks, dtype=np.int64)], dtype=np.int64)


def _compare(
    tokens: np.ndarray | _Keyed, n: int, pos: np.ndarray, q: np.ndarray, qstart: np.ndarray, chunk: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Compare corpus suffixes `tokens[pos[k]:]` with query suffixes `q[qstart[k]:]`.

    Returns the common prefix lengths and a sign per pair: -1 when the corpus suffix sorts before the query
    suffix, +1 after it, 0 when the query suffix is a prefix of the corpus suffix (a full match).
    """
    K, L = len(pos), len(q)
    lcp = np.zeros(K, dtype=np.int64)
    sign = np.zeros(K, dtype=np.int8)
    todo = np.arange(K)
    j = 0
    while todo.size:
        offs = j + np.arange(chunk)
        tp = pos[todo, None] + offs
        qp = qstart[todo, None] + offs
        t_end = tp >= n
        q_end = qp >= L
        tv = np.asarray(tokens[np.minimum(tp, n - 1)], dtype=np.int64)
        qv = q[np.minimum(qp, L - 1)]
        tv[t_end] = -1
        qv = np.where(q_end, -2, qv)
        diff = tv != qv
        has = diff.any(axis=1)
        rows = np.flatnonzero(has)
        if rows.size:
            first = diff[rows].argmax(axis=1)
            k = todo[rows]
            lcp[k] = j + first
            qe = q_end[rows, first]
            te = t_end[rows, first]
            d = np.sign(tv[rows, first] - qv[rows, first]).astype(np.int8)
            sign[k] = np.where(qe, 0, np.where(te, -1, d))
        todo = todo[~has]
        j += chunk
        chunk = min(chunk * 2, 4096)
    return lcp, sign


# --------------------------------------------------------------------------- infini-gram engine


def infini_gram_available() -> bool:
    try:
        import infini_gram.engine  # noqa: F401
    except ImportError:
        return False
    return _rust_indexing() is not None


def _rust_indexing() -> Path | None:
    try:
        import infini_gram
    except ImportError:
        return None
    exe = Path(infini_gram.__file__).parent / "rust_indexing"
    return exe if exe.exists() else None


# Bytes a make-part job reads past its end so suffixes that start near the end still sort right; the same
# constant the packaged driver uses (a repeat longer than this many bytes breaks the packaged indexer).
_HACK = 100_000


class InfiniGramEngine(Engine):
    """The infini-gram package's C++ engine over tables built by its packaged Rust indexer."""

    name = "infini-gram"

    def __init__(self, shard_dir: Path, dtype: str, n_shards: int, max_id: int):
        super().__init__(shard_dir, dtype, n_shards, max_id)
        ig = require("infini_gram.engine", "corpus")
        vocab = min(max_id + 2, separator(dtype))
        self.engine = ig.InfiniGramEngine(
            index_dir=str(self.shard_dir),
            eos_token_id=0,
            vocab_size=vocab,
            token_dtype=self.dtype,
            ds_prefetch_depth=0,
            sa_prefetch_depth=0,
            od_prefetch_depth=0,
        )
        self.tables = []
        for s in range(n_shards):
            raw = np.memmap(self.shard_dir / shard_name("table", s), dtype=np.uint8, mode="r")
            n = len(self.tokens[s])
            self.tables.append(raw.reshape(n, len(raw) // n) if n else raw.reshape(0, 1))

    @classmethod
    def index_shard(cls, shard_dir: Path, s: int, dtype: str, *, cpus: int, mem_bytes: int) -> None:
        """Drive the packaged `rust_indexing` (make-part, merge, concat), as `infini_gram.indexing` does."""
        exe = _rust_indexing()
        if exe is None:
            raise CorpusError(
                "the infini-gram package has no rust_indexing binary on this platform; use engine='portable'"
            )
        width = WIDTHS[dtype]
        ds_path = (shard_dir / shard_name("tokenized", s)).resolve()
        sa_path = (shard_dir / shard_name("table", s)).resolve()
        ds_size = os.path.getsize(ds_path)
        ratio = max(1, math.ceil(math.log2(max(ds_size, 2)) / 8))
        batches = 1
        while batches * (mem_bytes // (12 if width == 1 else 8)) < ds_size:
            batches *= 2
        # each job must read far more than the _HACK bytes it overlaps its neighbour by
        total = max(1, min(batches * cpus, ds_size // (4 * _HACK)))
        size = ds_size // total
        if size % width:
            size += width - size % width
        tmp = shard_dir / f".build-{s:04d}"
        parts, merged = tmp / "parts", tmp / "merged"
        shutil.rmtree(tmp, ignore_errors=True)
        parts.mkdir(parents=True)
        merged.mkdir()
        try:
            jobs = [(i * size, min((i + 1) * size + _HACK, ds_size)) for i in range(total)]
            jobs = [(a, b) for a, b in jobs if a < ds_size]
            for k in range(0, len(jobs), cpus):
                procs = [
                    subprocess.Popen(
                        [
                            str(exe),
                            "make-part",
                            "--data-file",
                            str(ds_path),
                            "--parts-dir",
                            str(parts.resolve()),
                            "--start-byte",
                            str(a),
                            "--end-byte",
                            str(b),
                            "--ratio",
                            str(ratio),
                            "--token-width",
                            str(width),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                    for a, b in jobs[k : k + cpus]
                ]
                for p in procs:
                    _, err = p.communicate()
                    if p.returncode:
                        raise CorpusError(f"infini-gram make-part failed on shard {s}: {err.decode()[-400:]}")
            threads = max(1, min(cpus, len(jobs)))
            _run(
                [
                    str(exe),
                    "merge",
                    "--data-file",
                    str(ds_path),
                    "--parts-dir",
                    str(parts.resolve()),
                    "--merged-dir",
                    str(merged.resolve()),
                    "--num-threads",
                    str(threads),
                    "--hacksize",
                    str(_HACK),
                    "--ratio",
                    str(ratio),
                    "--token-width",
                    str(width),
                ],
                "merge",
                s,
            )
            n_merged = len([p for p in merged.iterdir() if p.is_file()])
            out = shard_dir / f".{shard_name('table', s)}.tmp"
            _run(
                [
                    str(exe),
                    "concat",
                    "--data-file",
                    str(ds_path),
                    "--merged-dir",
                    str(merged.resolve()),
                    "--merged-file",
                    str(out.resolve()),
                    "--num-threads",
                    str(max(1, n_merged)),
                    "--ratio",
                    str(ratio),
                    "--token-width",
                    str(width),
                ],
                "concat",
                s,
            )
            if os.path.getsize(out) != (ds_size // width) * ratio:
                raise CorpusError(f"infini-gram wrote a table of the wrong size for shard {s}")
            os.replace(out, sa_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            leftover = shard_dir / f".{shard_name('table', s)}.tmp"
            if leftover.exists():
                leftover.unlink()

    def _ids(self, q: np.ndarray) -> list[int]:
        return [int(x) for x in q]

    def count(self, q: np.ndarray) -> int:
        out = self.engine.count(self._ids(q))
        if "error" in out:
            raise CorpusError(out["error"])
        return int(out["count"])

    def ranges(self, q: np.ndarray) -> list[tuple[int, int]]:
        out = self.engine.find(self._ids(q))
        if "error" in out:
            raise CorpusError(out["error"])
        return [(int(a), int(b)) for a, b in out["segment_by_shard"]]

    def positions(self, s: int, ranks: np.ndarray) -> np.ndarray:
        rows = np.asarray(self.tables[s][np.asarray(ranks, dtype=np.int64)], dtype=np.uint64)
        ptr = np.zeros(len(rows), dtype=np.uint64)
        for b in range(rows.shape[1] if rows.ndim == 2 else 0):
            ptr |= rows[:, b] << np.uint64(8 * b)
        return (ptr // np.uint64(self.width)).astype(np.int64)

    def key(self, values: np.ndarray) -> np.ndarray:
        # The table sorts suffixes by their little-endian bytes, i.e. tokens by their byte-swapped value.
        # (Longest matches are searched here rather than with the engine's `creativity`, which in 2.6.0
        # misses matches, e.g. query [0, 0] against corpus [0, 1].)
        v = np.asarray(values, dtype=np.int64)
        if self.width == 1:
            return v
        out = np.zeros_like(v)
        for b in range(self.width):
            out |= ((v >> (8 * b)) & 0xFF) << (8 * (self.width - 1 - b))
        return out

    def close(self) -> None:
        super().close()
        self.tables = []
        self.engine = None


def _run(cmd: list[str], step: str, s: int) -> None:
    res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if res.returncode:
        raise CorpusError(f"infini-gram {step} failed on shard {s}: {res.stderr.decode()[-400:]}")


ENGINES: dict[str, type[Engine]] = {"portable": PortableEngine, "infini-gram": InfiniGramEngine}


def resolve_engine(name: str) -> str:
    """Map "auto" to the infini-gram engine where its wheel is installed, else the portable one."""
    if name == "auto":
        return "infini-gram" if infini_gram_available() else "portable"
    if name not in ENGINES:
        raise CorpusError(f"engine={name!r} is not an engine; use 'auto', 'infini-gram' or 'portable'")
    if name == "infini-gram" and not infini_gram_available():
        require("infini_gram.engine", "corpus")
        raise CorpusError("the infini-gram package has no indexer on this platform; use engine='portable'")
    return name

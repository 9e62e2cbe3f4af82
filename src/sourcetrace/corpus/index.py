"""CorpusIndex: a suffix-array index over a tokenized corpus, and the queries verbatim tracing needs.

Layout of an index folder:

    manifest.json        what made it: engine, tokenizer fingerprint, token width, data fingerprint, sizes
    sourcetrace-tokenizer.json   the tokenizer (bytes, word-level), or where it is stored:
    hf-tokenizer/        a Hugging Face tokenizer, saved with `save_pretrained`
    docs.jsonl           one line of metadata per document (id, source, title, url, ...)
    docs.index.npy       byte offset of each line of docs.jsonl, for random access
    token_counts.npz     unigram counts (ranking spans by unigram log-probability)
    shards/              the engine's files (see engines.py)

The index is built in a hidden sibling folder and renamed into place when complete, so an interrupted
build never leaves a half-written index behind.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..artifacts import MANIFEST, atomic_write, atomic_write_json, check_manifest, read_json
from ..errors import CorpusError, EmptyDataError
from .engines import DTYPES, ENGINES, WIDTHS, Engine, resolve_engine, separator, shard_name
from .sources import META_FIELDS, Document, iter_documents, progress_bar
from .spans import RANKINGS, Occurrence, Span, bm25_scores, keep_densest, merge_spans, select_maximal
from .tokenizers import (
    STORED,
    Tokenizer,
    as_tokenizer,
    count_words,
    save_tokenizer,
    tokenizer_from_config,
    word_edges,
)

FORMAT = "sourcetrace.corpus/1"
DEFAULT_SHARD_TOKENS = 1 << 30


@dataclass
class TraceResult:
    """A text traced into the corpus: its tokens, the kept spans and their documents."""

    text: str
    ids: list[int]
    pieces: list[str]
    spans: list[Span]
    prompt: str | None = None
    n_candidates: int = 0  # maximal spans found before the density cut
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def merged(self) -> list[dict[str, Any]]:
        """Overlapping spans merged into highlights."""
        return merge_spans(self.spans)

    def documents(self) -> list[dict[str, Any]]:
        """Each document hit by a span, once, with the spans that hit it, best BM25 first."""
        by_doc: dict[int, dict[str, Any]] = {}
        for i, s in enumerate(self.spans):
            for occ in s.docs:
                d = by_doc.setdefault(
                    occ.doc_index,
                    {
                        "doc_index": occ.doc_index,
                        "doc_id": occ.doc_id,
                        "meta": occ.meta,
                        "spans": [],
                        "bm25": occ.bm25 or 0.0,
                    },
                )
                if i not in d["spans"]:
                    d["spans"].append(i)
                d["bm25"] = max(d["bm25"], occ.bm25 or 0.0)
        docs = sorted(by_doc.values(), key=lambda d: (-d["bm25"], d["doc_index"]))
        if docs:  # three brightness levels, as OLMoTrace shows them
            top = docs[0]["bm25"] or 1.0
            for d in docs:
                r = d["bm25"] / top
                d["relevance"] = "high" if r >= 2 / 3 else "medium" if r >= 1 / 3 else "low"
        return docs

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "prompt": self.prompt,
            "n_tokens": len(self.ids),
            "n_candidates": self.n_candidates,
            "settings": self.settings,
            "spans": [s.to_dict() for s in self.spans],
            "merged": self.merged,
            "documents": self.documents(),
        }

    def to_html(self, title: str = "sourcetrace: verbatim trace") -> str:
        from .report import trace_html

        return trace_html(self, title=title)

    def __rich__(self) -> Any:
        from .report import trace_renderable

        return trace_renderable(self)


class CorpusIndex:
    """A verbatim-search index over a training corpus; build it once, open it to trace texts into it."""

    def __init__(self, path: Path, tokenizer: Tokenizer, manifest: dict[str, Any], engine: Engine):
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.engine = engine
        self.dtype = manifest["token_dtype"]
        self.width = WIDTHS[self.dtype]
        self.max_id = min(tokenizer.max_id, separator(self.dtype) - 1)
        self._doc_bases = np.array(manifest["shard_docs"], dtype=np.int64).cumsum() - np.array(
            manifest["shard_docs"], dtype=np.int64
        )
        self._doc_starts = []  # token index of each document's separator, per shard
        for s in range(self.n_shards):
            off = np.fromfile(self.path / "shards" / shard_name("offset", s), dtype=np.uint64)
            self._doc_starts.append((off // np.uint64(self.width)).astype(np.int64))
        counts = np.load(self.path / "token_counts.npz")
        self._uni_ids, self._uni_counts = counts["ids"], counts["counts"]
        self._meta_index = np.load(self.path / "docs.index.npy", mmap_mode="r")
        self._meta_fh = open(self.path / "docs.jsonl", "rb")  # noqa: SIM115 - lives as long as the index
        size = os.path.getsize(self.path / "docs.jsonl")
        self._meta = mmap.mmap(self._meta_fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    # ------------------------------------------------------------------ building and opening

    @classmethod
    def build(
        cls,
        docs: Any,
        tokenizer: Any = "bytes",
        workdir: str | os.PathLike = "corpus-index",
        *,
        engine: str = "auto",
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        token_dtype: str | None = None,
        skip_empty: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        text_field: str = "text",
        id_field: str = "id",
        glob: str | Sequence[str] | None = None,
        cpus: int | None = None,
        mem_gb: float | None = None,
    ) -> CorpusIndex:
        """Tokenize `docs`, write the shard files and build a suffix array per shard.

        `docs`: anything `iter_documents` reads (a list of strings or dicts, a JSONL/Parquet file, a folder
        of files, a Hugging Face dataset); `glob` picks a folder's files (default: every UTF-8 text file;
        see `iter_documents`). `tokenizer`: "bytes", "word" (a word-level vocabulary made from the
        corpus), a Hugging Face tokenizer (object, tokenizer.json or folder), a callable or a Tokenizer.
        A folder that already holds an index of the same data and settings is reused; one made otherwise
        is refused unless `overwrite`. `index.manifest["skipped"]` counts the files and documents left out,
        by reason.
        """
        requested = engine
        engine = resolve_engine(engine)
        workdir = Path(workdir)
        if not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise CorpusError(f"shard_tokens={shard_tokens!r} must be a positive number of tokens")
        if token_dtype is not None and token_dtype not in DTYPES:
            raise CorpusError(
                f"token_dtype={token_dtype!r} is not a token width; use one of {sorted(DTYPES)}"
            )
        if glob is not None and not (isinstance(docs, str | os.PathLike) and Path(docs).is_dir()):
            raise CorpusError(
                f"glob={_one(glob)!r} picks files in a folder, and {_name(docs)} is not a folder"
            )
        skipped: dict[str, int] = {}
        read: dict[str, Any] = {
            "text_field": text_field,
            "id_field": id_field,
            "glob": glob,
            "skipped": skipped,
        }
        if isinstance(tokenizer, str) and tokenizer == "word":
            from .tokenizers import WordTokenizer

            docs = list(iter_documents(docs, **read))
            read = {"text_field": text_field, "id_field": id_field}  # files were picked in this first pass
            tokenizer = WordTokenizer.fit(d.text for d in docs)
        tok = as_tokenizer(tokenizer)
        dtype = token_dtype or _dtype_for(tok.max_id)
        limit = separator(dtype) - 1
        if engine == "infini-gram" and dtype == "u32":
            # The packaged indexer sorts u32 tokens with a 2^32-entry bucket table (32 GiB per job).
            if requested == "auto":
                engine = "portable"
            else:
                raise CorpusError(
                    "the packaged infini-gram indexer needs about 32 GiB of RAM per job for u32 "
                    "tokens (vocabularies over 65,534 ids); use engine='portable' or 'auto'"
                )
        if workdir.exists() and not workdir.is_dir():
            raise CorpusError(f"{workdir} is a file; pass a folder for the index")
        if (
            workdir.is_dir()
            and any(workdir.iterdir())
            and not (workdir / MANIFEST).exists()
            and not overwrite
        ):
            raise CorpusError(
                f"{workdir} is not empty and holds no corpus index; use a new folder or pass overwrite=True"
            )
        if isinstance(docs, str | os.PathLike) and not Path(docs).exists():
            raise CorpusError(f"{docs} does not exist; pass a file or a folder of documents")

        workdir.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{workdir.name}.partial-", dir=workdir.parent))
        try:
            shard_dir = partial / "shards"
            shard_dir.mkdir()
            writer = _ShardWriter(shard_dir, dtype, shard_tokens)
            meta_lines: list[int] = []
            digest = hashlib.blake2b(digest_size=16)
            counts = _Counts(tok.max_id)
            n_docs = 0
            with (
                open(partial / "docs.jsonl", "wb") as meta_fh,
                progress_bar(desc="tokenize", unit="doc", disable=not progress) as bar,
            ):
                for n, doc in enumerate(iter_documents(docs, **read)):
                    bar.update()
                    ids = (
                        np.asarray(doc.ids, dtype=np.int64).reshape(-1)
                        if doc.ids is not None
                        else np.asarray(tok.encode(doc.text), dtype=np.int64)
                    )
                    if ids.size == 0:
                        if skip_empty:
                            skipped["empty documents"] = skipped.get("empty documents", 0) + 1
                            continue
                        raise CorpusError(
                            f"document {doc.id!r} (#{n}) has no text; remove it or pass skip_empty=True"
                        )
                    bad = (ids < 0) | (ids > limit)
                    if bad.any():
                        raise CorpusError(
                            f"document {doc.id!r} (#{n}) has token id {int(ids[bad][0])}, beyond what a "
                            f"{dtype} index holds (0..{limit}); pass token_dtype='u32' or check the tokenizer"
                        )
                    arr = ids.astype(DTYPES[dtype])
                    writer.add(arr)
                    counts.add(arr)
                    line = json.dumps(_meta_record(doc), ensure_ascii=False).encode() + b"\n"
                    meta_lines.append(meta_fh.tell())
                    meta_fh.write(line)
                    digest.update(doc.id.encode() + b"\0" + arr.tobytes() + b"\1")
                    n_docs += 1
            writer.close()
            if n_docs == 0:
                why = "; ".join(f"{v} skipped: {k}" for k, v in sorted(skipped.items()))
                raise EmptyDataError(
                    "the corpus has no documents with text; nothing to index" + (f" ({why})" if why else "")
                )

            manifest = {
                "format": FORMAT,
                "engine": engine,
                "tokenizer": tok.fingerprint,
                "tokenizer_name": tok.name,
                "token_dtype": dtype,
                "data": digest.hexdigest(),
                "n_docs": n_docs,
                "n_tokens": int(sum(writer.shard_tokens)),
                "n_shards": len(writer.shard_tokens),
                "shard_tokens": shard_tokens,
                "shard_docs": writer.shard_docs,
                "skipped": dict(sorted(skipped.items())),
            }
            if (workdir / MANIFEST).exists() and check_manifest(
                workdir, manifest, overwrite=overwrite, what="corpus index"
            ):
                shutil.rmtree(partial)
                return cls.open(workdir, tok)

            cpus = cpus or os.cpu_count() or 1
            mem = int((mem_gb or _default_mem_gb()) * 1024**3)
            with progress_bar(
                total=len(writer.shard_tokens), desc=f"index ({engine})", unit="shard", disable=not progress
            ) as bar:
                for s in range(len(writer.shard_tokens)):
                    ENGINES[engine].index_shard(shard_dir, s, dtype, cpus=cpus, mem_bytes=mem)
                    bar.update()

            _save_npy(partial / "docs.index.npy", np.asarray(meta_lines, dtype=np.uint64))
            ids_arr, cnt_arr = counts.result()

            def write_counts(tmp: str) -> None:
                with open(tmp, "wb") as fh:
                    np.savez(fh, ids=ids_arr, counts=cnt_arr)

            atomic_write(partial / "token_counts.npz", write_counts)
            cfg = save_tokenizer(tok, partial)
            if cfg is not None:
                atomic_write_json(partial / STORED, cfg)
            atomic_write_json(partial / MANIFEST, manifest)
            _swap_into_place(partial, workdir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return cls.open(workdir, tok)

    @classmethod
    def open(cls, path: str | os.PathLike, tokenizer: Any = None) -> CorpusIndex:
        """Open a built index; `tokenizer` must be the one it was built with (stored ones load themselves)."""
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise CorpusError(
                f"no corpus index at {path}; build one with `sourcetrace corpus build` or "
                "CorpusIndex.build(...)"
            )
        manifest = read_json(path / MANIFEST)
        if manifest.get("format") != FORMAT:
            raise CorpusError(
                f"{path} holds {manifest.get('format') or 'something else'}, not a corpus index"
            )
        if tokenizer is None:
            stored = path / STORED
            if not stored.exists() and (path / "tokenizer.json").exists():
                stored = path / "tokenizer.json"  # indexes built before the file was renamed
            if not stored.exists():
                raise CorpusError(
                    f"the index at {path} was built with {manifest['tokenizer_name']!r}, which "
                    "is not stored with it; pass the same tokenizer"
                )
            tok = tokenizer_from_config(read_json(stored), path)
        else:
            tok = as_tokenizer(tokenizer)
        if tok.fingerprint != manifest["tokenizer"]:
            raise CorpusError(
                f"the index at {path} was built with another tokenizer ({manifest['tokenizer_name']!r}, "
                f"fingerprint {manifest['tokenizer']}); this one ({tok.name!r}) has fingerprint "
                f"{tok.fingerprint}. Trace with the tokenizer the index was built with, or rebuild it"
            )
        eng = ENGINES[resolve_engine(manifest["engine"])]
        engine = eng(path / "shards", manifest["token_dtype"], manifest["n_shards"], tok.max_id)
        return cls(path, tok, manifest, engine)

    def close(self) -> None:
        self.engine.close()
        if isinstance(self._meta, mmap.mmap):
            self._meta.close()
        self._meta_fh.close()

    def __enter__(self) -> CorpusIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ basic facts

    @property
    def n_docs(self) -> int:
        return int(self.manifest["n_docs"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_shards(self) -> int:
        return int(self.manifest["n_shards"])

    @property
    def engine_name(self) -> str:
        return self.manifest["engine"]

    def __repr__(self) -> str:
        return (
            f"CorpusIndex({str(self.path)!r}, engine={self.engine_name!r}, docs={self.n_docs}, "
            f"tokens={self.n_tokens}, shards={self.n_shards})"
        )

    def encode(self, text_or_ids: str | Sequence[int] | np.ndarray) -> np.ndarray:
        """Token ids of a text (with the index's tokenizer) or the ids themselves."""
        if isinstance(text_or_ids, str):
            return np.asarray(self.tokenizer.encode(text_or_ids), dtype=np.int64)
        return np.asarray(text_or_ids, dtype=np.int64).reshape(-1)

    def _valid(self, ids: np.ndarray) -> np.ndarray:
        ok = (ids >= 0) & (ids <= self.max_id)
        if self.tokenizer.unk_id is not None:
            ok &= ids != self.tokenizer.unk_id
        return ok

    # ------------------------------------------------------------------ queries

    def count(self, tokens: str | Sequence[int] | np.ndarray) -> int:
        """How many times the token sequence occurs in the corpus (overlapping occurrences count)."""
        ids = self.encode(tokens)
        if len(ids) == 0:
            raise CorpusError("count needs at least one token")
        if not self._valid(ids).all():
            return 0
        return self.engine.count(ids)

    def occurrences(
        self,
        tokens: str | Sequence[int] | np.ndarray,
        limit: int | None = 10,
        window: int = 20,
        seed: int = 0,
    ) -> list[Occurrence]:
        """Where the sequence occurs: document, offset and `window` tokens of context each side.

        With more than `limit` occurrences a random sample (fixed `seed`) of `limit` is returned.
        """
        ids = self.encode(tokens)
        if len(ids) == 0:
            raise CorpusError("occurrences needs at least one token")
        if not self._valid(ids).all():
            return []
        ranges = self.engine.ranges(ids)
        total = sum(hi - lo for lo, hi in ranges)
        if total == 0:
            return []
        flat = np.arange(total, dtype=np.int64)
        if limit is not None and total > limit:
            flat = np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))
        sizes = np.array([hi - lo for lo, hi in ranges], dtype=np.int64)
        bounds = np.concatenate([[0], sizes.cumsum()])
        out = []
        for s, (lo, _) in enumerate(ranges):
            pick = flat[(flat >= bounds[s]) & (flat < bounds[s + 1])] - bounds[s] + lo
            if pick.size:
                for pos in np.sort(self.engine.positions(s, pick)):
                    out.append(self._occurrence(s, int(pos), len(ids), window))
        out.sort(key=lambda o: (o.doc_index, o.offset))
        return out

    def _occurrence(self, s: int, pos: int, length: int, window: int) -> Occurrence:
        starts = self._doc_starts[s]
        d = int(np.searchsorted(starts, pos, side="right") - 1)
        begin = int(starts[d]) + 1
        end = int(starts[d + 1]) if d + 1 < len(starts) else len(self.engine.tokens[s])
        a, b = max(begin, pos - window), min(end, pos + length + window)
        ctx = np.asarray(self.engine.tokens[s][a:b], dtype=np.int64)
        pieces = self.tokenizer.pieces(ctx.tolist())
        k0, k1 = pos - a, pos - a + length
        doc_index = int(self._doc_bases[s]) + d
        rec = self._meta_record(doc_index)
        return Occurrence(
            doc_index=doc_index,
            doc_id=rec.get("id", str(doc_index)),
            offset=pos - begin,
            length=length,
            meta=rec.get("meta", {}),
            before="".join(pieces[:k0]),
            match="".join(pieces[k0:k1]),
            after="".join(pieces[k1:]),
            context_ids=ctx.tolist(),
        )

    def _meta_record(self, doc_index: int) -> dict[str, Any]:
        a = int(self._meta_index[doc_index])
        b = int(self._meta_index[doc_index + 1]) if doc_index + 1 < len(self._meta_index) else len(self._meta)
        return json.loads(self._meta[a:b])

    def document(self, doc_index: int) -> dict[str, Any]:
        """A document's id, metadata and token ids."""
        if not 0 <= doc_index < self.n_docs:
            raise CorpusError(f"document index {doc_index} is outside 0..{self.n_docs - 1}")
        s = int(np.searchsorted(self._doc_bases, doc_index, side="right") - 1)
        d = doc_index - int(self._doc_bases[s])
        starts = self._doc_starts[s]
        end = int(starts[d + 1]) if d + 1 < len(starts) else len(self.engine.tokens[s])
        ids = np.asarray(self.engine.tokens[s][int(starts[d]) + 1 : end], dtype=np.int64)
        rec = self._meta_record(doc_index)
        return {
            "doc_index": doc_index,
            "id": rec.get("id"),
            "meta": rec.get("meta", {}),
            "ids": ids.tolist(),
            "text": self.tokenizer.decode(ids.tolist()),
        }

    def longest_matches(self, tokens: str | Sequence[int] | np.ndarray) -> np.ndarray:
        """For each position, the length of the longest token sequence starting there found in the corpus."""
        return self.longest_matches_batch([self.encode(tokens)])[0]

    def longest_matches_batch(self, queries: Sequence[Sequence[int] | np.ndarray]) -> list[np.ndarray]:
        """`longest_matches` of many token sequences, searched together in one pass.

        Tokens the index cannot hold split a query into runs. All runs are joined and searched at once;
        a match is then cut at the end of its own run, which gives exactly each run's own longest matches
        (a longer match inside the run would also be a match of the joined sequence).
        """
        qs = [np.asarray(q, dtype=np.int64).reshape(-1) for q in queries]
        out = [np.zeros(len(q), dtype=np.int64) for q in qs]
        runs: list[tuple[int, int, int]] = []  # (query, start, end)
        for k, q in enumerate(qs):
            ok = self._valid(q)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
            runs += [(k, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
        if not runs:
            return out
        joined = np.concatenate([qs[k][a:b] for k, a, b in runs])
        found = self.engine.longest_matches(joined)
        at = 0
        for k, a, b in runs:
            out[k][a:b] = np.minimum(found[at : at + b - a], np.arange(b - a, 0, -1))
            at += b - a
        return out

    def unigram_logprobs(self, ids: np.ndarray) -> np.ndarray:
        """log P(token) under the corpus unigram distribution (-inf for unseen tokens)."""
        ids = np.asarray(ids, dtype=np.int64)
        k = np.searchsorted(self._uni_ids, ids)
        k = np.minimum(k, len(self._uni_ids) - 1)
        c = np.where(self._uni_ids[k] == ids, self._uni_counts[k], 0).astype(float)
        with np.errstate(divide="ignore"):
            return np.log(c / max(self.n_tokens, 1))

    def maximal_spans(
        self,
        text_or_ids: str | Sequence[int] | np.ndarray,
        *,
        min_len: int = 1,
        max_count: int | None = None,
        word_boundary: bool = False,
        delimiters: Iterable[int] = (),
        rank_by: str = "length",
        density: float | None = None,
    ) -> list[Span]:
        """Maximal spans of the text that occur verbatim in the corpus (OLMoTrace step 2-3).

        Spans are at least `min_len` words long (runs of letters, digits or _, whatever the tokenizer),
        occur at most `max_count` times, optionally start and end on
        word boundaries and never run past a delimiter token; with `density`, only the best
        ceil(density * n_tokens) spans are kept, ranked by `rank_by` ("length" or "unigram": the lowest sum
        of unigram log-probabilities, i.e. the most unusual, first).
        """
        return self.maximal_spans_batch(
            [text_or_ids],
            min_len=min_len,
            max_count=max_count,
            word_boundary=word_boundary,
            delimiters=delimiters,
            rank_by=rank_by,
            density=density,
        )[0]

    def maximal_spans_batch(
        self,
        items: Sequence[str | Sequence[int] | np.ndarray],
        *,
        min_len: int = 1,
        max_count: int | None = None,
        word_boundary: bool = False,
        delimiters: Iterable[int] = (),
        rank_by: str = "length",
        density: float | None = None,
    ) -> list[list[Span]]:
        """`maximal_spans` of many texts; their longest matches are searched in one pass over the index."""
        check_span_options(min_len=min_len, max_count=max_count, rank_by=rank_by, density=density)
        tokens = [self._tokens(item) for item in items]
        lengths = self.longest_matches_batch([ids for ids, _ in tokens])
        return [
            self._spans(ids, pieces, lm, min_len, max_count, word_boundary, delimiters, rank_by, density)[0]
            for (ids, pieces), lm in zip(tokens, lengths, strict=True)
        ]

    def _tokens(self, text_or_ids: str | Sequence[int] | np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Ids and one display piece per token (a text's own characters when a text is given)."""
        if isinstance(text_or_ids, str):
            ids, pieces = self.tokenizer.encode_with_pieces(text_or_ids)
            return np.asarray(ids, dtype=np.int64), pieces
        ids_arr = self.encode(text_or_ids)
        return ids_arr, self.tokenizer.pieces(ids_arr.tolist())

    def _spans(
        self,
        ids: np.ndarray,
        pieces: list[str],
        lengths: np.ndarray,
        min_len: int,
        max_count: int | None,
        word_boundary: bool,
        delimiters: Iterable[int],
        rank_by: str,
        density: float | None,
    ) -> tuple[list[Span], int]:
        if len(ids) == 0:
            return [], 0
        delims = set(int(d) for d in delimiters)
        dmask = np.isin(ids, list(delims)) if delims else None
        edges = word_edges(pieces) if word_boundary else None
        spans = []
        logp = self.unigram_logprobs(ids)
        found = select_maximal(
            lengths,
            min_len=min_len,
            edges=edges,
            delimiters=dmask,
            size=lambda a, b: count_words("".join(pieces[a:b])),
        )
        for a, b in found:
            c = self.engine.count(ids[a:b])
            if max_count is not None and c > max_count:
                continue
            spans.append(Span(a, b, c, "".join(pieces[a:b]), float(logp[a:b].sum())))
        return keep_densest(spans, len(ids), density, rank_by), len(spans)

    def trace(
        self,
        text: str | Sequence[int] | np.ndarray,
        *,
        prompt: str | None = None,
        min_len: int = 4,
        max_count: int | None = None,
        word_boundary: bool = True,
        delimiters: Iterable[int] = (),
        rank_by: str = "unigram",
        density: float | None = 0.05,
        docs_per_span: int = 10,
        window: int = 40,
        seed: int = 42,
    ) -> TraceResult:
        """Trace a generated text into the corpus, the OLMoTrace way.

        Finds maximal matching spans of at least `min_len` words that start and end with whole words (with
        `word_boundary`), keeps the ceil(density * L) most unusual ones (all with `density=None`), fetches
        up to `docs_per_span` documents per span with `window` tokens of context, and orders each span's
        documents by BM25 against the prompt and the response.
        """
        check_span_options(
            min_len=min_len,
            max_count=max_count,
            rank_by=rank_by,
            density=density,
            docs_per_span=docs_per_span,
        )
        if not isinstance(window, int) or window < 0:
            raise CorpusError(f"window={window!r} must be a number of tokens >= 0")
        ids, pieces = self._tokens(text)
        shown = "".join(pieces)
        lengths = self.longest_matches(ids)
        spans, n_cand = self._spans(
            ids, pieces, lengths, min_len, max_count, word_boundary, delimiters, rank_by, density
        )
        query = ids.tolist() + (self.tokenizer.encode(prompt) if prompt else [])
        for s in spans:
            s.docs = self.occurrences(ids[s.start : s.end], limit=docs_per_span, window=window, seed=seed)
            if s.docs:
                scores = bm25_scores([o.context_ids for o in s.docs], query)
                for o, sc in zip(s.docs, scores, strict=True):
                    o.bm25 = float(sc)
                s.docs.sort(key=lambda o: (-(o.bm25 or 0.0), o.doc_index, o.offset))
        settings = {
            "min_len": min_len,
            "max_count": max_count,
            "word_boundary": word_boundary,
            "rank_by": rank_by,
            "density": density,
            "docs_per_span": docs_per_span,
            "window": window,
            "index": str(self.path),
            "engine": self.engine_name,
        }
        return TraceResult(
            text=shown,
            ids=ids.tolist(),
            pieces=pieces,
            spans=spans,
            prompt=prompt,
            n_candidates=n_cand,
            settings=settings,
        )


# ---------------------------------------------------------------------- build helpers


def check_span_options(
    *,
    min_len: int = 1,
    max_count: int | None = None,
    rank_by: str = "length",
    density: float | None = None,
    docs_per_span: int | None = 1,
) -> None:
    """Refuse span options that cannot mean anything, before any work is done."""
    if isinstance(min_len, bool) or not isinstance(min_len, int) or min_len < 1:
        raise CorpusError(f"min_len={min_len!r} must be a whole number of words >= 1")
    if max_count is not None and (
        isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1
    ):
        raise CorpusError(f"max_count={max_count!r} must be a whole number of occurrences >= 1")
    if rank_by not in RANKINGS:
        raise CorpusError(f"rank_by={rank_by!r} is not a ranking; use {' or '.join(map(repr, RANKINGS))}")
    if density is not None and not (isinstance(density, int | float) and 0 < density <= 1):
        raise CorpusError(f"density={density!r} must be a share of tokens in (0, 1]")
    if docs_per_span is not None and (not isinstance(docs_per_span, int) or docs_per_span < 1):
        raise CorpusError(f"docs_per_span={docs_per_span!r} must be a whole number >= 1")


def _one(glob: str | Sequence[str]) -> str:
    return glob if isinstance(glob, str) else ",".join(glob)


def _name(docs: Any) -> str:
    return str(docs) if isinstance(docs, str | os.PathLike) else f"a {type(docs).__name__}"


def _dtype_for(max_id: int) -> str:
    if max_id < 0xFF:
        return "u8"
    if max_id < 0xFFFF:
        return "u16"
    return "u32"


def _default_mem_gb() -> float:
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(1.0, pages / 1024**3 / 2)
    except (ValueError, OSError, AttributeError):
        return 4.0


def _meta_record(doc: Document) -> dict[str, Any]:
    meta = {k: doc.meta[k] for k in META_FIELDS if k in doc.meta}
    meta.update({k: v for k, v in doc.meta.items() if k not in meta})
    return {"id": doc.id, "meta": meta}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    atomic_write(path, write)


def _swap_into_place(partial: Path, workdir: Path) -> None:
    if workdir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{workdir.name}.old-", dir=workdir.parent))
        os.replace(workdir, trash / "old")
        try:
            os.replace(partial, workdir)
        except BaseException:
            os.replace(trash / "old", workdir)
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(partial, workdir)


class _ShardWriter:
    """Appends documents to `tokenized.SSSS` / `offset.SSSS`, starting a new shard past `shard_tokens`."""

    def __init__(self, shard_dir: Path, dtype: str, shard_tokens: int):
        self.dir, self.dtype, self.limit = shard_dir, dtype, shard_tokens
        self.sep = np.array([separator(dtype)], dtype=DTYPES[dtype]).tobytes()
        self.shard_tokens: list[int] = []
        self.shard_docs: list[int] = []
        self._ds: BinaryIO | None = None
        self._od: BinaryIO | None = None
        self._bytes = 0

    def _open(self) -> None:
        s = len(self.shard_tokens)
        self._ds = open(self.dir / shard_name("tokenized", s), "wb")  # noqa: SIM115
        self._od = open(self.dir / shard_name("offset", s), "wb")  # noqa: SIM115
        self.shard_tokens.append(0)
        self.shard_docs.append(0)
        self._bytes = 0

    def add(self, arr: np.ndarray) -> None:
        if self._ds is None or (self.shard_tokens[-1] and self.shard_tokens[-1] + len(arr) + 1 > self.limit):
            self.close()
            self._open()
        assert self._ds is not None and self._od is not None  # _open sets both
        self._od.write(np.array([self._bytes], dtype=np.uint64).tobytes())
        data = self.sep + arr.tobytes()
        self._ds.write(data)
        self._bytes += len(data)
        self.shard_tokens[-1] += len(arr) + 1
        self.shard_docs[-1] += 1

    def close(self) -> None:
        if self._ds is not None:
            assert self._od is not None  # opened together with _ds
            self._ds.close()
            self._od.close()
            self._ds = self._od = None


class _Counts:
    """Unigram counts, dense for small vocabularies and sparse for large ones."""

    def __init__(self, max_id: int):
        self.dense = np.zeros(max_id + 1, dtype=np.int64) if max_id < (1 << 22) else None
        self.sparse: dict[int, int] = {}
        self._buf: list[np.ndarray] = []
        self._n = 0

    def add(self, arr: np.ndarray) -> None:
        self._buf.append(arr)
        self._n += len(arr)
        if self._n >= 1 << 22:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        arr = np.concatenate(self._buf).astype(np.int64)
        self._buf, self._n = [], 0
        if self.dense is not None:
            self.dense += np.bincount(arr, minlength=len(self.dense))[: len(self.dense)]
        else:
            u, c = np.unique(arr, return_counts=True)
            for a, b in zip(u.tolist(), c.tolist(), strict=True):
                self.sparse[a] = self.sparse.get(a, 0) + b

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush()
        if self.dense is not None:
            ids = np.flatnonzero(self.dense)
            return ids.astype(np.int64), self.dense[ids]
        ids = np.array(sorted(self.sparse), dtype=np.int64)
        return ids, np.array([self.sparse[i] for i in ids.tolist()], dtype=np.int64)

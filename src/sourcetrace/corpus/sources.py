"""Documents to index, from a list, JSONL, Parquet, a Hugging Face dataset or a folder of text files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorpusError, MissingExtraError

META_FIELDS = ("source", "title", "url")
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")


@dataclass
class Document:
    """One corpus document: a stable id, its text and free metadata (source, title, url, ...).

    `ids` holds the document already tokenized (with the index's tokenizer); the text is then not encoded.
    """

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    ids: Any = None


def iter_documents(source: Any, *, text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Yield Documents from `source`.

    `source` may be a path (a `.jsonl`/`.json` file, a `.parquet` file or a folder of text files, or of
    such files), a Hugging Face `datasets.Dataset`, or any iterable of strings, dicts or Documents.
    """
    if isinstance(source, str | os.PathLike):
        yield from _iter_path(Path(source), text_field, id_field)
        return
    if isinstance(source, dict):
        raise CorpusError("pass a list of documents, not a single dict")
    if not isinstance(source, Iterable):
        raise CorpusError(
            f"cannot read documents from {type(source).__name__}; pass a path, a list or a dataset"
        )
    for n, item in enumerate(source):
        yield _to_document(item, n, text_field, id_field, origin=None)


def _to_document(item: Any, n: int, text_field: str, id_field: str, origin: str | None) -> Document:
    if isinstance(item, Document):
        return item
    if isinstance(item, str):
        meta = {"source": origin} if origin else {}
        return Document(str(n), item, meta)
    if isinstance(item, np.ndarray):
        return Document(str(n), "", {}, ids=item)
    if isinstance(item, dict):
        if "ids" in item and text_field not in item:
            meta = {k: v for k, v in item.items() if k not in ("ids", id_field) and _jsonable(v)}
            return Document(str(item.get(id_field, n)), "", meta, ids=item["ids"])
        if text_field not in item:
            where = f" in {origin}" if origin else ""
            raise CorpusError(
                f"document #{n}{where} has no {text_field!r} field; pass text_field= to name it"
            )
        text = item[text_field]
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise CorpusError(f"document #{n} has a {text_field!r} of type {type(text).__name__}, not text")
        doc_id = item.get(id_field, n)
        meta = {k: v for k, v in item.items() if k not in (text_field, id_field) and _jsonable(v)}
        if origin and "source" not in meta:
            meta["source"] = origin
        return Document(str(doc_id), text, meta)
    raise CorpusError(f"document #{n} is a {type(item).__name__}; documents are strings or dicts with text")


def _jsonable(v: Any) -> bool:
    return isinstance(v, str | int | float | bool) or v is None


def _iter_path(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    if not path.exists():
        raise CorpusError(f"{path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise CorpusError(f"folder {path} has no files to index")
        for p in files:
            rel = str(p.relative_to(path))
            if p.suffix in (".jsonl", ".json", ".parquet"):
                for doc in _iter_file(p, text_field, id_field):
                    doc.id = f"{rel}:{doc.id}"
                    yield doc
            elif p.suffix in TEXT_SUFFIXES or not p.suffix:
                yield Document(
                    rel, p.read_text(encoding="utf-8", errors="replace"), {"source": rel, "title": p.stem}
                )
        return
    yield from _iter_file(path, text_field, id_field)


def _iter_file(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    origin = path.name
    if path.suffix == ".jsonl" or path.suffix == ".json":
        with path.open(encoding="utf-8") as fh:
            first = fh.read(1)
            fh.seek(0)
            if first == "[":  # a JSON array of documents
                for n, item in enumerate(json.load(fh)):
                    yield _to_document(item, n, text_field, id_field, origin)
                return
            for n, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{n + 1} is not valid JSON ({exc.msg})") from exc
                yield _to_document(item, n, text_field, id_field, origin)
        return
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise MissingExtraError(
                "reading Parquet needs pyarrow; install it with `pip install pyarrow`"
            ) from exc
        table = pq.ParquetFile(path)
        n = 0
        for batch in table.iter_batches():
            for item in batch.to_pylist():
                yield _to_document(item, n, text_field, id_field, origin)
                n += 1
        return
    if path.suffix in TEXT_SUFFIXES or not path.suffix:
        yield Document(
            path.name,
            path.read_text(encoding="utf-8", errors="replace"),
            {"source": path.name, "title": path.stem},
        )
        return
    raise CorpusError(f"cannot read {path}: use .jsonl, .json, .parquet, text files or a folder of them")

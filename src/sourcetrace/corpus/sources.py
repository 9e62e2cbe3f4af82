"""Documents to index, from a list, JSONL, Parquet, a Hugging Face dataset or a folder of text files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorpusError, MissingExtraError

META_FIELDS = ("source", "title", "url")


@dataclass
class Document:
    """One corpus document: a stable id, its text and free metadata (source, title, url, ...).

    `ids` holds the document already tokenized (with the index's tokenizer); the text is then not encoded.
    """

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    ids: Any = None


def iter_documents(
    source: Any,
    *,
    text_field: str = "text",
    id_field: str = "id",
    glob: str | Sequence[str] | None = None,
    skipped: dict[str, int] | None = None,
) -> Iterator[Document]:
    """Yield Documents from `source`.

    `source` may be a path (a `.jsonl`/`.json` file, a `.parquet` file, a text file or a folder), a Hugging
    Face `datasets.Dataset`, or any iterable of strings, dicts or Documents. In a folder, `.jsonl`,
    `.json` and `.parquet` files are read as records and every other file as one document if it is UTF-8
    text, whatever its extension; `glob` (one pattern or several, matched against each file's path inside
    the folder from the right, e.g. "*.py" or "docs/*.md") keeps only the files it matches. Hidden files
    and folders (names starting with ".") are left out. `skipped`, when given, counts the files left out
    by reason.
    """
    if isinstance(source, str | os.PathLike):
        yield from _iter_path(
            Path(source), text_field, id_field, glob, skipped if skipped is not None else {}
        )
        return
    if isinstance(source, dict):
        raise CorpusError("pass a list of documents, not a single dict")
    if not isinstance(source, Iterable):
        raise CorpusError(
            f"cannot read documents from {type(source).__name__}; pass a path, a list or a dataset"
        )
    for n, item in enumerate(source):
        yield _to_document(item, n, text_field, id_field, origin=None)


@contextmanager
def progress_bar(**kwargs: Any) -> Iterator[Any]:
    """A tqdm bar that erases itself when an error ends the loop, so the error is the last thing shown."""
    from tqdm.auto import tqdm

    bar = tqdm(**kwargs)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


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


RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def _iter_path(
    path: Path, text_field: str, id_field: str, glob: str | Sequence[str] | None, skipped: dict[str, int]
) -> Iterator[Document]:
    if not path.exists():
        raise CorpusError(f"{path} does not exist")
    if not path.is_dir():
        yield from _iter_file(path, text_field, id_field)
        return
    patterns = [glob] if isinstance(glob, str) else list(glob or [])
    if any(not g for g in patterns):
        raise CorpusError("glob='' matches nothing; pass a pattern such as '*.py'")

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    n_files = 0
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            skip("hidden")
            continue
        if patterns and not any(rel.match(g) for g in patterns):
            skip("not matching the glob")
            continue
        n_files += 1
        if p.suffix in RECORD_SUFFIXES:
            for doc in _iter_file(p, text_field, id_field):
                doc.id = f"{rel}:{doc.id}"
                yield doc
            continue
        text = _read_text(p)
        if text is None:
            skip("not UTF-8 text")
            continue
        yield Document(str(rel), text, {"source": str(rel), "title": p.stem})
    if n_files == 0:
        what = f"no files matching glob={','.join(patterns)!r}" if patterns else "no files to index"
        raise CorpusError(f"folder {path} has {what}")


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (a NUL byte or an invalid sequence)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


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
    text = _read_text(path)
    if text is None:
        raise CorpusError(f"cannot read {path}: it is not UTF-8 text, JSONL, JSON or Parquet")
    yield Document(path.name, text, {"source": path.name, "title": path.stem})

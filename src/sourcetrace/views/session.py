"""A live view: scores that change as the user selects tokens, for the web app and the notebook widget."""

from __future__ import annotations

import base64
import copy
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import atomic_write_bytes
from ..errors import ScoresError, ShapeError, SourcetraceError
from ..scores import Scores
from .media import WAV_URI
from .payload import _check_items, item_json, report_payload, train_texts, with_audio
from .text import Keywords, word_diff

VIEW_FILE = "view.json"
FORMAT = "sourcetrace.view/1"


class NoBackendError(SourcetraceError):
    """The view was opened without a model, so new selections cannot be attributed."""


class Session:
    """Scores of some queries, their items, and (optionally) a backend that attributes new selections.

    Thread-safe: the web app calls it from many threads. `payload()` is what the front end draws;
    `attribute` and `compare` change it and return the part that changed.
    """

    def __init__(self, scores: Scores | None, train_items: Sequence[Any] | None,
                 query_items: Sequence[Any] | None, *, title: str = "sourcetrace", groups: Any = None,
                 backend: Any = None, k: int = 6, columns: Sequence[Any] | None = None):
        self.backend, self.title, self.groups, self.k = backend, title, groups, k
        self.columns = list(columns) if columns is not None else None
        self._lock = threading.RLock()
        self.token_scores: dict[int, dict[int, list[float]]] = {}
        if scores is None:
            if backend is None or not query_items:
                raise ShapeError("a view needs scores, or a backend and query items to attribute")
            self.query_items = [dict(q) for q in query_items]
            rows = [self._attribute_row(q) for q in self.query_items]
            ids = [q.get("id", i) for i, q in enumerate(self.query_items)]
            scores = Scores(torch.cat(rows), list(backend.train_ids), ids, rows_method(backend))
        else:
            self.query_items = [dict(q or {}) for q in _check_items(query_items, len(scores.query_ids),
                                                                  "query_items")]
            if backend is not None and not scores.is_dense:
                raise ScoresError("a live view with a backend needs dense scores; score without top_k")
        self.scores = scores
        self.train_items = _check_items(train_items, len(scores.train_ids), "train_items")
        self.train = [item_json(it, i, self.columns, audio=False)
                      for it, i in zip(self.train_items, scores.train_ids)]
        texts = train_texts(self.train)
        self.keywords = Keywords(texts) if any(texts) else None
        self._payload: dict[str, Any] | None = None
        if backend is not None and hasattr(backend, "token_contributions"):
            for q in range(len(self.query_items)):
                self._contributions(q)

    def fork(self) -> Session:
        """A copy whose selections and compares are its own (one per web-app client); the backend, the
        training items and the keywords are shared."""
        with self._lock:
            other = copy.copy(self)
            other._lock = threading.RLock()
            other.query_items = copy.deepcopy(self.query_items)
            other.token_scores = {row: dict(shares) for row, shares in self.token_scores.items()}
            other._payload = None
        return other

    # ---- reading ------------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        with self._lock:
            if self._payload is None:
                p = report_payload(self.scores, train_items=self.train_items, query_items=self.query_items,
                                   title=self.title, groups=self.groups, k=self.k, train=self.train,
                                   keywords=self.keywords, columns=self.columns)
                p["can_attribute"] = self.backend is not None
                if self.token_scores:
                    p["token_scores_note"] = getattr(self.backend, "token_note", None) or \
                        "shaded: each token's share of the score (green supports, red opposes)"
                for q in p["queries"]:
                    shares = self.token_scores.get(q["index"], {})
                    for r in q["result"]["top"] + q["result"]["bottom"]:
                        if r["index"] in shares:
                            r["token_scores"] = shares[r["index"]]
                self._payload = p
            return self._payload

    def row(self, query: str) -> int:
        """The position of the query whose id reads `query` (ids arrive as URL text)."""
        for i, qid in enumerate(self.scores.query_ids):
            if str(qid) == query:
                return i
        raise KeyError(query)

    def query_update(self, rows: Sequence[int]) -> dict[str, Any]:
        """The changed queries, the training items they show, and the groups (which depend on every row)."""
        p = self.payload()
        queries = [p["queries"][r] for r in rows]
        shown = {str(x["index"]) for q in queries for x in q["result"]["top"] + q["result"]["bottom"]}
        return {"queries": queries, "train": {i: p["train"][i] for i in shown if i in p["train"]},
                "groups": p["groups"]}

    def train_item(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.train):
            raise KeyError(index)
        return with_audio(self.train[index], self.train_items[index])

    # ---- changing -----------------------------------------------------------------------------------
    def attribute(self, row: int, selection: Sequence[int]) -> dict[str, Any]:
        """Attribute a new selection of query `row`'s tokens; returns the update for the front end."""
        backend = self._need_backend()
        item = self.query_items[row]
        tokens = item.get("tokens")
        if not tokens:
            raise ShapeError("this query has no tokens to select; only text generations can be re-attributed")
        selection = sorted({int(i) for i in selection})
        if not selection or selection[0] < 0 or selection[-1] >= len(tokens):
            raise ShapeError(f"select at least one token, each in [0, {len(tokens)})")
        with self._lock:
            if item.get("selection") == selection and self._payload is not None:
                return self.query_update([row])  # nothing changes
        values = backend.attribute(list(tokens), selection, item.get("prompt", "") or "").matrix
        with self._lock:
            item["selection"] = selection
            self._set_row(row, values)
            self._contributions(row)
        return self.query_update([row])

    def compare(self, row: int, text: str) -> dict[str, Any]:
        """Compare query `row`'s generation with a user's text: attribute the removed and the added words."""
        backend = self._need_backend()
        item = self.query_items[row]
        model_tokens = list(item.get("tokens") or [])
        user_tokens = backend.tokenize(text)
        if not model_tokens or not user_tokens:
            raise ShapeError("both the model's and your text need at least one token")
        diff = word_diff(model_tokens, user_tokens)
        if not diff["removed"] and not diff["added"]:
            raise ShapeError("your text is the same as the model's; change some words to compare")
        prompt = item.get("prompt", "") or ""
        with self._lock:
            if diff["removed"]:
                self._set_row(row, backend.attribute(model_tokens, diff["removed"], prompt).matrix)
                item["selection"] = diff["removed"]
            user_sel = diff["added"] or list(range(len(user_tokens)))
            edits = sum(1 for q in self.query_items if "edit_of" in q)
            new_id = f"{self.scores.query_ids[row]}~edit{edits + 1}"
            values = backend.attribute(user_tokens, user_sel, prompt).matrix
            self.scores = Scores(torch.cat([self.scores.matrix, values.to(self.scores.matrix)]),  # type: ignore
                                 self.scores.train_ids, [*self.scores.query_ids, new_id], self.scores.method,
                                 self.scores.metadata)
            self.query_items.append({"prompt": prompt, "tokens": user_tokens, "selection": user_sel,
                                     "label": f"edit of {self.scores.query_ids[row]}",
                                     "edit_of": self.scores.query_ids[row]})
            new = len(self.query_items) - 1
            item["compare_to"] = new
            self._payload = None
            for r in (row, new):
                self._contributions(r)
        return self.query_update([row, new])

    def _need_backend(self) -> Any:
        if self.backend is None:
            raise NoBackendError("this view has no model to attribute new selections; open it with a backend "
                                 "(see sourcetrace.views.LMBackend)")
        return self.backend

    def _attribute_row(self, item: dict[str, Any]) -> torch.Tensor:
        tokens = item.get("tokens") or self.backend.tokenize(item.get("text", ""))
        item["tokens"] = list(tokens)
        sel = item.get("selection") or list(range(len(tokens)))
        item["selection"] = list(sel)
        return self.backend.attribute(list(tokens), sel, item.get("prompt", "") or "").matrix.detach()

    def _set_row(self, row: int, values: torch.Tensor) -> None:
        m = self.scores.matrix.clone()  # type: ignore[union-attr]
        m[row] = values.detach().reshape(-1).to(m)
        self.scores = Scores(m, self.scores.train_ids, self.scores.query_ids, self.scores.method,
                             self.scores.metadata)
        self._payload = None

    def _contributions(self, row: int) -> None:
        """Each shown training text's per-token share of its score (its influential region)."""
        if not hasattr(self.backend, "token_contributions"):
            return
        item = self.query_items[row]
        if not item.get("tokens") or not item.get("selection"):
            return
        k = self.k
        shown = [a.index for a in self.scores.top(row=row, k=k) + self.scores.bottom(row=row, k=k)]
        self.token_scores[row] = {
            i: [round(v, 6) for v in self.backend.token_contributions(item["tokens"], item["selection"], i,
                                                                      item.get("prompt", "") or "")]
            for i in shown}
        self._payload = None


def rows_method(backend: Any) -> str:
    att = getattr(backend, "attributor", None)
    return getattr(getattr(att, "method", None), "name", "") or type(backend).__name__


# ---- a view on disk: what `sourcetrace serve WORKDIR` opens ---------------------------------------------
def save_view(workdir: str | os.PathLike, scores: Scores | None = None, *,
              train_items: Sequence[Any] | None = None, query_items: Sequence[Any] | None = None,
              title: str = "sourcetrace", groups: Any = None, backend: Any = None,
              report: bool = True, columns: Sequence[Any] | None = None) -> Path:
    """Write a view to `workdir` (items, scores, the backend's model) for `sourcetrace serve WORKDIR`.

    With `report`, also writes `workdir/report.html`, the static version. Audio given as bytes is stored as
    a WAV data URI; audio given as a path is stored as that path (keep the file where it is).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {"format": FORMAT, "title": title, "train_items": _plain(train_items),
                            "query_items": _plain(query_items), "groups": _plain(groups), "backend": None,
                            "columns": _plain(columns)}
    if scores is not None:
        scores.matrix = scores.matrix.detach() if scores.matrix is not None else None
        scores.save(workdir / "scores")
    if backend is not None:
        if not hasattr(backend, "save"):
            raise ShapeError(f"{type(backend).__name__} has no save(folder); serve it with views.create_app")
        backend.save(workdir / "backend")
        spec["backend"] = {"kind": "hf-causal-lm", "path": "backend",
                           "threads": getattr(backend, "threads", None)}
    # keys in their given order: a table row's columns keep theirs
    atomic_write_bytes(workdir / VIEW_FILE, (json.dumps(spec, indent=1, default=str) + "\n").encode("utf-8"))
    if report:
        from .page import render_html

        session = Session(scores, train_items, query_items, title=title, groups=groups, backend=backend,
                          columns=columns)
        payload = dict(session.payload(), can_attribute=False)
        atomic_write_bytes(workdir / "report.html", render_html(payload).encode("utf-8"))
        (workdir / "report.html").chmod(0o644)
    return workdir


def load_view(workdir: str | os.PathLike) -> Session:
    """The view `save_view` wrote, with its backend loaded when it has one."""
    workdir = Path(workdir)
    path = workdir / VIEW_FILE
    if not path.exists():
        raise FileNotFoundError(f"{workdir} holds no view ({VIEW_FILE} is missing); write one with "
                                "sourcetrace.views.save_view(workdir, scores, ...)")
    spec = json.loads(path.read_text())
    if spec.get("format") != FORMAT:
        raise ShapeError(f"{path} has format {spec.get('format')!r}; this sourcetrace reads {FORMAT!r}")
    scores = Scores.load(workdir / "scores") if (workdir / "scores" / "scores.json").exists() else None
    backend = None
    if spec.get("backend"):
        from .llm import LMBackend

        b = spec["backend"]
        backend = LMBackend.load(workdir / b["path"], threads=b.get("threads"))
    return Session(scores, spec["train_items"], spec["query_items"], title=spec["title"],
                   groups=spec.get("groups"), backend=backend, columns=spec.get("columns"))


def _plain(obj: Any) -> Any:
    """Items as JSON: tensors and arrays become lists."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (bytes, bytearray, memoryview)):  # audio: a WAV file's bytes
        return WAV_URI + base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "to_dict"):
        return _plain(obj.to_dict())
    return obj

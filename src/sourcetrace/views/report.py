"""The self-contained HTML report: the shared front end with its data inlined, one file, no network."""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..artifacts import atomic_write_bytes
from ..scores import Scores
from .payload import report_payload

_PLACEHOLDER = re.compile(r"/\*__(STYLE|SCRIPT)__\*/|__(TITLE|DATA|CONFIG)__")


def static_text(name: str) -> str:
    """A file of the front end (`static/`), as text."""
    return resources.files(__package__).joinpath("static").joinpath(name).read_text(encoding="utf-8")


def script_json(obj: Any) -> str:
    """JSON that is safe inside a <script> element (no `</script>`, no `<!--`)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(payload: dict[str, Any], *, api: str | None = None) -> str:
    """The front end as one HTML page showing `payload`; with `api`, token selections go to that JSON API."""
    parts = {"STYLE": static_text("style.css"), "SCRIPT": static_text("app.js"),
             "TITLE": html.escape(str(payload.get("title", "sourcetrace"))),
             "DATA": script_json(payload), "CONFIG": script_json({"api": api})}
    # one pass, so that nothing inserted is scanned for placeholders again
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1) or m.group(2)], static_text("index.html"))


def write_report(scores: Scores, path: str | os.PathLike, *, train_items: Sequence[Any] | None = None,
                 query_items: Sequence[Any] | None = None, title: str = "sourcetrace report",
                 groups: Any = None, k: int = 6, backend: Any = None,
                 columns: Sequence[Any] | None = None) -> Path:
    """Write one self-contained HTML file showing `scores`; open it in any browser, offline.

    `train_items` / `query_items` are aligned with `scores.train_ids` / `scores.query_ids`; each is a dict
    with optional keys `text`, `tokens` (an LLM generation), `prompt`, `selection` (the attributed tokens),
    `image` (2-D grey values), `row` (a table row: a dict column -> value, or a list aligned with
    `columns`), `audio` (1-D samples in [-1, 1] with `sample_rate`, or a WAV file's path or bytes; inlined
    as a WAV data URI, clips cut to 30 s), `label`, `source`, `spans` (verbatim spans) and, for queries,
    `compare_to` (another query: the compare view diffs the two). `groups` maps a grouping name to each
    training example's group (default: the items' labels and sources); `k` examples are shown on each side.
    With an LM `backend` (see `LMBackend`), expanded training texts shade each token's share of the score.
    """
    if backend is not None and hasattr(backend, "token_contributions"):
        from .session import Session

        session = Session(scores, train_items, query_items, title=title, groups=groups, backend=backend, k=k,
                          columns=columns)
        payload = dict(session.payload(), can_attribute=False)
    else:
        payload = report_payload(scores, train_items=train_items, query_items=query_items, title=title,
                                 groups=groups, k=k, columns=columns)
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path / "report.html" if path.is_dir() or not path.suffix else path
    atomic_write_bytes(path, render_html(payload).encode("utf-8"))
    path.chmod(0o644)  # a report is for sharing (the atomic write leaves 0600)
    return path

"""The self-contained HTML report: the shared front end with its data inlined, one file, no network."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..artifacts import atomic_write_bytes
from ..scores import Scores
from .page import render_html
from .payload import report_payload


def write_report(scores: Scores, path: str | os.PathLike, *, train_items: Sequence[Any] | None = None,
                 query_items: Sequence[Any] | None = None, title: str = "sourcetrace report",
                 groups: Any = None, k: int = 6, backend: Any = None,
                 columns: Sequence[Any] | None = None) -> Path:
    """Write one self-contained HTML file showing `scores`; open it in any browser, offline.

    `train_items` / `query_items` are aligned with `scores.train_ids` / `scores.query_ids`; each is a dict
    with optional keys `text`, `tokens` (an LLM generation), `prompt`, `selection` (the attributed tokens),
    `image` (2-D grey values), `row` (a table row: a dict column -> value, or a list aligned with
    `columns`), `audio` (1-D samples in [-1, 1] with `sample_rate`, or a WAV file's path or bytes; inlined
    as a WAV data URI, clips cut to 30 s; `start`: the second the player starts at), `label`, `source`,
    `spans` (verbatim spans) and, for queries, `compare_to` (another query: the compare view diffs the two
    texts, or shows the two images with their difference, e.g. a generated image beside its counterfactual).
    `groups` maps a grouping name to each training example's group (default: the items' labels and sources);
    `k` examples are shown on each side. Scores that are distances (their metadata names a `distance`, as an
    encoded ensemble's) have no sign: the report lists the largest `k` and no opponents.
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

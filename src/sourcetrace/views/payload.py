"""The view model: what the front end draws, built from `Scores` and the items they are about.

Every way of opening the views (HTML report, notebook widget, web app) hands the same JSON to the same
front end (`static/app.js`). Its shape:

    {"title", "method", "kind": "classifier" | "llm", "can_attribute": bool, "magnitude": bool, "distance",
     "queries": [{"id", "index", "text", "prompt", "tokens", "selection", "image", "row", "audio", "label",
                  "source", "spans",
                  "result": {"top": [{"index", "score", "token_scores"?}], "bottom": [...],
                             "hist": {"edges", "counts", "partial"}, "keywords": {"pos", "neg"},
                             "removal": {"k", "top", "bottom"}?},
                  "compare": {"other", "ops", "removed", "added",
                              "image": {"distance", "diff", "diff_max"}?}?}],
     "train": {"<index>": {"id", "text", "tokens", "image", "row", "audio", "label", "source"}},  # shown only
     "groups": [{"name", "names", "sizes", "query": [[mass per group] per query], "mean"}]}

with "row": {"columns", "values"} and "audio": {"src": "data:audio/wav;base64,...", "seconds", "sample_rate",
"truncated"?, "start"?} (see media.py; the player starts at "start" seconds). "magnitude": the scores are
distances (e.g. an encoded ensemble's counterfactual distances, named by "distance"): the front end shows the
largest and no opponents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ShapeError
from ..scores import Scores
from .media import audio_json, row_json
from .text import Keywords, joiner, word_diff

ITEM_KEYS = ("text", "prompt", "tokens", "selection", "label", "source", "token_scores")


def _num(v: float) -> float:
    return float(f"{float(v):.6g}")


def image_json(image: Any, top: float | None = None) -> dict[str, Any]:
    """A grey image (2-D, values 0..1, 0..16 or 0..255; a flat square also works) as 8-bit pixels.

    `top` is the value drawn as full ink (by default 1, 16 or 255, whichever range the values fit).
    """
    a = _grey(image)
    top = _top(a) if top is None else top
    px = np.clip(np.nan_to_num(a) / top * 255, 0, 255).round().astype(int)
    return {"h": int(a.shape[0]), "w": int(a.shape[1]), "data": px.reshape(-1).tolist()}


def image_compare(a: Any, b: Any) -> dict[str, Any]:
    """Two images side by side: the L2 distance of their given values and |a − b| as an image, its largest
    value (`diff_max`) drawn as full ink so that small changes show."""
    x, y = _grey(a), _grey(b)
    if x.shape != y.shape:
        raise ShapeError(f"compared images must have one shape; got {x.shape} and {y.shape}")
    diff = np.abs(np.nan_to_num(x) - np.nan_to_num(y))
    top = float(diff.max()) if diff.size else 0.0
    return {"distance": _num(np.sqrt((diff ** 2).sum())), "diff_max": _num(top),
            "diff": image_json(diff, top or 1.0)}


def _top(a: np.ndarray) -> float:
    hi = float(np.nanmax(a)) if a.size else 1.0
    return 1.0 if hi <= 1 else 16.0 if hi <= 16 else 255.0


def _grey(image: Any) -> np.ndarray:
    a = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=float)
    if a.ndim == 1:
        side = int(round(len(a) ** 0.5))
        if side * side != len(a):
            raise ShapeError(f"a flat image needs a square number of pixels; got {len(a)}")
        a = a.reshape(side, side)
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    if a.ndim != 2:
        raise ShapeError(f"images must be 2-D grey values; got shape {a.shape}")
    return a


def item_json(item: Mapping[str, Any] | None, id_: Any, columns: Sequence[Any] | None = None, *,
              audio: bool = True) -> dict[str, Any]:
    """One train or query item, with only the keys the front end knows, in JSON types.

    `columns` names the values of a `row` given as a list. Without `audio`, a clip is left out (training
    clips are encoded only when shown: see `with_audio`).
    """
    out: dict[str, Any] = {"id": _jsonable_id(id_)}
    if not item:
        return out
    if not isinstance(item, Mapping):
        raise ShapeError("items must be dicts with keys text/tokens/image/row/audio/label/source; "
                         f"got {type(item).__name__}")
    for key in ITEM_KEYS:
        if item.get(key) is not None:
            v = item[key]
            if key in ("tokens",):
                v = [str(t) for t in v]
            elif key in ("selection",):
                v = [int(i) for i in v]
            elif key == "token_scores":
                v = [_num(x) for x in v]
            else:
                v = str(v)
            out[key] = v
    if "tokens" in out:
        out["joiner"] = joiner(out["tokens"])
        if "text" not in out:
            out["text"] = out["joiner"].join(out["tokens"])
    if item.get("image") is not None:
        out["image"] = image_json(item["image"])
    if item.get("row") is not None:
        out["row"] = row_json(item["row"], columns)
    if audio and item.get("audio") is not None:
        out["audio"] = audio_json(item["audio"], item.get("sample_rate"), start=item.get("start"))
    if item.get("spans"):
        out["spans"] = [_span_json(s) for s in item["spans"]]
    return out


def with_audio(shown: dict[str, Any], item: Any) -> dict[str, Any]:
    """A train item's JSON (made with `audio=False`) with the clip of its raw `item`, when it has one."""
    if "audio" in shown or not isinstance(item, Mapping) or item.get("audio") is None:
        return shown
    return {**shown, "audio": audio_json(item["audio"], item.get("sample_rate"), start=item.get("start"))}


def _span_json(span: Any) -> dict[str, Any]:
    """A verbatim span (a corpus `Span`, its dict, or {start, end, docs}) in token positions [start, end)."""
    d = span.to_dict() if hasattr(span, "to_dict") else dict(span)
    docs = []
    for o in d.get("docs", []) or []:
        o = o if isinstance(o, Mapping) else getattr(o, "__dict__", {})
        docs.append({k: o[k] for k in ("doc_id", "doc_index", "before", "match", "after", "href") if k in o})
    return {"start": int(d["start"]), "end": int(d["end"]), "count": d.get("count"),
            "text": d.get("text", ""), "docs": docs}


def _jsonable_id(i: Any) -> Any:
    if isinstance(i, (np.generic, torch.Tensor)):
        return i.item()
    return i if isinstance(i, (str, int, float, bool)) or i is None else str(i)


def _check_items(items: Sequence[Any] | None, n: int, what: str) -> list[Any]:
    if items is None:
        return [None] * n
    items = list(items)
    if len(items) != n:
        raise ShapeError(f"{len(items)} {what} for {n} {what.split('_')[0]} ids; "
                         "give one item per id, in order")
    return items


def train_texts(train: Sequence[dict[str, Any]]) -> list[str]:
    return [t.get("text", "") for t in train]


def is_magnitude(scores: Scores) -> bool:
    """Whether the scores are distances (metadata names a `distance`): no sign, so no opponents."""
    return scores.metadata.get("distance") is not None


def query_result(scores: Scores, row: int, *, k: int = 6, keywords: Keywords | None = None,
                 texts: Sequence[str] = (), bins: int = 20) -> dict[str, Any]:
    """The shown part of one query's scores: top and bottom k, a histogram of all scores, keywords.

    Distances (`is_magnitude`) have only a top: their smallest values are not opponents.
    """
    kept = scores.top_values.shape[1] if scores.matrix is None else len(scores.train_ids)  # type: ignore
    k = max(0, min(k, kept))
    top = [{"index": a.index, "score": _num(a.score)} for a in scores.top(row=row, k=k)]
    bottom = ([] if is_magnitude(scores)
              else [{"index": a.index, "score": _num(a.score)} for a in scores.bottom(row=row, k=k)])
    if scores.matrix is not None:
        values = scores.matrix[row].detach().double().cpu().numpy()
        partial = False
    else:
        values = np.array([r["score"] for r in top + bottom], dtype=float)
        partial = True
    values = values[np.isfinite(values)]
    counts, edges = np.histogram(values, bins=bins) if values.size else (np.zeros(0), np.zeros(0))
    result: dict[str, Any] = {"top": top, "bottom": bottom, "partial": partial,
                              "hist": {"edges": [_num(e) for e in edges], "counts": [int(c) for c in counts]}}
    if scores.matrix is not None and scores.metadata.get("removal_scale") is not None and k:
        def effect(rows: list[dict[str, Any]]) -> float:
            return _num(float(scores.removal_effect([scores.train_ids[r["index"]] for r in rows])[row]))

        result["removal"] = {"k": k, "top": effect(top), "bottom": effect(bottom)}
    if keywords is not None:
        def pick(rows: list[dict[str, Any]]) -> list[str]:
            return [texts[r["index"]] for r in rows if texts[r["index"]]]

        result["keywords"] = {"pos": keywords.top(pick(top)), "neg": keywords.top(pick(bottom))}
    return result


def groups_json(scores: Scores, groups: Any, train: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score mass per group for every query and on average, for each grouping (default: label, source)."""
    if scores.matrix is None:
        return []
    if groups is None:
        groups = {key: [t[key] for t in train] for key in ("label", "source")
                  if train and all(key in t for t in train) and len({t[key] for t in train}) > 1}
    elif not isinstance(groups, Mapping):
        groups = {"group": groups}
    out = []
    for name, labels in groups.items():
        g = scores.group_by(labels if isinstance(labels, Mapping) else [str(x) for x in labels])
        m = g.matrix.detach().double()  # type: ignore[union-attr]
        out.append({"name": str(name), "names": [str(x) for x in g.train_ids],
                    "sizes": [int(s) for s in g.metadata.get("group_sizes", [])],
                    "query": [[_num(v) for v in row] for row in m.tolist()],
                    "mean": [_num(v) for v in m.mean(0).tolist()]})
    return out


def report_payload(scores: Scores, *, train_items: Sequence[Any] | None = None,
                   query_items: Sequence[Any] | None = None, title: str = "sourcetrace report",
                   groups: Any = None, k: int = 6, train: list[dict[str, Any]] | None = None,
                   keywords: Keywords | None = None, columns: Sequence[Any] | None = None) -> dict[str, Any]:
    """The JSON the front end draws for `scores` (see the module docstring).

    `train` (the items already through `item_json`, without audio) and `keywords` let a caller that redraws
    often reuse them; the shown training clips come from `train_items`. `columns` names the values of rows
    given as lists.
    """
    raw_train = _check_items(train_items, len(scores.train_ids), "train_items")
    if train is None:
        train = [item_json(it, i, columns, audio=False) for it, i in zip(raw_train, scores.train_ids)]
    raw_queries = _check_items(query_items, len(scores.query_ids), "query_items")
    queries = [item_json(it, i, columns) for it, i in zip(raw_queries, scores.query_ids)]
    texts = train_texts(train)
    if keywords is None and any(texts):
        keywords = Keywords(texts)
    shown: set[int] = set()
    for r, q in enumerate(queries):
        q["index"] = r
        q["result"] = query_result(scores, r, k=k, keywords=keywords, texts=texts)
        shown.update(x["index"] for x in q["result"]["top"] + q["result"]["bottom"])
    for r, it in enumerate(raw_queries):
        other = (it or {}).get("compare_to") if isinstance(it, Mapping) else None
        if other is not None:
            j = scores._row(other)
            queries[r]["compare"] = compare_json(queries[r], queries[j], j)
            if it.get("image") is not None and (raw_queries[j] or {}).get("image") is not None:
                queries[r]["compare"]["image"] = image_compare(it["image"], raw_queries[j]["image"])
    kind = "llm" if any("tokens" in q for q in queries) else "classifier"
    return {"title": title, "method": scores.method, "kind": kind, "can_attribute": False,
            "magnitude": is_magnitude(scores), "distance": scores.metadata.get("distance"),
            "queries": queries, "train": {str(i): with_audio(train[i], raw_train[i]) for i in sorted(shown)},
            "groups": groups_json(scores, groups, train)}


def compare_json(a: dict[str, Any], b: dict[str, Any], other: int) -> dict[str, Any]:
    """The compare view's diff of two queries' tokens (or words of their texts)."""
    ta = a.get("tokens") or a.get("text", "").split()
    tb = b.get("tokens") or b.get("text", "").split()
    return {"other": other, **word_diff(ta, tb)}

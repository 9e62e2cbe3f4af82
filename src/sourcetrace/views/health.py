"""The data-health page: groups behind a behaviour, suspected mislabels, undersampled regions, reliability
badges and the what-if panel (predicted vs verified effects), as one self-contained HTML file."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..artifacts import atomic_write_bytes
from ..errors import EmptyDataError
from .page import script_json, static_text


def health_payload(*, title: str = "data health", subtitle: str = "", ranking: Any = None,
                   top_groups: int = 10, suspicion: Any = None, signal: str = "combined",
                   labels: Sequence[Any] | None = None,
                   predicted: Sequence[Any] | None = None, flipped: Sequence[int] | None = None,
                   n_suspects: int = 12, regions: Sequence[Any] = (), reliability: Any = None,
                   query_ids: Sequence[Any] | None = None, effects: Sequence[Any] = ()) -> dict[str, Any]:
    """The page's data from insights results (each section optional).

    ranking: an `insights.GroupRanking`; suspicion: the `Scores` of `insights.suspicion` (row `signal` is
    listed) with the training `labels`, the model's `predicted` labels and, when known, the `flipped` rows;
    regions: `insights.Region`s; reliability: an `insights.Reliability`; effects: `insights.Effect`s.
    """
    data: dict[str, Any] = {"title": title, "subtitle": subtitle, "cards": []}
    if ranking is not None:
        data["groups"] = {"behaviour": f"{ranking.behaviour.name}: {ranking.behaviour.metric}",
                          "rows": ranking.table(top_groups)}
    if suspicion is not None:
        values = suspicion.matrix[suspicion.query_ids.index(signal)]
        order = values.argsort(descending=True)[:n_suspects].tolist()
        known = set(flipped) if flipped is not None else None
        data["suspects"] = {"known": known is not None, "note": f"signal: {signal}", "rows": [
            {"row": suspicion.train_ids[i], "label": None if labels is None else str(labels[i]),
             "predicted": None if predicted is None else str(predicted[i]), "score": float(values[i]),
             "flipped": bool(known is not None and i in known)} for i in order]}
        data["cards"].append({"label": "suspected mislabels listed", "value": len(order)})
    if regions:
        data["regions"] = [{"size": len(r.queries), "describe": r.describe(),
                            "nearest_train": r.nearest_train} for r in regions]
        data["cards"].append({"label": "thin regions", "value": len(regions)})
    if reliability is not None:
        n = len(reliability.stability)
        data["reliability"] = {"stability": [float(v) for v in reliability.stability],
                               "badges": [reliability.badge(q) for q in range(n)],
                               "queries": list(query_ids) if query_ids is not None else list(range(n)),
                               "note": f"Bootstrap stability of each query's top-{reliability.k} list; "
                                       f"unstable below {reliability.threshold:g}."}
        data["cards"].append({"label": "unstable lists", "value": int(reliability.unstable.sum())})
    if effects:
        data["actions"] = [dict(e.row(), kind=e.action.kind) for e in effects]
        verified = sum(e.actual_after is not None for e in effects)
        data["cards"].append({"label": "actions verified by retraining", "value": verified})
    return data


def render_health(payload: dict[str, Any]) -> str:
    """The page as one HTML string."""
    parts = {"TITLE": html.escape(str(payload.get("title", "data health"))), "DATA": script_json(payload)}
    # one pass, so that nothing inserted is scanned for placeholders again
    return re.sub(r"__(TITLE|DATA)__", lambda m: parts[m.group(1)], static_text("health.html"))


def write_health(path: str | os.PathLike, payload: dict[str, Any] | None = None, **sections: Any) -> Path:
    """Write the data-health page to `path` (a .html file); give a payload or `health_payload`'s arguments."""
    payload = payload if payload is not None else health_payload(**sections)
    if not any(k in payload for k in ("groups", "suspects", "regions", "reliability", "actions")):
        raise EmptyDataError("the data-health page has no section; give a ranking, suspicion, regions, "
                             "reliability or effects")
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path / "health.html"
    atomic_write_bytes(path, render_health(payload).encode("utf-8"))
    path.chmod(0o644)
    return path

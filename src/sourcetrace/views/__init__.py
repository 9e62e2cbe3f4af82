"""Views: the HTML report, the notebook widget and the web app, all drawn by one front end (`static/`).

- `write_report(scores, path, ...)`: one self-contained HTML file (no network, no extra packages).
- `AttributionWidget(scores, ..., backend=...)`: a notebook widget; selecting tokens attributes them in the
  kernel (needs `anywidget`).
- `save_view(workdir, ...)` then `sourcetrace serve WORKDIR` (or `create_app`): a local web app with a JSON
  API that attributes new selections (needs `fastapi` and `uvicorn`).
- `Backend` / `LMBackend`: what attributes a selection; `LMBackend` wraps any causal LM and a tokenizer.
"""

from typing import Any

from .health import health_payload, write_health
from .llm import Backend, LMBackend
from .payload import report_payload
from .report import render_html, write_report
from .session import Session, load_view, save_view

__all__ = ["AttributionWidget", "Backend", "LMBackend", "Session", "create_app", "load_view",
           "health_payload", "render_html", "report_payload", "run_server", "save_view", "write_health",
           "write_report"]


def __getattr__(name: str) -> Any:
    # the widget and the app import their optional packages only when asked for
    if name == "AttributionWidget":
        from .widget import AttributionWidget

        return AttributionWidget
    if name in ("create_app", "run_server"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)

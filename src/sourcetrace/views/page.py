"""The front end as one HTML page: the shared static files with a payload inlined (no network)."""

from __future__ import annotations

import html
import json
import re
from importlib import resources
from typing import Any

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

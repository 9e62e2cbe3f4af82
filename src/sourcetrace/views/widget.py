"""The notebook widget (anywidget): the shared front end in a cell, with two-way traffic to the kernel.

Selecting tokens in the widget sends `{"type": "select", "query": id, "selection": [...]}`; the kernel
attributes the selection with the session's backend and answers `{"type": "update", "update": {...}}` (or
`{"type": "error", "message": ...}`), and the widget redraws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import MissingExtraError, SourcetraceError
from ..scores import Scores
from .page import static_text
from .session import Session

try:
    import anywidget
    import traitlets
except ImportError:  # the class below needs them; importing this module without them is an error later
    anywidget = None  # type: ignore[assignment]


def widget_esm() -> str:
    """The widget's JavaScript module: the shared front end plus the anywidget adaptor."""
    return static_text("app.js") + "\n" + static_text("widget.js")


if anywidget is not None:

    class AttributionWidget(anywidget.AnyWidget):
        """Attribution views in a notebook; selections are attributed by the kernel when a backend is given.

        `AttributionWidget(scores, train_items=..., query_items=..., backend=...)` or
        `AttributionWidget(session)`.
        """

        _esm = widget_esm()
        _css = static_text("style.css")
        data = traitlets.Dict().tag(sync=True)

        def __init__(self, scores: Scores | Session | None = None, *,
                     train_items: Sequence[Any] | None = None, query_items: Sequence[Any] | None = None,
                     backend: Any = None, title: str = "sourcetrace", groups: Any = None,
                     columns: Sequence[Any] | None = None, **kwargs: Any):
            super().__init__(**kwargs)
            self.session = scores if isinstance(scores, Session) else Session(
                scores, train_items, query_items, title=title, groups=groups, backend=backend,
                columns=columns)
            self.data = self.session.payload()
            self.on_msg(self._on_message)

        def handle(self, content: dict[str, Any]) -> dict[str, Any]:
            """Answer one message from the front end (also callable directly, e.g. from tests)."""
            reply: dict[str, Any] = {"request": content.get("request")}
            try:
                row = self.session.row(str(content.get("query")))
                if content.get("type") == "select":
                    update = self.session.attribute(row, content.get("selection") or [])
                elif content.get("type") == "compare":
                    update = self.session.compare(row, str(content.get("text", "")))
                else:
                    raise SourcetraceError(f"unknown message type {content.get('type')!r}")
            except KeyError:
                return {**reply, "type": "error", "message": f"no query {content.get('query')!r}"}
            except SourcetraceError as exc:
                return {**reply, "type": "error", "message": str(exc)}
            self.data = self.session.payload()
            return {**reply, "type": "update", "update": update}

        def _on_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
            if isinstance(content, dict):
                self.send(self.handle(content))

else:

    class AttributionWidget:  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any):
            raise MissingExtraError("the notebook widget needs anywidget; install it with "
                                    "`pip install sourcetrace[views]`")

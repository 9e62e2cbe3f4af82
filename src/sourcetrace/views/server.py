"""`sourcetrace serve WORKDIR`: the views as a local web app with a JSON API that attributes new selections.

The app binds 127.0.0.1 unless told otherwise, answers malformed requests and unknown ids with 4xx, and serves
files from inside the workdir only. FastAPI and uvicorn are imported when the app is made, so that the CLI
imports without the `[views]` extra.
"""

# no `from __future__ import annotations`: FastAPI reads the request models' annotations at run time
import os
import secrets
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from ..errors import MissingExtraError, SourcetraceError
from .page import render_html
from .session import NoBackendError, Session, load_view

MAX_SELECTION = 4096
MAX_CLIENTS = 256  # clients with their own selections; the least recently active is forgotten first
CLIENT_COOKIE = "sourcetrace_client"
MAX_TEXT = 20_000


def _require() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError("the web app needs fastapi and uvicorn; install them with "
                                "`pip install sourcetrace[views]`") from exc


def create_app(session: Session | str | os.PathLike, *, root: str | os.PathLike | None = None) -> Any:
    """A FastAPI app showing `session` (or the view saved in a workdir); `/files/` serves `root` only."""
    _require()
    from fastapi import Body, FastAPI, HTTPException, Request, Response
    from fastapi.responses import FileResponse, HTMLResponse
    from pydantic import BaseModel, ConfigDict, Field

    if not isinstance(session, Session):
        root = session if root is None else root
        session = load_view(session)
    files_root = Path(root).resolve() if root is not None else None

    class Selection(BaseModel):
        """Token positions (in the query's generated tokens) whose log-probability to attribute."""

        model_config = ConfigDict(extra="forbid")
        selection: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=MAX_SELECTION)

    class Compare(BaseModel):
        """A text of the user's, to compare with the model's generation word by word."""

        model_config = ConfigDict(extra="forbid")
        text: str = Field(min_length=1, max_length=MAX_TEXT)

    app = FastAPI(title="sourcetrace", version="1",
                  description="Training-data attribution views: which training examples made the model "
                              "produce this output. Positive scores are proponents. Each client (a cookie) "
                              "has its own selections and compares.")
    base = session  # never changed: a client's first change works on its own fork of it
    clients: OrderedDict[str, Session] = OrderedDict()
    clients_lock = threading.Lock()

    def view_of(request: Request) -> Session:
        with clients_lock:
            own = clients.get(request.cookies.get(CLIENT_COOKIE, ""))
        return own if own is not None else base

    def own_view(request: Request, response: Response) -> Session:
        """The client's own copy of the view, made (and named in a cookie) on its first change."""
        cid = request.cookies.get(CLIENT_COOKIE, "")
        with clients_lock:
            if cid in clients:
                clients.move_to_end(cid)
                return clients[cid]
            cid = secrets.token_urlsafe(16)
            clients[cid] = base.fork()
            while len(clients) > MAX_CLIENTS:
                clients.popitem(last=False)
            response.set_cookie(CLIENT_COOKIE, cid, httponly=True, samesite="strict")
            return clients[cid]

    def find(view: Session, query: str) -> int:
        try:
            return view.row(query)
        except KeyError:
            raise HTTPException(404, f"no query with id {query!r}; GET /api/queries lists them") from None

    def act(fn: Any, *args: Any) -> dict[str, Any]:
        try:
            return fn(*args)
        except NoBackendError as exc:
            raise HTTPException(409, str(exc)) from None
        except SourcetraceError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> str:
        return render_html(view_of(request).payload(), api="/api")

    @app.get("/api/view", summary="Everything the front end draws")
    def get_view(request: Request) -> dict[str, Any]:
        return view_of(request).payload()

    @app.get("/api/queries", summary="The queries, in order")
    def list_queries(request: Request) -> list[dict[str, Any]]:
        return [{k: q[k] for k in ("id", "index", "prompt", "text", "label", "source", "selection") if k in q}
                for q in view_of(request).payload()["queries"]]

    @app.get("/api/queries/{query}", summary="One query with its attribution and shown training items")
    def get_query(query: str, request: Request) -> dict[str, Any]:
        view = view_of(request)
        return view.query_update([find(view, query)])

    @app.post("/api/queries/{query}/attribute", summary="Attribute a new selection of the query's tokens")
    def attribute(query: str, body: Annotated[Selection, Body()], request: Request,
                  response: Response) -> dict[str, Any]:
        if view_of(request) is base:
            find(base, query)  # an unknown id is a 404 before anything is copied
        view = own_view(request, response)
        return act(view.attribute, find(view, query), body.selection)

    @app.post("/api/queries/{query}/compare", summary="Compare the model's text with the user's text")
    def compare(query: str, body: Annotated[Compare, Body()], request: Request,
                response: Response) -> dict[str, Any]:
        if view_of(request) is base:
            find(base, query)
        view = own_view(request, response)
        return act(view.compare, find(view, query), body.text)

    @app.get("/api/train/{index}", summary="One training item, in full")
    def train_item(index: int, request: Request) -> dict[str, Any]:
        try:
            return view_of(request).train_item(index)
        except KeyError:
            raise HTTPException(404, f"no training item {index}") from None

    @app.get("/files/{path:path}", include_in_schema=False)
    def files(path: str) -> Any:
        target = _inside(files_root, path)
        if target is None:
            raise HTTPException(404, "not found")
        return FileResponse(target)

    return app


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread (port 0: a free one); yields its base URL.

    For notebooks and tests: the server stops when the block ends.
    """
    _require()
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", limit_concurrency=1000))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            sock.close()
            raise RuntimeError("the web app did not start; see the log above")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _inside(root: Path | None, path: str) -> Path | None:
    """The file `path` names under `root`; None if missing or resolving outside (`..`, absolute, links)."""
    if root is None or "\x00" in path:
        return None
    target = (root / path.lstrip("/")).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def port_free(host: str, port: int) -> bool:
    """Whether this process could listen on host:port now."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        return True
    except OSError:
        return False


def run_server(workdir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the view in `workdir` until Ctrl-C (what `sourcetrace serve WORKDIR` runs)."""
    _require()
    import uvicorn

    app = create_app(workdir)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach it can run attributions", file=sys.stderr)
    print(f"sourcetrace views of {workdir} at http://{host}:{port}/  (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")

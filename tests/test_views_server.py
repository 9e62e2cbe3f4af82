"""The web app: JSON API, 4xx on bad input, files from the workdir only, 200 concurrent requests, loopback."""

import asyncio
import contextlib
import copy
import inspect
import socket

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

from sourcetrace.views import save_view  # noqa: E402
from sourcetrace.views.server import _inside, create_app  # noqa: E402
from sourcetrace.views.server import serve_in_thread as live  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from sourcetrace.demos.examples import shared_tiny_lm

    backend, train, queries = shared_tiny_lm()
    root = tmp_path_factory.mktemp("views")
    work = root / "work"
    save_view(work, None, train_items=train, query_items=copy.deepcopy(queries), title="tiny",
              backend=backend)
    (root / "secret.txt").write_text("outside the workdir")
    (work / "notes.txt").write_text("inside")
    with contextlib.suppress(OSError):
        (work / "link.txt").symlink_to(root / "secret.txt")
    return work


@pytest.fixture(scope="module")
def client(workdir):
    from fastapi.testclient import TestClient

    with TestClient(create_app(workdir)) as c:
        yield c


def test_api_lists_queries_and_attributes_a_selection(client):
    queries = client.get("/api/queries").json()
    assert [q["id"] for q in queries] == [0, 1] and queries[0]["prompt"] == "the chef"
    view = client.get("/api/view").json()
    assert view["can_attribute"] and view["kind"] == "llm"
    r = client.post("/api/queries/0/attribute", json={"selection": [0]})
    assert r.status_code == 200
    q = r.json()["queries"][0]
    assert q["selection"] == [0]
    assert all(str(x["index"]) in r.json()["train"] for x in q["result"]["top"])
    assert client.get("/api/queries/0").json()["queries"][0]["selection"] == [0]  # the server remembers it
    item = client.get(f"/api/train/{q['result']['top'][0]['index']}").json()
    assert item["text"] and item["tokens"]
    page = client.get("/")
    assert page.status_code == 200 and "SourcetraceView" in page.text and '"api":"/api"' in page.text


def test_openapi_schema_describes_the_api(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert "/api/queries/{query}/attribute" in paths and "/api/queries/{query}/compare" in paths
    assert "/files/{path}" not in paths
    body = paths["/api/queries/{query}/attribute"]["post"]["requestBody"]
    assert body["required"]


@pytest.mark.parametrize("request_kwargs, status", [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
    ({"json": {"selection": "0"}}, 422),
    ({"json": {"selection": []}}, 422),
    ({"json": {"selection": [-1]}}, 422),
    ({"json": {"selection": [0], "extra": 1}}, 422),
    ({"json": {"selection": [999]}}, 422),  # outside the text: the session refuses it
    ({"json": ["selection"]}, 422),
])
def test_bad_requests_get_4xx(client, request_kwargs, status):
    assert client.post("/api/queries/0/attribute", **request_kwargs).status_code == status


def test_unknown_ids_get_404(client):
    assert client.post("/api/queries/nope/attribute", json={"selection": [0]}).status_code == 404
    assert client.post("/api/queries/7/compare", json={"text": "x"}).status_code == 404
    assert client.get("/api/queries/nope").status_code == 404
    assert client.get("/api/train/100000").status_code == 404
    assert client.get("/api/train/x").status_code == 422
    assert client.get("/api/nothing").status_code == 404
    assert client.post("/api/queries/0/compare", json={"text": ""}).status_code == 422


def test_files_come_from_inside_the_workdir_only(client, workdir):
    assert client.get("/files/notes.txt").text == "inside"
    assert client.get("/files/report.html").status_code == 200
    for bad in ["../secret.txt", "..%2Fsecret.txt", "%2E%2E/secret.txt", "..%5Csecret.txt", "link.txt",
                str(workdir.parent / "secret.txt"), "%2F" + str(workdir.parent / "secret.txt").lstrip("/"),
                "/etc/passwd", "%2Fetc%2Fpasswd", "notes.txt%00", "."]:
        r = client.get("/files/" + bad)
        assert r.status_code == 404, bad
        assert "outside the workdir" not in r.text
    # the path check itself, without any URL normalisation in between
    root = workdir.resolve()
    assert _inside(root, "notes.txt") == root / "notes.txt"
    for bad in ["../secret.txt", "a/../../secret.txt", str(root.parent / "secret.txt"), "/etc/passwd",
                "link.txt", "notes.txt\x00"]:
        assert _inside(root, bad) is None, bad


def test_raw_dot_dot_request_on_loopback(workdir):
    """A client that sends `..` unnormalised (httpx would normalise it) still gets nothing outside."""
    with live(create_app(workdir)) as url:
        port = int(url.rsplit(":", 1)[1])
        for target in ("/files/../secret.txt", "/files/../../../etc/passwd", "/files/%2e%2e/secret.txt"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            assert reply.split(b" ", 2)[1] in (b"400", b"404"), target
            assert b"outside the workdir" not in reply


def test_two_hundred_concurrent_requests(workdir):
    with live(create_app(workdir)) as url:
        async def hammer():
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
                async def one(i):
                    if i % 4 == 0:
                        return await c.post("/api/queries/1/attribute", json={"selection": [i % 3]})
                    if i % 4 == 1:
                        return await c.get("/api/queries/0")
                    if i % 4 == 2:
                        return await c.get("/api/view")
                    return await c.post("/api/queries/0/attribute", content=b"{")
                return await asyncio.gather(*(one(i) for i in range(200)))

        replies = asyncio.run(hammer())
        codes = [r.status_code for r in replies]
        assert codes.count(200) == 150 and codes.count(422) == 50, sorted(set(codes))
        assert httpx.get(url + "/api/queries").status_code == 200  # still up


def test_serve_binds_loopback_by_default(monkeypatch, workdir):
    from typer.testing import CliRunner

    from sourcetrace.cli import app, serve

    assert inspect.signature(serve).parameters["host"].default.default == "127.0.0.1"
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(host=host, port=port))
    with socket.socket() as sock:  # a port free now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(app, ["serve", str(workdir), "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert seen == {"host": "127.0.0.1", "port": port} and f"http://127.0.0.1:{port}/" in result.output


def test_a_view_without_backend_refuses_new_selections(tmp_path):
    import torch
    from fastapi.testclient import TestClient

    from sourcetrace import Scores
    s = Scores(torch.randn(1, 5), list(range(5)), ["q"], "grad-dot")
    save_view(tmp_path, s, query_items=[{"prompt": "p", "tokens": ["a", "b"]}],
              train_items=[{"text": "t"}] * 5)
    with TestClient(create_app(tmp_path)) as c:
        assert c.get("/api/view").json()["can_attribute"] is False
        assert c.post("/api/queries/q/attribute", json={"selection": [0]}).status_code == 409


def test_served_table_and_audio_view(tmp_path):
    """A saved view with table rows and clips: the page allows inline audio, the API sends the clips."""
    from fastapi.testclient import TestClient

    from sourcetrace.demos.examples import calls_example

    scores, train, queries = calls_example(n_train=12, n_query=2)
    save_view(tmp_path / "calls", scores, train_items=train, query_items=queries, title="calls")
    with TestClient(create_app(tmp_path / "calls")) as c:
        page = c.get("/")
        assert page.status_code == 200 and "media-src 'self' data:" in page.text
        view = c.get("/api/view").json()
        assert view["queries"][0]["row"]["columns"][0] == "site"
        assert all(t["audio"]["src"].startswith("data:audio/wav;base64,") for t in view["train"].values())
        item = c.get("/api/train/11").json()  # any training item, shown or not, comes with its clip
        assert item["row"]["values"][0] == train[11]["row"]["site"]
        assert item["audio"]["seconds"] == 0.4


def test_each_client_keeps_its_own_selections_and_compares(workdir):
    """Two clients (two cookie jars): one's attribute and compare never show in the other's view."""
    from fastapi.testclient import TestClient

    app = create_app(workdir)
    with TestClient(app) as a, TestClient(app) as b:
        fresh = b.get("/api/view").json()
        tokens = fresh["queries"][0]["tokens"]
        r = a.post("/api/queries/0/attribute", json={"selection": [0]})
        assert r.status_code == 200 and "sourcetrace_client" in r.cookies
        text = "".join(tokens[:-1]) + " and jam ."
        assert a.post("/api/queries/0/compare", json={"text": text}).status_code == 200
        mine = a.get("/api/view").json()
        assert len(mine["queries"]) == 3
        assert mine["queries"][0]["selection"] != fresh["queries"][0]["selection"]
        theirs = b.get("/api/view").json()
        assert theirs == fresh  # b sees the view as it was saved
        assert [q["id"] for q in b.get("/api/queries").json()] == [0, 1]
        assert b.get("/api/queries/0~edit1").status_code == 404
        r = b.post("/api/queries/0/attribute", json={"selection": [1]})
        assert r.json()["queries"][0]["selection"] == [1]
        assert a.get("/api/queries/0").json()["queries"][0]["selection"] != [1]  # and b's change stays b's

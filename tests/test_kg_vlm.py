"""VLMExtractor against a loopback fake OpenAI-compatible server (127.0.0.1 only, a bounded script).

The server answers from a script: well-formed JSON, numbered triples, malformed text, truncated JSON, slow
answers and HTTP errors. Whatever the extractor cannot read completely never reaches the store.
"""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("rdflib")
pytest.importorskip("pyoxigraph")

from sourcetrace.errors import WorkdirMismatchError  # noqa: E402
from sourcetrace.kg import ExtractionError, KGStore, Triple, VLMExtractor, load_ontology  # noqa: E402
from sourcetrace.kg.extract import parse_answer  # noqa: E402

GOOD = json.dumps(
    {
        "triples": [
            {"relation": "hasColor", "value": "red"},
            {"relation": "pattern", "value": "stripes"},
            {"relation": "hasMood", "value": "happy"},
        ]
    }
)
TRUNCATED = '{"triples": [{"relation": "hasColor", "value": "red"}, {"relation": "hasPat'


class FakeServer:
    """Answers POST /v1/chat/completions from `script`; past the script's end it answers HTTP 500."""

    def __init__(self):
        self.script, self.requests = [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                step = outer.script.pop(0) if outer.script else {"status": 500}
                if step.get("reject_json") and "response_format" in body:
                    step = {"status": 400, "text": "response_format is not supported"}
                if "sleep" in step:
                    time.sleep(step["sleep"])
                status = step.get("status", 200)
                if status != 200:
                    payload = step.get("text", "error").encode()
                elif "raw" in step:
                    payload = step["raw"]
                else:
                    payload = json.dumps(
                        {
                            "choices": [
                                {
                                    "message": {"role": "assistant", "content": step["content"]},
                                    "finish_reason": step.get("finish", "stop"),
                                }
                            ]
                        }
                    ).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout): expected for slow answers

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def fashion():
    return load_ontology("fashion")


IMAGE = np.linspace(0, 1, 8 * 8 * 3).reshape(8, 8, 3)


def extractor(fashion, server, **kw):
    options = {"timeout": 5.0, "retries": 2, "backoff": 0.0, **kw}
    return VLMExtractor(fashion, server.url, "llama3.2-vision", **options)


def test_well_formed_json_answer(fashion, server):
    server.script = [{"content": GOOD}]
    out = extractor(fashion, server, api_key="secret").extract(IMAGE, "img")
    assert out.triples == (Triple("hasColor", "red"), Triple("hasPattern", "striped"))
    assert out.unknown_relations == {"hasMood": 1}  # counted, not silently dropped
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer secret"
    body = req["body"]
    assert body["model"] == "llama3.2-vision" and body["response_format"] == {"type": "json_object"}
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": fashion.prompt(json_mode=True)}
    uri = image["image_url"]["url"]
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_numbered_triples_without_json_mode(fashion, server):
    server.script = [
        {
            "content": "Here you go:\n1. (garment, hasColor, red)\n2) garment, Silhouette, A line\n"
            "3. (garment, hasNeckline, v neck)."
        }
    ]
    out = extractor(fashion, server, json_mode=False).extract(IMAGE)
    assert out.triples == tuple(
        sorted(
            [Triple("hasColor", "red"), Triple("hasSilhouette", "a-line"), Triple("hasNeckline", "v-neck")]
        )
    )
    assert "response_format" not in server.requests[0]["body"]
    assert server.requests[0]["body"]["messages"][0]["content"][0]["text"] == fashion.prompt(json_mode=False)


def test_auto_mode_falls_back_when_json_mode_is_not_offered(fashion, server):
    server.script = [{"reject_json": True}, {"content": "1. (garment, hasColor, blue)"}]
    ex = extractor(fashion, server, retries=0)
    assert ex.extract(IMAGE).triples == (Triple("hasColor", "blue"),)
    assert (
        "response_format" in server.requests[0]["body"]
        and "response_format" not in server.requests[1]["body"]
    )
    server.script = [{"content": "1. (garment, hasColor, green)"}]
    assert ex.extract(IMAGE * 0.5).triples == (Triple("hasColor", "green"),)  # remembers: no JSON mode now
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"content": "It is a lovely red dress, I think."},
        {"content": TRUNCATED, "finish": "length"},
        {"content": TRUNCATED},
        {"raw": b"<html>proxy error</html>"},
        {"status": 503},
    ],
)
def test_unreadable_or_partial_answers_are_retried_then_refused(fashion, server, bad):
    store = KGStore(fashion)
    store.add("earlier", [Triple("hasColor", "red")])
    server.script = [dict(bad), {"content": GOOD}]
    ex = extractor(fashion, server, retries=1)
    assert ex.extract(IMAGE).triples == (Triple("hasColor", "red"), Triple("hasPattern", "striped"))
    assert len(server.requests) == 2
    server.script = [dict(bad) for _ in range(3)]
    with pytest.raises(ExtractionError, match="after 3 tries"):
        store.add_images(extractor(fashion, server, retries=2), [("new", IMAGE * 0.3)], progress=False)
    assert len(server.requests) == 5  # bounded: 1 + retries
    assert len(store) == 1 and not store.has("new")  # nothing half-written


def test_partial_answer_kept_when_complete_and_well_formed(fashion, server):
    # an answer that names only some relations is complete; missing relations are simply absent
    server.script = [{"content": '```json\n{"hasColor": "red"}\n```'}]
    assert extractor(fashion, server).extract(IMAGE).triples == (Triple("hasColor", "red"),)


def test_slow_answer_times_out_and_is_retried(fashion, server):
    server.script = [
        {"sleep": 1.0, "content": GOOD},
        {"content": '{"triples": [["garment", "hasColor", "blue"]]}'},
    ]
    out = extractor(fashion, server, timeout=0.2, retries=1).extract(IMAGE)
    assert out.triples == (Triple("hasColor", "blue"),)
    server.script = [{"sleep": 1.0, "content": GOOD}]
    with pytest.raises(ExtractionError, match="no answer within 0.2 s"):
        extractor(fashion, server, timeout=0.2, retries=0).extract(IMAGE)


def test_client_errors_are_not_retried(fashion, server):
    server.script = [{"status": 401, "text": "bad key"}]
    with pytest.raises(ExtractionError, match="HTTP 401.*bad key"):
        extractor(fashion, server).extract(IMAGE)
    assert len(server.requests) == 1


def test_cache_per_image_hash_and_refused_for_another_model(fashion, server, tmp_path):
    server.script = [{"content": GOOD}]
    ex = extractor(fashion, server, cache_dir=tmp_path / "cache")
    first = ex.extract(IMAGE, "a")
    again = extractor(fashion, server, cache_dir=tmp_path / "cache").extract(IMAGE.copy(), "b")
    assert first.triples == again.triples and len(server.requests) == 1
    with pytest.raises(WorkdirMismatchError):
        VLMExtractor(fashion, server.url, "another-model", cache_dir=tmp_path / "cache")


def test_add_images_resumes(fashion, server):
    store = KGStore(fashion)
    server.script = [{"content": GOOD}, {"status": 401}]
    ex = extractor(fashion, server)
    images = [("a", IMAGE), ("b", IMAGE * 0.5)]
    with pytest.raises(ExtractionError):
        store.add_images(ex, images, progress=False)
    assert store.has("a") and not store.has("b")
    server.script = [{"content": '{"triples": []}'}]
    counts = store.add_images(ex, images, progress=False)
    assert store.has("b") and store.triples()["b"][1] == frozenset() and len(server.requests) == 3
    assert counts.triples == ()


def test_parse_answer_forms():
    assert parse_answer('{"triples": [{"relation": "a", "value": "b"}]} and some prose') == (
        [("a", "b")],
        True,
    )
    assert parse_answer('[["s", "a", "b"], ["a", "c"]]') == ([("a", "b"), ("a", "c")], True)
    assert parse_answer('{"a": ["b", "c"], "d": null}') == ([("a", "b"), ("a", "c"), ("d", "")], True)
    assert parse_answer("1. (s, a, b)\n2. (s, c, d e)") == ([("a", "b"), ("c", "d e")], True)
    assert parse_answer(TRUNCATED) == ([("hasColor", "red")], False)
    assert parse_answer("no triples here") == ([], False)


def test_both_extractors_follow_the_protocol_and_images_are_checked(fashion, server, tmp_path):
    from sourcetrace.kg import Extractor, SceneExtractor

    assert isinstance(SceneExtractor(fashion), Extractor)
    assert isinstance(extractor(fashion, server), Extractor)
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ExtractionError, match="not PNG, JPEG or WebP"):
        extractor(fashion, server).extract(tmp_path / "x.png")
    with pytest.raises(ExtractionError, match="does not exist"):
        extractor(fashion, server).extract(tmp_path / "missing.png")
    assert server.requests == []


def test_cli_extracts_scores_and_exports(fashion, server, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from sourcetrace.cli import app

    for name, shade in (("train/a.png", 0.2), ("train/b.png", 0.8), ("gen/g.png", 0.5)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), int(255 * shade), dtype=np.uint8)).save(tmp_path / name)
    server.script = [
        {"content": '{"hasColor": "red", "hasPattern": "striped"}'},
        {"content": '{"hasColor": "blue", "hasPattern": "striped"}'},
        {"content": '{"hasColor": "red", "hasPattern": "dotted", "hasMood": "calm"}'},
    ]
    run = CliRunner().invoke
    common = ["--store", str(tmp_path / "kg"), "--base-url", server.url, "--model", "m"]
    assert run(app, ["kg", "extract", str(tmp_path / "train"), *common]).exit_code == 0
    result = run(
        app,
        ["kg", "extract", str(tmp_path / "gen"), *common, "--role", "generated", "--prompt", "a red dress"],
    )
    assert result.exit_code == 0 and "unknown relations" in result.output
    result = run(
        app,
        [
            "kg",
            "score",
            "--store",
            str(tmp_path / "kg"),
            "--measure",
            "relation",
            "--out",
            str(tmp_path / "scores"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "a.png: hasColor red" in result.output
    from sourcetrace import Scores

    assert Scores.load(tmp_path / "scores").matrix.tolist() == [[1.0, 0.0]]
    out = tmp_path / "kg.jsonld"
    assert (
        run(app, ["kg", "export", "--store", str(tmp_path / "kg"), str(out), "--format", "json-ld"]).exit_code
        == 0
    )
    assert out.stat().st_size > 0
    assert "shared-triples" in run(app, ["kg", "queries"]).output
    assert "- hasPattern:" in run(app, ["kg", "prompt", "fashion"]).output
    bad = run(app, ["kg", "extract", str(tmp_path / "nothing"), *common])
    assert bad.exit_code == 2
    assert len(server.requests) == 3

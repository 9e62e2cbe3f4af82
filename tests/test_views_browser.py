"""The front end in headless Chromium (Playwright): the report, the served app, the compare view, the widget.

Skips when Playwright or a Chromium binary is missing. Chromium is the system package (Debian `chromium`),
never a Playwright download; set SOURCETRACE_CHROMIUM to use another binary. With
SOURCETRACE_SCREENSHOTS=DIR the tests save a PNG of each view in DIR (the ones in docs/ come from here).
"""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

from sourcetrace.views import Session, render_html, write_report  # noqa: E402

ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = os.environ.get("SOURCETRACE_SCREENSHOTS")


def chromium_path():
    names = (os.environ.get("SOURCETRACE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome")
    for candidate in names:
        if candidate and (path := shutil.which(candidate) or (Path(candidate).is_file() and candidate)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set SOURCETRACE_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=path, args=ARGS, timeout=30_000)
        except Exception as exc:  # a binary that does not start is an environment problem, not a failure
            pytest.skip(f"chromium at {path} does not start: {exc}")
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 720}, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("requestfailed", lambda r: pg.errors.append(f"request failed: {r.url}"))
    yield pg
    context.close()


def shot(page, name):
    if not SHOTS:
        return
    path = Path(SHOTS) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    try:  # a 128-colour palette keeps the committed PNGs small
        from PIL import Image

        Image.open(path).convert("RGB").quantize(128).save(path, optimize=True)
    except ImportError:
        pass


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from sourcetrace.demos.examples import shared_digits

    return shared_digits()


@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("transformers")
    from sourcetrace.demos.examples import shared_tiny_lm

    return shared_tiny_lm()


def rows(page, list_id):
    return [int(x) for x in page.locator(f"#{list_id} .st-row").evaluate_all(
        "els => els.map(e => e.dataset.index)")]


def test_classifier_report_loads_without_console_errors(page, digits, tmp_path):
    scores, train, queries = digits
    path = write_report(scores, tmp_path / "digits.html", train_items=train, query_items=queries,
                        title="digits: which training images made the MLP predict this?")
    page.goto(path.as_uri())
    page.wait_for_selector("#st-root[data-ready]")
    assert rows(page, "st-top") == [a.index for a in scores.top(0, 6)]
    assert rows(page, "st-bottom") == [a.index for a in scores.bottom(0, 6)]
    assert page.locator(".st-query canvas.st-thumb").count() == 1
    assert page.locator(".st-hist rect").count() == 20
    page.locator("#st-top .st-rowhead").first.click()  # expands the full example
    assert page.locator("#st-top .st-full canvas").count() == 1
    shot(page, "report-classifier")
    page.click("[data-q='2']")
    assert rows(page, "st-top") == [a.index for a in scores.top(2, 6)]
    page.click("[data-tab='groups']")
    assert page.locator(".st-groups").count() == 2  # label and source
    assert page.locator(".st-groups tbody tr").count() == 10 + 2
    shot(page, "groups")
    assert page.errors == []


def test_audio_player_starts_at_the_items_start(page, tmp_path):
    """An audio item's `start` (a similarity match's offset) is where its player begins, with a note."""
    import numpy as np
    import torch

    from sourcetrace import Scores

    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(8000 * 2) / 8000)).astype(np.float32)  # 2 s
    scores = Scores(torch.tensor([[0.9, 0.5]]), ["a", "b"], ["q"], method="similarity")
    train = [{"audio": tone, "sample_rate": 8000, "start": 1.25, "label": "a"},
             {"audio": tone, "sample_rate": 8000, "label": "b"}]
    query = [{"audio": tone, "sample_rate": 8000, "start": 0.5, "label": "q"}]
    path = write_report(scores, tmp_path / "start.html", train_items=train, query_items=query, k=2)
    page.goto(path.as_uri())
    page.wait_for_selector("#st-root[data-ready]")
    page.wait_for_function("[...document.querySelectorAll('audio')].every(a => a.readyState >= 1)")
    times = page.locator("#st-top .st-row audio").evaluate_all("els => els.map(a => a.currentTime)")
    assert times == pytest.approx([1.25, 0.0], abs=0.01)  # "a" (start 1.25 s) scores above "b" (none)
    assert page.locator(".st-query audio").evaluate("a => a.currentTime") == pytest.approx(0.5, abs=0.01)
    assert page.locator(".st-query .st-start").inner_text() == "starts at 0.5 s"
    played = page.locator(".st-query audio").evaluate("""a => new Promise(ok => {
        a.muted = true;
        a.addEventListener('timeupdate', () => { a.pause(); ok(a.currentTime); }, { once: true });
        a.play(); })""")
    assert 0.5 <= played < 1.5  # playback goes on from the start, not from 0 s
    assert page.errors == []


def test_table_and_audio_report_plays_clips_offline(page, tmp_path):
    """Table rows and audio clips: the query's row and player, a summary and a player for each example."""
    from sourcetrace.demos.examples import calls_example

    scores, train, queries = calls_example()
    path = write_report(scores, tmp_path / "calls.html", train_items=train, query_items=queries,
                        title="bird calls: which recordings made the classifier say this?")
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "data:"))
               else route.continue_())  # offline: any request to a network fails the test below
    page.goto(path.as_uri())
    page.wait_for_selector("#st-root[data-ready]")
    q = queries[0]["row"]
    cells = page.locator(".st-query .st-kv tr").evaluate_all(
        "trs => trs.map(tr => [tr.cells[0].textContent, tr.cells[1].textContent])")
    assert cells == [[k, str(v)] for k, v in q.items()]
    top, bottom = rows(page, "st-top"), rows(page, "st-bottom")
    assert top == [a.index for a in scores.top(0, 6)] and bottom == [a.index for a in scores.bottom(0, 6)]
    first = page.locator("#st-top .st-row").first
    summary = first.locator(".st-rowsum").inner_text()
    want = train[top[0]]["row"]
    assert all(k in summary and str(want[k]) in summary for k in list(want)[:3])
    assert "recorder" not in summary and "+3" in summary  # the first columns only
    # one player for the query and one for each listed example, each holding a WAV that loads
    players = page.locator("audio.st-audio")
    assert page.locator(".st-query audio").count() == 1 and page.locator(".st-row audio").count() == 12
    durations = players.evaluate_all("""els => Promise.all(els.map(a => a.readyState >= 1 ? a.duration :
        new Promise((ok, bad) => { a.addEventListener('loadedmetadata', () => ok(a.duration));
                                   a.addEventListener('error', () => bad(new Error('audio error'))); })))""")
    assert len(durations) == 13 and all(abs(d - 0.4) < 0.01 for d in durations)
    assert all(src.startswith("data:audio/wav;base64,") for src in players.evaluate_all(
        "els => els.map(a => a.getAttribute('src'))"))
    page.evaluate("document.querySelector('.st-query audio').kept = true")
    first.locator(".st-rowhead").click()  # expands to the full row
    assert page.evaluate("document.querySelector('.st-query audio').kept")  # a playing clip survives redraws
    full = first.locator(".st-full .st-kv tr")
    assert full.count() == len(want) and "recorder" in first.locator(".st-full").inner_text()
    page.wait_for_function("[...document.querySelectorAll('audio')].every(a => a.readyState >= 1)")
    shot(page, "report-table-audio")
    page.click("[data-q='1']")
    assert rows(page, "st-top") == [a.index for a in scores.top(1, 6)]
    assert page.locator(".st-query .st-kv td").first.inner_text() == str(queries[1]["row"]["site"])
    assert page.errors == []


def test_llm_report_shows_tokens_keywords_and_compare(page, lm, tmp_path):
    backend, train, queries = lm
    items = copy.deepcopy(queries)
    edit = dict(items[0], tokens=items[0]["tokens"][:-1] + backend.tokenize(" and jam ."))
    edit["selection"] = [len(edit["tokens"]) - 3, len(edit["tokens"]) - 2]
    items[0]["compare_to"] = 2
    items[1]["spans"] = [{"start": 0, "end": 2, "count": 3, "text": " ".join(items[1]["tokens"][:2]),
                          "docs": [{"doc_id": "space-wiki-40", "before": "the probe ", "match": "lands on",
                                    "after": " the moon"}]}]
    import torch

    from sourcetrace import Scores
    rows_ = [backend.attribute(q["tokens"], q["selection"], q["prompt"]).matrix for q in queries]
    rows_.append(backend.attribute(edit["tokens"], edit["selection"], edit["prompt"]).matrix)
    scores = Scores(torch.cat(rows_), backend.train_ids, ["chef", "astronaut", "chef-edit"], "grad-dot")
    path = write_report(scores, tmp_path / "lm.html", train_items=train, query_items=items + [edit])
    page.goto(path.as_uri())
    page.wait_for_selector("#st-root[data-ready]")
    assert page.locator(".st-gen .st-tok").count() == len(queries[0]["tokens"])
    assert page.locator(".st-gen .st-tok.st-sel").count() == len(queries[0]["selection"])
    assert page.locator("#st-attribute").count() == 0  # a static report cannot attribute new selections
    assert page.locator(".st-keywords .st-chip").count() > 0
    page.click("[data-q='1']")  # verbatim spans from the corpus tracer, overlaid on the same tokens
    assert page.locator(".st-gen .st-tok.st-span").count() == 2
    page.click(".st-spans summary")
    assert "space-wiki-40" in page.locator(".st-spans").inner_text()
    page.click("[data-q='0']")
    page.click("[data-tab='compare']")
    assert page.locator("#st-side-model .st-tok.st-del").count() == 0
    assert page.locator("#st-side-user .st-tok.st-ins").count() == 2
    assert rows(page, "st-a-top") and rows(page, "st-b-top")
    assert page.errors == []


def test_served_app_attributes_selected_tokens(page, lm, tmp_path):
    backend, train, queries = lm
    pytest.importorskip("fastapi")
    from sourcetrace.views.server import create_app, serve_in_thread

    view = Session(None, train, copy.deepcopy(queries), title="tiny GPT-2", backend=backend)
    with serve_in_thread(create_app(view, root=tmp_path)) as url:
        page.goto(url + "/")
        page.wait_for_selector("#st-root[data-ready]")
        before = rows(page, "st-top")
        page.click("#st-clear")
        tokens = queries[0]["tokens"]
        pick = [i for i, t in enumerate(tokens) if t.strip().isalpha()][-1:]  # the last word generated
        for i in pick:
            page.click(f".st-gen .st-tok[data-i='{i}']")
        assert page.locator(".st-gen .st-tok.st-sel").count() == len(pick)
        with page.expect_response(lambda r: r.url.endswith("/api/queries/0/attribute")) as resp:
            page.click("#st-attribute")
        served = resp.value.json()["queries"][0]["result"]
        page.wait_for_function(f"document.querySelectorAll('.st-gen .st-tok.st-sel').length === {len(pick)}")
        want = backend.attribute(tokens, pick, queries[0]["prompt"]).matrix[0]
        after = rows(page, "st-top")
        assert after == [x["index"] for x in served["top"]]
        assert after[0] == int(want.argmax()) and after != before
        assert rows(page, "st-bottom")[0] == int(want.argmin())
        page.locator("#st-top .st-rowhead").first.click()  # full text with its influential tokens shaded
        assert page.locator("#st-top .st-full .st-tok[style*='background']").count() >= 1
        shot(page, "app-llm")
        assert page.errors == []


def test_compare_view_renders_both_texts_and_lists(page, lm, tmp_path):
    backend, train, queries = lm
    pytest.importorskip("fastapi")
    from sourcetrace.views.server import create_app, serve_in_thread

    view = Session(None, train, copy.deepcopy(queries), title="tiny GPT-2", backend=backend)
    with serve_in_thread(create_app(view, root=tmp_path)) as url:
        page.goto(url + "/")
        page.wait_for_selector("#st-root[data-ready]")
        page.click("[data-tab='compare']")
        user = " ".join(queries[0]["tokens"][:2] + ["sour", "soup"] + queries[0]["tokens"][-1:])
        page.fill("#st-user-text", user)
        page.click("#st-compare")
        page.wait_for_selector("#st-side-user .st-tok")
        model_side, user_side = page.locator("#st-side-model"), page.locator("#st-side-user")
        assert model_side.locator(".st-tok").count() == len(queries[0]["tokens"])
        assert user_side.locator(".st-tok").count() == len(user.split())
        assert model_side.locator(".st-del").count() >= 1 and user_side.locator(".st-ins").count() == 2
        for side in ("st-a-", "st-b-"):
            assert len(rows(page, side + "top")) == 6 and len(rows(page, side + "bottom")) == 6
        shot(page, "compare")
        assert page.errors == []


def test_two_browsers_compare_without_seeing_each_other(browser, lm, tmp_path):
    """Two browser contexts (two users) on one served view: one user's compare stays in their page."""
    backend, train, queries = lm
    pytest.importorskip("fastapi")
    from sourcetrace.views.server import create_app, serve_in_thread

    view = Session(None, train, copy.deepcopy(queries), title="tiny GPT-2", backend=backend)
    contexts = [browser.new_context(viewport={"width": 1000, "height": 720}) for _ in range(2)]
    try:
        with serve_in_thread(create_app(view, root=tmp_path)) as url:
            first, second = (c.new_page() for c in contexts)
            for pg in (first, second):
                pg.set_default_timeout(20_000)
                pg.goto(url + "/")
                pg.wait_for_selector("#st-root[data-ready]")
            n_queries = second.locator("[data-q]").count()
            first.click("[data-tab='compare']")
            user = "".join(queries[0]["tokens"][:2]) + " sour soup" + queries[0]["tokens"][-1]
            first.fill("#st-user-text", user)
            first.click("#st-compare")
            first.wait_for_selector("#st-side-user .st-tok")
            assert first.locator("[data-q]").count() == n_queries + 1  # the edit joins the first page
            second.reload()
            second.wait_for_selector("#st-root[data-ready]")
            assert second.locator("[data-q]").count() == n_queries  # ...and not the second's
            second.click("[data-tab='compare']")
            assert second.locator("#st-side-user .st-tok").count() == 0
            first.reload()
            first.wait_for_selector("#st-root[data-ready]")
            assert first.locator("[data-q]").count() == n_queries + 1  # the first keeps it across reloads
    finally:
        for c in contexts:
            c.close()


WIDGET_PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>%s</style></head>
<body><div id="w"></div><script type="module">
const esm = %s;
const mod = await import(URL.createObjectURL(new Blob([esm], {type: "text/javascript"})));
let data = %s;
const handlers = {};
window.sent = [];
const model = {   // the part of anywidget's model a widget uses; messages go to the Python kernel
  get: (k) => data,
  on: (ev, f) => { (handlers[ev] = handlers[ev] || []).push(f); },
  off: () => {},
  send: async (msg) => {
    window.sent.push(msg);
    const reply = JSON.parse(await window.kernel(JSON.stringify(msg)));
    (handlers["msg:custom"] || []).forEach((f) => f(reply));
  },
};
mod.default.render({ model, el: document.getElementById("w") });
</script></body></html>"""


def test_widget_front_end_renders_and_sends_selection(page, lm):
    pytest.importorskip("anywidget")
    from sourcetrace.views.page import script_json
    from sourcetrace.views.widget import AttributionWidget

    backend, train, queries = lm
    widget = AttributionWidget(None, train_items=train, query_items=copy.deepcopy(queries), backend=backend)
    received = []

    def kernel(text):  # what the kernel does with a message from the front end
        received.append(json.loads(text))
        return json.dumps(widget.handle(received[-1]))

    page.expose_function("kernel", kernel)
    page.set_content(WIDGET_PAGE % (AttributionWidget._css, script_json(AttributionWidget._esm),
                                    script_json(widget.data)))
    page.wait_for_selector("#w[data-ready] .st-gen .st-tok")
    assert page.locator("#st-top .st-row").count() == 6
    page.click("#st-clear")
    page.click(".st-gen .st-tok[data-i='1']")
    page.click("#st-attribute")
    page.wait_for_function("window.sent.length === 1")
    page.wait_for_function("document.querySelectorAll('.st-gen .st-tok.st-sel').length === 1")
    sent = page.evaluate("window.sent")
    assert sent[0]["type"] == "select" and sent[0]["selection"] == [1] and sent[0]["query"] == 0
    assert received[0]["selection"] == [1]
    want = backend.attribute(queries[0]["tokens"], [1], queries[0]["prompt"]).matrix[0]
    assert rows(page, "st-top")[0] == int(want.argmax())
    assert widget.data["queries"][0]["selection"] == [1]  # the kernel's side changed too
    shot(page, "widget")
    assert page.errors == []


def test_render_html_works_from_a_page_without_api(page):
    """The smallest payload draws (no items at all), and bad hooks show an error instead of crashing."""
    import torch

    from sourcetrace import Scores
    from sourcetrace.views import report_payload

    p = report_payload(Scores(torch.tensor([[1.0, -1.0]]), ["a", "b"], ["q"], "x"))
    page.set_content(render_html(p))
    page.wait_for_selector("#st-root[data-ready]")
    assert rows(page, "st-top") == [0, 1] and page.errors == []
    assert page.locator("#st-removal").count() == 0  # these scores are rankings, not effect sizes
    p = report_payload(Scores(torch.tensor([[0.5, -0.25]]), ["a", "b"], ["q"], "replay",
                              metadata={"removal_scale": 1.0}), k=1)
    page.set_content(render_html(p))
    page.wait_for_selector("#st-root[data-ready]")
    text = page.locator("#st-removal").inner_text()
    assert "proponents (1)" in text and "-0.5" in text and "0.25" in text and page.errors == []

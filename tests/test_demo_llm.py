"""`sourcetrace demo llm`: gradient and verbatim evidence for each output, on one page that serves."""

import json

import pytest

from sourcetrace.scores import Scores

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from sourcetrace.demos.llm import planted_documents, run

    out = tmp_path_factory.mktemp("demo-llm")
    report = run(out)
    return out, report, planted_documents(n_docs=120, sentences=2)[1]


def test_both_kinds_of_evidence_find_the_planted_documents(demo):
    out, report, facts = demo
    assert report.is_file() and (out / "view.json").is_file() and (out / "backend").is_dir()
    view = json.loads((out / "view.json").read_text())
    scores = Scores.load(out / "scores")
    assert scores.query_ids == [f["id"] for f in facts]
    for row, (fact, item) in enumerate(zip(facts, view["query_items"], strict=True)):
        assert "".join(item["tokens"]).startswith(fact["prompt"])
        # gradient evidence: the top document holds the planted sentence
        assert scores.top(row=row, k=1)[0].train_id in fact["documents"]
        # verbatim evidence: a span over the output, traced to every document that holds the sentence
        held = {int(d["doc_id"]) for s in item["spans"] for d in s["docs"]}
        assert set(fact["documents"]) <= held, (fact["id"], held)


def test_demo_view_serves_and_loads_in_chromium(demo):
    pytest.importorskip("fastapi")
    from sourcetrace.views import load_view
    from sourcetrace.views.server import create_app, serve_in_thread
    from test_views_browser import chromium_path, sync_api

    out, report, _ = demo
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium binary")
    session = load_view(out)
    with serve_in_thread(create_app(session, root=out)) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--headless"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        for where in (url + "/", report.as_uri()):
            page.goto(where)
            page.wait_for_selector("#st-root[data-ready]")
            assert page.locator(".st-gen .st-tok.st-span").count() > 0  # verbatim spans on the tokens
            assert page.locator("#st-top .st-row").count() > 0  # gradient proponents beside them
        browser.close()
    assert errors == []

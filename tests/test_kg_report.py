"""The kg demo's report in headless Chromium: shared triples beside the images, no console errors.

Skips without Playwright, rdflib/pyoxigraph or a Chromium binary (Debian's, never a downloaded one). With
SOURCETRACE_SCREENSHOTS=DIR it saves DIR/report-kg.png (docs/report-kg.png comes from here).
"""

import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("rdflib")
pytest.importorskip("pyoxigraph")

ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium():
    for name in (os.environ.get("SOURCETRACE_CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser"):
        if name and (path := shutil.which(name) or (Path(name).is_file() and name)):
            return path
    return None


@pytest.mark.slow
def test_kg_demo_report_shows_shared_triples_in_chromium(tmp_path):
    from sourcetrace.demos.kg import run

    path = chromium()
    if path is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set SOURCETRACE_CHROMIUM)")
    report = run(tmp_path)
    # the exported graph loads back and holds every training image and generation
    import rdflib

    graph = rdflib.Graph().parse(tmp_path / "kg.ttl", format="turtle")
    roles = [str(o) for o in graph.objects(None, rdflib.URIRef("urn:sourcetrace:kg:role"))]
    assert roles.count("train") == 384 and roles.count("generated") == 3 * 4
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=path, args=ARGS, timeout=30_000)
        except Exception as exc:  # a binary that does not start is the environment's problem
            pytest.skip(f"chromium at {path} does not start: {exc}")
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route(
            "**/*",
            lambda route: (
                route.abort() if not route.request.url.startswith(("file:", "data:")) else route.continue_()
            ),
        )
        page.goto(report.as_uri())
        page.wait_for_selector("#st-root[data-ready]")
        assert page.locator(".st-query canvas.st-thumb").count() == 1
        first = page.locator("#st-top .st-row").first
        assert "shares with" in first.inner_text() and "has" in first.inner_text()
        first.locator(".st-rowhead").click()
        full = page.locator("#st-top .st-full .st-text").first.inner_text()
        assert "generations)" in full
        if os.environ.get("SOURCETRACE_SCREENSHOTS"):
            out = Path(os.environ["SOURCETRACE_SCREENSHOTS"]) / "report-kg.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            from PIL import Image

            Image.open(out).convert("RGB").quantize(128).save(out, optimize=True)
        browser.close()
    assert errors == []

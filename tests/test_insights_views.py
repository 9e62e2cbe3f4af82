"""The data-health page: its payload from real insights results, and the page in headless Chromium.

The browser test skips without Playwright or a Chromium binary (/usr/bin/chromium by default; set
SOURCETRACE_CHROMIUM for another). With SOURCETRACE_SCREENSHOTS=DIR it saves DIR/health.png (docs/health.png
comes from here).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sourcetrace as st
from sourcetrace import insights as ins
from sourcetrace.errors import EmptyDataError
from sourcetrace.insights.planted import plant, tabular_data
from sourcetrace.views import health_payload, write_health


@pytest.fixture(scope="module")
def results():
    x, y, sub = tabular_data(n=800, seed=3)
    p = plant(x, y, sub, name="small", n_train=350, n_query=150, n_pool=15, n_poison=20, n_slice=25, seed=3)
    s = p.setting
    model = s.train()
    margins = s.margins(model)
    attr = st.Attributor(
        model, st.ClassificationTask(), "explicit", damping=s.wd, store_dtype="float64", progress=False
    )
    scores = attr.fit(s.examples(s.x_train, s.y_train)).score(s.examples(s.x_query, s.y_query))
    in_slice = s.query_meta["subclass"] == p.slice_subclass
    behaviour = ins.Behaviour("slice errors", tuple(np.flatnonzero(in_slice)), "margin")
    ranking = ins.responsible_groups(scores, s.train_meta["source"], behaviour, margins, scale=1 / s.n_train)
    susp = ins.suspicion(
        {"self-influence": attr.self_influence(), "heldout": ins.heldout_harm(scores)}, list(range(s.n_train))
    )
    sup = ins.support(scores, s.x_query, s.x_train)
    regions = ins.regions(ins.flag(sup.distance, 0.1), s.x_query, s.x_train, s.query_meta["subclass"])
    runs = []  # bootstrap resamples of the training rows, each retrained and attributed
    for b in range(2):
        counts = np.random.default_rng(b).multinomial(s.n_train, np.full(s.n_train, 1 / s.n_train))
        resampled = s.train(weights=counts.astype(float))
        a = st.Attributor(
            resampled,
            st.ClassificationTask(),
            "explicit",
            damping=s.wd,
            store_dtype="float64",
            progress=False,
        )
        runs.append(a.fit(s.examples(s.x_train, s.y_train)).score(s.examples(s.x_query, s.y_query)))
    rel = ins.reliability(runs, k=5)
    pool = ins.pool_scores(s, model)
    top = ranking.table(1)[0]["group"]
    effects = [
        ins.whatif(
            ins.Action("remove", tuple(np.flatnonzero(s.train_meta["source"] == top).tolist())),
            behaviour,
            pool,
            margins,
            setting=s,
            verify=True,
            n_bootstrap=200,
        ),
        ins.whatif(ins.Action("acquire", (0, 1, 2)), behaviour, pool, margins, n_bootstrap=200),
    ]
    predicted = model(torch.from_numpy(s.x_train)).argmax(1).tolist()
    payload = health_payload(
        title="data health: planted tabular",
        subtitle="softmax regression",
        ranking=ranking,
        suspicion=susp,
        labels=s.y_train,
        predicted=predicted,
        flipped=p.flipped.tolist(),
        regions=regions,
        reliability=rel,
        effects=effects,
    )
    return payload, ranking, susp, rel, effects


def test_payload_holds_each_section_as_computed(results, tmp_path):
    payload, ranking, susp, rel, effects = results
    assert payload["groups"]["rows"][0]["group"] == ranking.table(1)[0]["group"] == "batch-P"
    combined = susp.matrix[susp.query_ids.index("combined")].numpy()
    assert [r["row"] for r in payload["suspects"]["rows"]] == list(np.argsort(-combined, kind="stable")[:12])
    assert payload["reliability"]["badges"] == [rel.badge(q) for q in range(len(rel.stability))]
    assert payload["actions"][0]["actual_change"] == pytest.approx(effects[0].actual_change)
    assert payload["actions"][1]["actual_change"] is None
    path = write_health(tmp_path / "h.html", payload)
    text = path.read_text()
    data = text.split('<script id="health-data" type="application/json">')[1].split("</script>")[0]
    assert json.loads(data)["title"] == payload["title"]
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained
    with pytest.raises(EmptyDataError):
        write_health(tmp_path / "x.html", {"title": "empty"})


def test_title_is_escaped_and_data_cannot_close_the_script(tmp_path):
    payload = {
        "title": "<b>x</b> __DATA__",
        "actions": [],
        "regions": [{"size": 1, "describe": "</script><i>", "nearest_train": []}],
    }
    text = write_health(tmp_path / "t.html", payload).read_text()
    assert "<title>&lt;b&gt;x&lt;/b&gt; __DATA__</title>" in text and "</script><i>" not in text


def chromium_path():
    for candidate in (os.environ.get("SOURCETRACE_CHROMIUM"), "/usr/bin/chromium", "chromium"):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    return None


def test_health_page_in_chromium_without_console_errors(results, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set SOURCETRACE_CHROMIUM)")
    payload, ranking, susp, rel, effects = results
    page_file = write_health(tmp_path / "health.html", payload)
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(
                executable_path=path, args=["--no-sandbox", "--headless", "--disable-gpu"], timeout=30_000
            )
        except Exception as exc:
            pytest.skip(f"chromium at {path} does not start: {exc}")
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route(
            "**/*", lambda r: r.abort() if not r.request.url.startswith(("file:", "data:")) else r.continue_()
        )
        page.goto(page_file.as_uri())
        page.wait_for_selector("#health-root[data-ready]")
        assert page.locator("#h-groups tbody tr").count() == len(payload["groups"]["rows"])
        assert page.locator("#h-groups tbody tr").first.locator("td").first.inner_text() == "batch-P"
        page.click("[data-tab='mislabels']")
        assert page.locator("#h-mislabels tbody tr").count() == 12
        page.click("[data-tab='reliability']")
        unstable = int(rel.unstable.sum())
        assert page.locator("#h-badges .badge.unstable").count() == unstable
        assert (page.locator("#h-warning").count() == 1) == (unstable > 0)
        page.click("[data-tab='undersampled']")
        assert page.locator("#h-undersampled .region").count() == len(payload["regions"])
        page.click("[data-tab='whatif']")
        assert page.locator("#h-whatif tbody tr").count() == 2
        assert page.locator("#h-chart .h-point").count() == 3  # predicted twice, retrained once
        assert "not verified" in page.locator("#h-whatif").inner_text()
        shots = os.environ.get("SOURCETRACE_SCREENSHOTS")
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(shots) / "health.png"), full_page=True)
        browser.close()
    assert errors == []

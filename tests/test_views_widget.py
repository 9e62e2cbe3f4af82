"""The notebook widget's kernel side: messages from the front end are attributed and answered."""

import copy

import pytest

pytest.importorskip("anywidget")
pytest.importorskip("transformers")

from sourcetrace.views.widget import AttributionWidget, widget_esm  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    from sourcetrace.demos.examples import shared_tiny_lm

    return shared_tiny_lm()


@pytest.fixture
def widget(lm):
    backend, train, queries = lm
    return AttributionWidget(None, train_items=train, query_items=copy.deepcopy(queries), backend=backend)


def test_module_is_the_shared_front_end_plus_the_adaptor():
    esm = widget_esm()
    assert "var SourcetraceView" in esm and "export default" in esm and "model.send" in esm
    assert "import " not in esm.split("export default")[0]  # nothing loaded from elsewhere
    assert AttributionWidget._css.strip()


def test_select_message_attributes_and_updates_the_synced_data(widget, lm):
    backend, _, queries = lm
    sent = []
    widget.send = sent.append  # what goes back to the front end
    before = widget.data
    widget._on_message(widget, {"type": "select", "query": 1, "selection": [2], "request": 7}, [])
    reply = sent[-1]
    assert reply["type"] == "update" and reply["request"] == 7
    q = reply["update"]["queries"][0]
    want = backend.attribute(queries[1]["tokens"], [2], queries[1]["prompt"]).matrix[0]
    assert q["index"] == 1 and q["selection"] == [2]
    assert q["result"]["top"][0]["index"] == int(want.argmax())
    assert widget.data is not before and widget.data["queries"][1]["selection"] == [2]


def test_compare_message_adds_the_users_text(widget, lm):
    _, _, queries = lm
    text = " ".join(queries[0]["tokens"][:-1] + ["and", "jam", "."])
    reply = widget.handle({"type": "compare", "query": 0, "text": text, "request": 1})
    assert reply["type"] == "update"
    assert len(widget.data["queries"]) == 3 and widget.data["queries"][0]["compare"]["other"] == 2


@pytest.mark.parametrize("message, error", [
    ({"type": "select", "query": 5, "selection": [0]}, "no query"),
    ({"type": "select", "query": 0, "selection": []}, "at least one"),
    ({"type": "select", "query": 0, "selection": [999]}, "at least one"),
    ({"type": "dance", "query": 0}, "unknown message"),
])
def test_bad_messages_get_an_error_reply_not_an_exception(widget, message, error):
    reply = widget.handle(message)
    assert reply["type"] == "error" and error in reply["message"]

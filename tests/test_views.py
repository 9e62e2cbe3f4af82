"""Views without a browser: the payload the front end draws, the report file, text helpers, the LM backend."""

import copy
import json
import math
import re

import numpy as np
import pytest
import torch

from sourcetrace import Scores
from sourcetrace.errors import ShapeError
from sourcetrace.views import report_payload, write_report
from sourcetrace.views.media import MAX_AUDIO_SECONDS, audio_json, row_json
from sourcetrace.views.page import render_html, script_json
from sourcetrace.views.payload import image_json
from sourcetrace.views.text import Keywords, joiner, word_diff, words


def small_scores(seed=0, n_query=3, n_train=40):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n_query, n_train, generator=g, dtype=torch.float64)
    return Scores(m, [f"t{i}" for i in range(n_train)], [f"q{i}" for i in range(n_query)], "grad-dot")


def test_payload_lists_match_scores_and_histogram_counts_every_score():
    s = small_scores()
    labels = [str(i % 4) for i in range(40)]
    train = [{"text": f"example number {i} about topic{i % 4}", "label": labels[i], "source": "ab"[i % 2]}
             for i in range(40)]
    p = report_payload(s, train_items=train, k=5)
    assert p["kind"] == "classifier" and len(p["queries"]) == 3
    for r, q in enumerate(p["queries"]):
        order = torch.argsort(s.matrix[r], descending=True)
        assert [x["index"] for x in q["result"]["top"]] == order[:5].tolist()
        assert [x["index"] for x in q["result"]["bottom"]] == order.flip(0)[:5].tolist()
        assert q["result"]["top"][0]["score"] == pytest.approx(float(s.matrix[r].max()), rel=1e-5)
        hist = q["result"]["hist"]
        assert sum(hist["counts"]) == 40
        assert hist["edges"][0] == pytest.approx(float(s.matrix[r].min()), rel=1e-5)
        for x in q["result"]["top"] + q["result"]["bottom"]:
            assert str(x["index"]) in p["train"]  # every shown example travels with the payload
    assert len(p["train"]) < 40  # and only those
    # group mass: brute-force sums over the members of each group
    by_label = next(g for g in p["groups"] if g["name"] == "label")
    assert by_label["names"] == ["0", "1", "2", "3"] and by_label["sizes"] == [10, 10, 10, 10]
    for r in range(3):
        for j, name in enumerate(by_label["names"]):
            want = sum(float(s.matrix[r, i]) for i in range(40) if labels[i] == name)
            assert by_label["query"][r][j] == pytest.approx(want, rel=1e-5, abs=1e-9)
    want = np.mean([by_label["query"][r][0] for r in range(3)])
    assert by_label["mean"][0] == pytest.approx(want, rel=1e-5)
    assert {g["name"] for g in p["groups"]} == {"label", "source"}


def test_payload_predicts_removing_the_shown_examples_for_effect_sized_scores():
    s = small_scores()
    assert "removal" not in report_payload(s, k=5)["queries"][0]["result"]  # rankings only
    s.metadata["removal_scale"] = 1.0  # as replay's scores carry
    for r, q in enumerate(report_payload(s, k=5)["queries"]):
        res = q["result"]
        ids = [s.train_ids[x["index"]] for x in res["top"]]
        assert res["removal"]["k"] == 5
        assert res["removal"]["top"] == pytest.approx(float(s.removal_effect(ids)[r]), rel=1e-5)
        assert res["removal"]["top"] < 0 < res["removal"]["bottom"]  # without proponents the output drops


def test_payload_with_top_k_scores_and_explicit_groups():
    s = small_scores()
    top = Scores(None, s.train_ids, s.query_ids, "grad-dot", top_values=s.matrix.topk(3).values,
                 top_indices=s.matrix.topk(3).indices, bottom_values=s.matrix.topk(3, largest=False).values,
                 bottom_indices=s.matrix.topk(3, largest=False).indices)
    p = report_payload(top, k=10)
    assert len(p["queries"][0]["result"]["top"]) == 3 and p["queries"][0]["result"]["partial"]
    assert p["groups"] == []  # group mass needs every score
    p = report_payload(s, groups=["x" if i < 10 else "y" for i in range(40)])
    assert p["groups"][0]["name"] == "group" and p["groups"][0]["sizes"] == [10, 30]


def test_items_must_align_with_ids():
    s = small_scores()
    with pytest.raises(ShapeError, match="40 train ids"):
        report_payload(s, train_items=[{}] * 39)


def test_image_json_scales_digits_and_unit_images():
    digits = np.arange(64).reshape(8, 8) % 17  # 0..16, like scikit-learn's digits
    j = image_json(digits)
    assert (j["w"], j["h"]) == (8, 8) and max(j["data"]) == 255 and j["data"][1] == round(1 / 16 * 255)
    assert image_json(torch.full((2, 3), 0.5))["data"] == [128] * 6
    assert image_json(np.ones(16))["w"] == 4
    with pytest.raises(ShapeError):
        image_json(np.ones(15))


def test_image_compare_gives_the_l2_distance_and_the_difference_on_one_scale():
    rng = np.random.default_rng(0)
    a, b = rng.random((8, 8)), rng.random((1, 8, 8)) * 0.5
    s = small_scores(n_query=2, n_train=40)
    queries = [{"image": a, "compare_to": "q1"}, {"image": b}]
    c = report_payload(s, query_items=queries)["queries"][0]["compare"]["image"]
    assert c["distance"] == pytest.approx(float(np.sqrt(((a - b[0]) ** 2).sum())), rel=1e-5)
    diff = np.abs(a - b[0])
    assert c["diff_max"] == pytest.approx(diff.max(), rel=1e-5)
    assert c["diff"]["data"] == list(np.round(diff.reshape(-1) / diff.max() * 255).astype(int))
    same = report_payload(s, query_items=[{"image": a, "compare_to": "q1"}, {"image": a}])
    assert same["queries"][0]["compare"]["image"]["distance"] == 0.0
    with pytest.raises(ShapeError, match="one shape"):
        report_payload(s, query_items=[{"image": a, "compare_to": "q1"}, {"image": np.ones((4, 4))}])


def test_distance_scores_are_shown_as_magnitudes_without_opponents():
    s = small_scores()
    s = Scores(s.matrix.abs(), s.train_ids, s.query_ids, "ensemble-counterfactual")
    signed = report_payload(s, k=4)
    assert not signed["magnitude"] and len(signed["queries"][0]["result"]["bottom"]) == 4
    s.metadata["distance"] = "l2"
    p = report_payload(s, k=4)
    assert p["magnitude"] and p["distance"] == "l2"
    for r, q in enumerate(p["queries"]):
        assert q["result"]["bottom"] == []
        assert [x["index"] for x in q["result"]["top"]] == s.matrix[r].argsort(descending=True)[:4].tolist()


def decode_wav_uri(uri):
    """The samples (in [-1, 1]) and sample rate of a `data:audio/wav;base64,` URI, read back by `wave`."""
    import base64
    import io
    import wave

    assert uri.startswith("data:audio/wav;base64,")
    with wave.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)  # mono 16-bit PCM
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return pcm / 32767, w.getframerate()


def wav_bytes(samples, rate):
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(np.asarray(samples) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def test_rows_and_audio_in_payload(tmp_path):
    s = small_scores(n_query=2, n_train=10)
    rng = np.random.default_rng(0)
    clip = rng.uniform(-1, 1, 1600)  # 0.2 s at 8 kHz
    columns = ["site", "hour", "temp", "ok", "missing"]
    train = [{"row": [f"s{i}", i, 0.5 * i, i % 2 == 0, None], "audio": clip * (i + 1) / 10,
              "sample_rate": 8000, "label": str(i % 2)} for i in range(10)]
    wav = wav_bytes(clip[:800], 16000)
    (tmp_path / "q.wav").write_bytes(wav)
    queries = [{"row": {"site": "s9", "hour": np.int64(7), "temp": float("nan")},
                "audio": tmp_path / "q.wav"},
               {"row": [1, 2, 3, 4, 5], "audio": torch.tensor(clip, dtype=torch.float32),
                "sample_rate": 8000}]
    p = report_payload(s, train_items=train, query_items=queries, columns=columns, k=2)
    q0, q1 = p["queries"]
    assert q0["row"] == {"columns": ["site", "hour", "temp"], "values": ["s9", 7, "nan"]}  # order kept
    assert q1["row"]["columns"] == columns and q1["row"]["values"] == [1, 2, 3, 4, 5]
    assert q0["audio"]["src"].startswith("data:audio/wav;base64,") and q0["audio"]["seconds"] == 0.05
    got, rate = decode_wav_uri(q0["audio"]["src"])  # a WAV file is embedded as it is
    assert rate == 16000 and np.abs(got - clip[:800]).max() <= 1 / 32767
    got, rate = decode_wav_uri(q1["audio"]["src"])
    assert rate == 8000 and got.shape == (1600,) and q1["audio"]["seconds"] == 0.2
    assert np.abs(got - clip).max() <= 0.5 / 32767 + 1e-7  # float32 input, 16-bit quantization
    assert p["train"]  # every shown training example has its row and its clip
    for key, t in p["train"].items():
        i = int(key)
        assert t["row"]["values"] == [f"s{i}", i, 0.5 * i, i % 2 == 0, None]
        got, _ = decode_wav_uri(t["audio"]["src"])
        assert np.abs(got - clip * (i + 1) / 10).max() <= 0.5 / 32767 + 1e-12
    html = render_html(p)
    assert "media-src 'self' data:" in html  # the page's CSP lets the inlined clips play
    assert json.loads(re.search(r'id="st-data">(.*?)</script>', html, re.S).group(1)) == p


def test_audio_json_cuts_long_clips_and_explains_bad_input(tmp_path):
    rate = 1000
    long = np.sin(np.arange(int(rate * (MAX_AUDIO_SECONDS + 5))) / 7)
    with pytest.warns(UserWarning, match="longer than the 30 s"):
        a = audio_json(long, rate)
    assert a["seconds"] == MAX_AUDIO_SECONDS and a["truncated"] == MAX_AUDIO_SECONDS + 5
    assert len(decode_wav_uri(a["src"])[0]) == rate * MAX_AUDIO_SECONDS
    with pytest.warns(UserWarning, match="longer than"):  # a WAV file is cut the same way
        b = audio_json(wav_bytes(long, rate))
    assert b["truncated"] == MAX_AUDIO_SECONDS + 5 and decode_wav_uri(b["src"])[0].shape == (rate * 30,)
    assert audio_json(a["src"])["src"] == a["src"]  # a data URI (how save_view stores bytes) round-trips
    assert audio_json({"array": long[:10], "sampling_rate": rate})["seconds"] == 0.01  # Hugging Face style
    with pytest.raises(ShapeError, match="sample_rate"):
        audio_json(long[:10])
    with pytest.raises(ShapeError, match="1-D"):
        audio_json(np.zeros((2, 10)), rate)
    with pytest.raises(ShapeError, match="not a PCM WAV"):
        audio_json(b"ID3 an mp3 file")
    with pytest.raises(ShapeError, match="does not exist"):
        audio_json(tmp_path / "missing.wav")
    with pytest.raises(ShapeError, match="columns="):
        row_json([1, 2], ["a"])
    assert audio_json(long[:2000], rate, start=1.5)["start"] == 1.5  # where the player starts
    with pytest.raises(ShapeError, match="outside its clip of 2.0 s"):
        audio_json(long[:2000], rate, start=2.5)
    with pytest.raises(ShapeError, match="a number of seconds"):
        audio_json(long[:2000], rate, start="soon")


def test_saved_view_keeps_rows_columns_and_audio_bytes(tmp_path):
    from sourcetrace.views import load_view, save_view

    s = small_scores(n_query=1, n_train=4)
    clip = np.linspace(-1, 1, 400)
    train = [{"row": [i, "x"], "audio": wav_bytes(clip, 8000)} for i in range(4)]
    save_view(tmp_path / "v", s, train_items=train, query_items=[{"row": [9, "y"]}], columns=["n", "tag"])
    p = load_view(tmp_path / "v").payload()
    assert p["queries"][0]["row"] == {"columns": ["n", "tag"], "values": [9, "y"]}
    t = next(iter(p["train"].values()))
    assert np.abs(decode_wav_uri(t["audio"]["src"])[0] - clip).max() <= 1 / 32767
    assert "data:audio/wav;base64," in (tmp_path / "v" / "report.html").read_text()


def test_keywords_are_tf_idf_against_the_training_set():
    corpus = ["the cat sat", "the dog ran", "a cat and a dog", "rockets fly high"]
    kw = Keywords(corpus)
    shown = ["cat cat rockets"]
    got = dict(kw.top(shown, k=5))
    idf = {w: math.log((1 + 4) / (1 + df)) + 1 for w, df in (("cat", 2), ("rockets", 1))}
    assert got["cat"] == pytest.approx(2 / 3 * idf["cat"], rel=1e-4)
    assert got["rockets"] == pytest.approx(1 / 3 * idf["rockets"], rel=1e-4)
    assert words("The cat, and THE dog") == ["cat", "dog"]  # stop words and case


def test_word_diff_marks_removed_and_added_positions():
    a = ["the", "chef", "bakes", "fresh", "bread", "."]
    b = ["the", "chef", "bakes", "sour", "bread", "with", "jam", "."]
    d = word_diff(a, b)
    assert d["removed"] == [3] and d["added"] == [3, 5, 6]
    rebuilt = []
    for op in d["ops"]:
        rebuilt += b[op["b"][0]:op["b"][1]]
    assert rebuilt == b
    assert joiner(["Ġthe", " cat"]) == "" and joiner(["the", "cat"]) == " "


def test_report_is_one_self_contained_file(tmp_path):
    s = small_scores()
    nasty = "</script><script>alert(1)</script> & <!-- x"
    train = [{"text": nasty if i == int(s.matrix[0].argmax()) else f"t {i}"} for i in range(40)]
    path = write_report(s, tmp_path / "r.html", train_items=train, title="<b>title</b>")
    html = path.read_text()
    assert path.name == "r.html" and html.startswith("<!doctype html>")
    assert "<b>title</b>" not in html and "&lt;b&gt;title&lt;/b&gt;" in html
    assert html.count("</script>") == 3  # the data, the config and the app; the nasty text is escaped
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from a network
    assert "__DATA__" not in html and "/*__SCRIPT__*/" not in html
    data = json.loads(re.search(r'id="st-data">(.*?)</script>', html, re.S).group(1))
    assert nasty in json.dumps(data)
    assert write_report(s, tmp_path / "dir").name == "report.html"


def test_script_json_round_trips():
    obj = {"a": "</script>", "b": "<!--", "c": "&amp;", "d": [1.5, None]}
    assert json.loads(script_json(obj)) == obj and "<" not in script_json(obj)


def test_llm_queries_selection_and_compare_in_payload():
    s = small_scores(n_query=2)
    queries = [{"prompt": "the chef", "tokens": ["bakes", "bread", "."], "selection": [0, 1],
                "compare_to": 1},
               {"prompt": "the chef", "tokens": ["bakes", "sour", "bread", "."], "selection": [1]}]
    p = report_payload(s, query_items=queries)
    assert p["kind"] == "llm"
    q = p["queries"][0]
    assert q["text"] == "bakes bread ." and q["selection"] == [0, 1] and q["joiner"] == " "
    assert q["compare"]["other"] == 1 and q["compare"]["added"] == [1] and q["compare"]["removed"] == []
    html = render_html(p)
    assert "bakes bread" in html


# ---- the LM backend --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("transformers")
    from sourcetrace.demos.examples import shared_tiny_lm

    return shared_tiny_lm()


def test_backend_scores_equal_grad_dot_of_the_selected_tokens(lm):
    """Independent check: -∇(Σ selected log p)·∇L(i), by autograd over the same parameters."""
    from sourcetrace.grads.capture import select_parameters

    backend, train, queries = lm
    q = queries[0]
    sel = [0, 2]
    scores = backend.attribute(q["tokens"], sel, q["prompt"])
    params = list(select_parameters(backend.model, backend.modules).values())
    task = backend.task
    batch = task.collate([backend.example(q["tokens"], sel, backend.tokenize(q["prompt"]))])
    gq = torch.autograd.grad(task.measurement(backend.model, batch).sum(), params)
    for i in (0, 5, 40):
        tb = task.collate([backend.train_examples[i]])
        gi = torch.autograd.grad(task.train_loss(backend.model, tb).sum(), params)
        want = -sum(float((a * b).sum()) for a, b in zip(gq, gi))
        assert float(scores.matrix[0, i]) == pytest.approx(want, rel=1e-4, abs=1e-4)
        shares = backend.token_contributions(q["tokens"], sel, i, q["prompt"])
        assert len(shares) == len(train[i]["tokens"])
        assert sum(shares) == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_report_with_backend_shades_influential_tokens(lm, tmp_path):
    backend, train, queries = lm
    q = queries[0]
    scores = backend.attribute(q["tokens"], q["selection"], q["prompt"])
    path = write_report(scores, tmp_path / "lm.html", train_items=train, query_items=[q], backend=backend)
    data = json.loads(re.search(r'id="st-data">(.*?)</script>', path.read_text(), re.S).group(1))
    top = data["queries"][0]["result"]["top"][0]
    assert sum(top["token_scores"]) == pytest.approx(top["score"], rel=1e-3)
    assert data["can_attribute"] is False and path.stat().st_mode & 0o777 == 0o644


def test_backend_refuses_tokens_outside_the_text(lm):
    backend, _, queries = lm
    with pytest.raises(ShapeError, match="outside"):
        backend.attribute(queries[0]["tokens"], [99], queries[0]["prompt"])


def test_session_attribute_and_compare(lm):
    from sourcetrace.views.session import Session

    backend, train, queries = lm
    session = Session(None, train, copy.deepcopy(queries), title="t", backend=backend)
    assert session.payload()["can_attribute"]
    update = session.attribute(0, [1])
    q = update["queries"][0]
    want = backend.attribute(queries[0]["tokens"], [1], queries[0]["prompt"]).matrix[0]
    assert q["selection"] == [1]
    assert q["result"]["top"][0]["index"] == int(want.argmax())
    assert "token_scores" in q["result"]["top"][0]
    assert {g["name"] for g in update["groups"]} == {"source"}
    text = " ".join(queries[0]["tokens"][:-1] + ["and", "jam", "."])
    update = session.compare(0, text)
    a, b = update["queries"]
    assert a["compare"]["other"] == b["index"] == 2 and b["id"] == "0~edit1"
    assert b["selection"] == a["compare"]["added"] and b["selection"]
    with pytest.raises(ShapeError):
        session.attribute(0, [])
    with pytest.raises(ShapeError, match="same"):
        session.compare(0, " ".join(queries[0]["tokens"]))


def test_backend_keeps_the_users_workdir_and_labels_token_shares(lm, tmp_path):
    """No forced overwrite: a workdir made for other settings is refused; token shading names its method."""
    from sourcetrace.errors import WorkdirMismatchError
    from sourcetrace.views import LMBackend
    from sourcetrace.views.session import Session

    backend, train, queries = lm
    texts, ids = backend.train_texts[:6], backend.train_ids[:6]
    first = LMBackend(backend.model, backend.tokenizer, texts, train_ids=ids, workdir=tmp_path, threads=1)
    assert first.token_note.startswith("shaded: each token's share of the score")
    with pytest.raises(WorkdirMismatchError):
        LMBackend(backend.model, backend.tokenizer, texts, train_ids=ids, workdir=tmp_path, method="grad-cos",
                  threads=1)
    cos = LMBackend(backend.model, backend.tokenizer, texts, train_ids=ids, workdir=tmp_path,
                    method="grad-cos", threads=1, overwrite=True)
    session = Session(None, train[:6], copy.deepcopy(queries[:1]), backend=cos, k=2)
    note = session.payload()["token_scores_note"]
    assert "grad-dot score" in note and "grad-cos" in note


def _bpe_tokenizer(texts, folder):
    """A byte-level BPE tokenizer trained here on `texts`, saved and reloaded with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
                            ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.mark.slow
def test_backend_on_a_llama_with_sdpa_and_a_bpe_tokenizer(tmp_path):
    """Any Hugging Face causal LM and fast tokenizer: a Llama config (SDPA attention) with a BPE tokenizer;
    scores equal grad-dot by autograd over every parameter, token shares add up, and the saved view
    reloads from its folder with the same scores."""
    transformers = pytest.importorskip("transformers")
    from sourcetrace.demos.tiny_lm import tiny_corpus
    from sourcetrace.views import LMBackend, load_view, save_view

    texts = [r["text"] for r in tiny_corpus(per_topic=4)]
    tok = _bpe_tokenizer(texts, tmp_path / "tok")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.config._attn_implementation == "sdpa"
    backend = LMBackend(model, tok, texts, threads=1, features="identity")  # full gradients: exact grad-dot
    tokens = backend.tokenize(" chops the onions in the kitchen .")
    assert "".join(tokens) == " chops the onions in the kitchen ."  # offsets keep the spacing
    sel = [1, 2]
    scores = backend.attribute(tokens, sel, "the chef")
    task, params = backend.task, [p for p in model.parameters() if p.requires_grad]
    query = task.collate([backend.example(tokens, sel, backend.tokenize("the chef"))])
    gq = torch.autograd.grad(task.measurement(model, query).sum(), params)
    for i in (0, 5):
        train = task.collate([backend.train_examples[i]])
        gi = torch.autograd.grad(task.train_loss(model, train).sum(), params)
        want = -sum(float((a * b).sum()) for a, b in zip(gq, gi))
        assert float(scores.matrix[0, i]) == pytest.approx(want, rel=1e-4, abs=1e-6)
        shares = backend.token_contributions(tokens, sel, i, "the chef")
        assert len(shares) == len(backend.tokenize(texts[i])) and sum(shares) == pytest.approx(want, rel=1e-4)
    save_view(tmp_path / "view", None, train_items=[{"text": t} for t in texts],
              query_items=[{"prompt": "the chef", "tokens": tokens, "selection": sel}], backend=backend,
              report=False)
    served = load_view(tmp_path / "view")
    assert served.backend.method_name == "grad-dot" and served.backend.modules is None
    assert torch.allclose(served.scores.matrix[0], scores.matrix[0], rtol=1e-5, atol=1e-7)


def test_readme_explorer_example_runs(tmp_path, monkeypatch):
    """The README's LMBackend + save_view block; a tiny GPT-2 and tokenizer stand in for the user's."""
    pytest.importorskip("transformers")
    from pathlib import Path

    from sourcetrace.demos.tiny_lm import tiny_corpus, tiny_gpt2, word_tokenizer
    from sourcetrace.views import load_view

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "LMBackend" in b)
    texts = [r["text"] for r in tiny_corpus(per_topic=3)]
    tokenizer = word_tokenizer(texts)
    namespace = {"model": tiny_gpt2(len(tokenizer)), "tokenizer": tokenizer, "train_texts": texts}
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), namespace)
    view = load_view(tmp_path / "runs/explorer")
    assert view.backend is not None and view.scores.shape == (1, len(texts))
    assert view.query_items[0]["tokens"] == [" bakes", " fresh", " bread", " ."]

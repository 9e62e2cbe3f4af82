"""`sourcetrace corpus build | trace | mine` through typer's test runner."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from sourcetrace.corpus.cli import app

runner = CliRunner()


def _corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [
        {"id": "a", "text": "the quick brown fox jumps over the lazy dog", "title": "Fox"},
        {"id": "b", "text": "a lazy afternoon with a quick nap"},
    ]
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return path


def test_build_trace_json_and_html(tmp_path):
    src = _corpus(tmp_path)
    res = runner.invoke(
        app,
        [
            "build",
            str(src),
            "--index",
            str(tmp_path / "ix"),
            "--tokenizer",
            "word",
            "--engine",
            "portable",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    info = json.loads(res.output.strip().splitlines()[-1])
    assert info["docs"] == 2 and info["engine"] == "portable"
    html = tmp_path / "trace.html"
    res = runner.invoke(
        app,
        [
            "trace",
            "I saw the quick brown fox jumps over a cat",
            "--index",
            str(tmp_path / "ix"),
            "--density",
            "0",
            "--json",
            "--html",
            str(html),
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [s["text"].strip() for s in out["spans"]] == ["the quick brown fox jumps over"]
    assert out["spans"][0]["docs"][0]["doc_id"] == "a"
    assert "<mark" in html.read_text()
    res = runner.invoke(app, ["trace", "the quick brown fox", "--index", str(tmp_path / "ix")])
    assert res.exit_code == 0 and "quick brown fox" in res.output


def test_cli_errors_are_clear(tmp_path):
    res = runner.invoke(app, ["trace", "text", "--index", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no corpus index" in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = runner.invoke(app, ["build", str(empty), "--index", str(tmp_path / "ix")])
    assert res.exit_code == 2 and "no documents" in res.output
    assert not (tmp_path / "ix").exists()


def test_mine_with_a_saved_tiny_model(tmp_path):
    import transformers

    from sourcetrace.corpus import CorpusIndex, WordTokenizer

    src = _corpus(tmp_path)
    idx = CorpusIndex.build(src, "word", tmp_path / "ix", engine="portable", progress=False)
    tok: WordTokenizer = idx.tokenizer  # type: ignore[assignment]
    idx.close()
    cfg = transformers.GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=32,
        n_layer=1,
        n_head=1,
        n_embd=16,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "lm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\na lazy\n")
    res = runner.invoke(
        app,
        [
            "mine",
            "--model",
            str(tmp_path / "lm"),
            "--prompts",
            str(prompts),
            "--index",
            str(tmp_path / "ix"),
            "--tokenizer",
            str(tmp_path / "ix"),  # an index folder names the tokenizer it stores
            "--threshold",
            "0",
            "--max-new-tokens",
            "8",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # transformers may log to stderr
    assert len(out["samples"]) == 2 and out["spans"]  # threshold 0: every generated run is a span
    assert all(s["bucket"] is not None for s in out["spans"])


# ---------------------------------------------------------------------- Hugging Face tokenizers


def sentencepiece_like(folder):
    """A small BPE tokenizer whose decoder drops a token's leading space (like SentencePiece), built here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    texts = [d["text"] for d in DOCS] * 5
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


DOCS = [
    {"id": "a", "text": "the quick brown fox jumps over the lazy dog", "title": "Fox"},
    {"id": "b", "text": "a lazy afternoon with a quick nap"},
    {"id": "c", "text": "def jump(fox):\n    return fox.over(dog)\n"},
]


def test_hugging_face_tokenizer_build_trace_mine(tmp_path):
    import transformers

    hf = sentencepiece_like(tmp_path / "hf")
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    ix = str(tmp_path / "ix")
    res = runner.invoke(
        app, ["build", str(src), "-o", ix, "--tokenizer", str(hf / "tokenizer.json"), "--engine", "portable"]
    )
    assert res.exit_code == 0, res.output
    # the index stores the tokenizer: trace needs no --tokenizer, and the text keeps its spacing
    query = "I think the quick brown fox jumps over  a wall"
    res = runner.invoke(app, ["trace", query, "-i", ix, "--density", "0", "--min-len", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["text"] == query
    assert [s["text"].strip() for s in out["spans"]] == ["the quick brown fox jumps over"]
    occ = out["spans"][0]["docs"][0]
    assert occ["doc_id"] == "a" and occ["match"].strip() == "the quick brown fox jumps over"
    assert occ["before"] + occ["match"] + occ["after"] == DOCS[0]["text"]
    # a folder works as well as the file, and is the same tokenizer
    res = runner.invoke(app, ["trace", query, "-i", ix, "--tokenizer", str(hf), "--json"])
    assert res.exit_code == 0, res.output

    # mining: a GPT-2 from config over the same vocabulary, the tokenizer saved in the model folder
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"))
    cfg = transformers.GPT2Config(
        vocab_size=len(fast.get_vocab()), n_positions=64, n_layer=1, n_head=1, n_embd=16,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "lm")
    fast.save_pretrained(tmp_path / "lm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\na lazy\n")
    res = runner.invoke(
        app,
        ["mine", "--model", str(tmp_path / "lm"), "--prompts", str(prompts), "-i", ix, "--threshold", "0",
         "--max-new-tokens", "6", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    mined = json.loads(res.stdout)
    assert len(mined["samples"]) == 2 and all(s["bucket"] is not None for s in mined["spans"])


def test_a_folder_of_python_files_with_glob(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("def add(x, y):\n    return x + y\n")
    (repo / "b.py").write_text("import os\nprint(os.getcwd())\n")
    (repo / "notes.md").write_text("# notes\nsome words\n")
    (repo / "logo.bin").write_bytes(b"\x89PNG\x00\x01\xff")
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    res = runner.invoke(app, ["build", str(repo), "-o", str(tmp_path / "py"), "--glob", "*.py", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["docs"] == 2 and info["skipped"] == {"hidden": 1, "not matching the glob": 2}
    res = runner.invoke(app, ["build", str(repo), "-o", str(tmp_path / "all")])
    assert res.exit_code == 0, res.output
    assert "3 documents" in res.output and "skipped: 1 hidden, 1 not UTF-8 text" in res.output
    res = runner.invoke(
        app, ["trace", "return x + y", "-i", str(tmp_path / "py"), "--min-len", "2", "--json"]
    )
    assert json.loads(res.output)["spans"][0]["docs"][0]["doc_id"] == "pkg/a.py"


# ---------------------------------------------------------------------- every error: one line, the flag


def _errors_setup(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    holes = tmp_path / "holes.jsonl"
    holes.write_text(
        json.dumps({"id": "x", "text": "words"}) + "\n" + json.dumps({"id": "y", "text": ""}) + "\n"
    )
    ix = tmp_path / "ix"
    assert runner.invoke(app, ["build", str(src), "-o", str(ix), "--tokenizer", "word"]).exit_code == 0
    lm = tmp_path / "lm"
    import transformers

    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_layer=1, n_head=1, n_embd=8)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(lm)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the quick\n")
    return src, holes, ix, lm, prompts


def test_every_cli_error_is_one_line_naming_the_flag(tmp_path):
    src, holes, ix, lm, prompts = _errors_setup(tmp_path)
    new = str(tmp_path / "new")
    mine = ["mine", "--model", str(lm), "--prompts", str(prompts), "--tokenizer", str(ix)]
    cases = [
        (["build", str(holes), "-o", new], "--skip-empty"),
        (["build", str(src), "-o", str(ix)], "--overwrite"),  # ix was built with --tokenizer word
        (["build", str(src), "-o", new, "--engine", "fast"], "--engine fast"),
        (["build", str(src), "-o", new, "--glob", "*.py"], "--glob *.py"),
        (["build", str(src), "-o", new, "--token-dtype", "u7"], "--token-dtype u7"),
        (["build", str(src), "-o", new, "--shard-tokens", "0"], "--shard-tokens 0"),
        (["build", str(src), "-o", new, "--tokenizer", "gpt9"], "unknown tokenizer 'gpt9'"),
        (["build", str(tmp_path / "missing.jsonl"), "-o", new], "'source'"),
        (["trace", "the fox", "-i", str(ix), "--tokenizer", "word"], "no --tokenizer"),
        (["trace", "the fox", "-i", str(ix), "--rank-by", "size"], "--rank-by size"),
        (["trace", "the fox", "-i", str(ix), "--density", "-1"], "--density -1.0"),
        (["trace", "the fox", "-i", str(ix), "--density", "2"], "--density 2.0"),
        (["trace", "the fox", "-i", str(ix), "--min-len", "0"], "--min-len 0"),
        (["trace", "the fox", "-i", str(ix), "--min-len", "four"], "'--min-len'"),
        (["trace", "the fox", "-i", str(ix), "--max-count", "0"], "--max-count 0"),
        (["trace", "the fox", "-i", str(ix), "--docs-per-span", "0"], "--docs-per-span 0"),
        (["trace", "the fox", "-i", str(tmp_path / "nowhere")], "no corpus index"),
        (["trace", "-i", str(ix), "--file", str(tmp_path / "none.txt")], "'--file'"),
        (["trace", "the fox"], "'--index'"),
        (["trace", "the fox", "-i", str(ix), "--colour"], "--colour"),
        ([*mine, "--window", "0"], "--window 0"),
        ([*mine, "--threshold", "1.5"], "--threshold 1.5"),
        ([*mine, "--top-p", "0"], "--top-p 0.0"),
        ([*mine, "--temperature", "-1"], "--temperature -1.0"),
        ([*mine, "--samples", "0"], "--samples 0"),
        ([*mine, "--batch-size", "0"], "--batch-size 0"),
        ([*mine, "--max-new-tokens", "0"], "--max-new-tokens 0"),
        ([*mine, "--texts", str(prompts)], "exactly one of --prompts or --texts"),
        (["mine", "--model", str(lm), "--prompts", str(prompts)], "--tokenizer"),
        (["mine", "--model", str(tmp_path / "nolm"), "--prompts", str(prompts)], "'--model'"),
    ]
    seen = []
    for args, flag in cases:
        res = runner.invoke(app, args)
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2, (args, res.output)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, res.output)
        assert flag in lines[0], (args, lines[0])
        assert not re.search(r"\b[a-z_]+=", lines[0]), lines[0]  # no Python argument named
        seen.append(lines[0])
    assert len(seen) == len(cases) >= 30


def test_progress_bars_are_erased_by_an_error():
    import io

    from sourcetrace.corpus.sources import progress_bar

    buf = io.StringIO()
    with pytest.raises(ValueError), progress_bar(total=3, file=buf, mininterval=0) as bar:
        bar.update()
        raise ValueError("bad document")
    assert "1/3" in buf.getvalue() and buf.getvalue().split("\r")[-1].strip() == ""

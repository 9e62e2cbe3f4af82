"""`sourcetrace corpus build | trace | mine` through typer's test runner."""

from __future__ import annotations

import json

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

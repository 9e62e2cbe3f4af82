"""The lm-speed benchmark's code path runs at tiny sizes and writes its files (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from sourcetrace.bench import BENCHMARKS
from sourcetrace.bench.lm_speed import METHODS, Setting, _in_child, linear_modules, make_model, run

TINY = Setting(n_docs=12, n_queries=3, doc_tokens=8, vocab=48, hidden=16, layers=1, heads=2)


def test_gpt2_conv1d_becomes_an_equal_linear():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = make_model("gpt2", TINY)
    torch.manual_seed(TINY.seed)
    original = GPT2LMHeadModel(GPT2Config(vocab_size=TINY.vocab, n_embd=TINY.hidden, n_layer=TINY.layers,
                                          n_head=TINY.heads, n_positions=TINY.doc_tokens,
                                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=1,
                                          attn_implementation="eager")).eval()
    ids = torch.randint(1, TINY.vocab, (2, TINY.doc_tokens))
    torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits)
    # every weight matrix sits in an nn.Linear now: c_attn, c_proj, c_fc, mlp c_proj per layer, and lm_head
    assert len(linear_modules(model)) == 4 * TINY.layers + 1


def test_run_writes_the_table_and_the_verdict(tmp_path):
    path = run(tmp_path, setting=TINY, fresh_process=False)
    result = json.loads((tmp_path / "lm-speed.json").read_text())
    assert path == tmp_path / "lm-speed.md"
    assert [(r["model"], r["method"]) for r in result["rows"]] == [(m, x) for m in ("llama", "gpt2")
                                                                  for x in METHODS]
    for r in result["rows"]:
        assert "error" not in r and r["scores_shape"] == [TINY.n_queries, TINY.n_docs]
        assert r["cpu_s"] > 0 and r["peak_rss_mib"] > 0
        if r["method"] == "kronfluence ekfac":
            assert r["wall_ratio"] == 1 and r["cpu_ratio"] == 1
    assert set(result["verdict"]) == {"llama", "gpt2"} and len(result["load_average_before"]) == 3
    text = path.read_text()
    assert "load average" in text and text.count("| llama |") == len(METHODS)
    assert "lm-speed" in BENCHMARKS


@pytest.mark.slow
def test_a_method_runs_in_a_fresh_process():
    row = _in_child("llama", "sourcetrace ekfac", TINY)
    assert "error" not in row, row
    assert row["scores_shape"] == [TINY.n_queries, TINY.n_docs]

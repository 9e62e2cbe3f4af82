"""Every influence curvature, TRAK and LoGra run end to end on a tiny GPT-2 with CausalLMTask."""

import pytest
import torch

import sourcetrace as st
from models import lm_examples, tiny_gpt2

CURVATURES = ["explicit", "cg", "lissa", "arnoldi", "kfac", "ekfac", "diagonal", "datainf"]


@pytest.mark.parametrize("method", CURVATURES + ["trak", "logra"])
def test_method_runs_on_tiny_gpt2(method, tmp_path):
    model = tiny_gpt2(vocab_size=12)
    train, queries = lm_examples(8, vocab_size=12), lm_examples(2, vocab_size=12, seed=1)
    options = {"modules": ["lm_head", "transformer.h.0.mlp.*"]}
    if method == "lissa":
        options["curvature_options"] = {"depth": 50}
    if method == "arnoldi":
        options["curvature_options"] = {"rank": 10}
    if method == "trak":
        options = {"proj_dim": 64}
    if method == "logra":
        options = {"rank": 4}
    attr = st.Attributor(model, st.CausalLMTask(), method, workdir=tmp_path, progress=False, **options)
    scores = attr.fit(train).score(queries)
    assert scores.shape == (2, 8)
    assert torch.isfinite(scores.matrix).all() and scores.matrix.abs().sum() > 0
    influence = attr.self_influence()
    assert influence.shape == (8,) and torch.isfinite(influence).all()
    assert (influence > 0).all()  # gᵀ P g with a positive-definite (damped Gauss-Newton or Fisher) P

"""Every registered method runs with its defaults on a Hugging Face causal LM with SDPA attention."""

import pytest
import torch

import sourcetrace as st

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_layer=1, n_head=2, n_embd=8,
                                  bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(cfg).double()
    docs = [{"input_ids": torch.randint(0, 40, (10,))} for _ in range(6)]
    return model, docs


def _options(name, model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if name in ("tracin", "source"):
        return {"checkpoints": [state, state], "learning_rates": [0.1, 0.1],
                **({"steps": [5, 10]} if name == "source" else {})}
    return {}


# replay needs a recorded training run
@pytest.mark.parametrize("name", [m for m in st.available_methods() if m != "replay"])
def test_method_runs_on_sdpa_lm(lm, name):
    model, docs = lm
    attr = st.Attributor(model, st.CausalLMTask(), name, progress=False, **_options(name, model))
    scores = attr.fit(docs).score(docs[:2])
    assert scores.matrix.shape == (2, 6) and torch.isfinite(scores.matrix).all()


def test_hessian_products_through_sdpa_match_explicit(lm):
    """CG (curvature products through attention, after fitting) agrees with the explicit inverse.

    The model is left in train mode with dropout, as a GPT-2 built from its config is: products must
    run it in eval mode, or every CG step multiplies by another random matrix."""
    model, docs = lm
    opts = {"features": "identity", "damping": 0.1}  # Gauss-Newton: J v through attention, forward mode
    ex = st.Attributor(model, st.CausalLMTask(), "explicit", progress=False, **opts).fit(docs).score(docs[:2])
    cg = st.Attributor(model, st.CausalLMTask(), "cg", progress=False, **opts).fit(docs).score(docs[:2])
    torch.testing.assert_close(cg.matrix, ex.matrix, rtol=1e-4, atol=1e-6)

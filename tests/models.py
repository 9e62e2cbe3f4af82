"""Small models and data shared by the tests."""

import pytest
import torch


def tiny_gpt2(n_layer: int = 1, vocab_size: int = 30, dtype: torch.dtype = torch.float32):
    """A GPT-2 built from a config (Conv1D layers, tied embeddings), in eval mode, seeded."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=vocab_size, n_positions=16,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def lm_examples(n: int, prompt: int = 3, completion: int = 3, vocab_size: int = 30, seed: int = 0):
    """`n` random {"prompt", "completion"} examples of token ids for CausalLMTask."""
    gen = torch.Generator().manual_seed(seed)
    return [{"prompt": torch.randint(1, vocab_size, (prompt,), generator=gen).tolist(),
             "completion": torch.randint(1, vocab_size, (completion,), generator=gen).tolist()}
            for _ in range(n)]

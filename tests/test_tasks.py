"""Tasks: losses and measurements equal hand computations; CausalLMTask masks the prompt."""

import json

import pytest
import torch
from torch import nn

import sourcetrace as st
from sourcetrace.errors import ShapeError

V, H = 11, 6


class TinyLM(nn.Module):
    """A plain PyTorch causal LM: token ids [B, T] -> logits [B, T, V]."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.mix = nn.Linear(H, H)
        self.head = nn.Linear(H, V)

    def forward(self, ids):
        h = self.embed(ids)
        # causal: each position also sees the mean of the positions before it
        prefix = torch.cumsum(h, 1) / torch.arange(1, ids.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.head(torch.tanh(self.mix(prefix)))


def lm():
    return TinyLM().double()


LM_DATA = [
    {"id": "a", "prompt": [1, 2, 3], "completion": [4, 5]},
    {"id": "b", "prompt": [7], "completion": [2, 2, 9, 1]},
    {"id": "c", "prompt": [5, 6], "completion": [3]},
    {"id": "d", "prompt": [10, 1, 4, 4], "completion": [8, 6]},
    {"id": "e", "prompt": [9, 3], "completion": [1, 7, 2]},
]
LM_QUERIES = [{"id": "q0", "prompt": [2, 3], "completion": [4, 5, 6]},
              {"id": "q1", "prompt": [8], "completion": [1]}]


def logprob(model, prompt, completion):
    """Σ_t log p(completion_t | prompt, completion_<t), by hand on the unpadded sequence."""
    seq = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(seq)[0], dim=-1)
    return sum(logp[len(prompt) + t - 1, tok] for t, tok in enumerate(completion))


def flat_grad(model, value):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))])


def test_measurement_is_completion_logprob():
    model, task = lm(), st.CausalLMTask()
    batch = task.collate(LM_DATA)  # right-padded to the longest example
    assert batch["input_ids"].shape == (5, 6)
    assert batch["labels"][0].tolist() == [-100, -100, -100, 4, 5, -100]
    got = task.measurement(model, batch)
    want = torch.stack([logprob(model, ex["prompt"], ex["completion"]) for ex in LM_DATA])
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert torch.allclose(task.train_loss(model, batch), -want, rtol=1e-12, atol=0)
    per_token = st.CausalLMTask(loss_per_token=True).train_loss(model, batch)
    lengths = torch.tensor([len(ex["completion"]) for ex in LM_DATA], dtype=torch.float64)
    assert torch.allclose(per_token, -want / lengths, rtol=1e-12, atol=0)


def test_prompt_tokens_are_masked():
    """The measurement's gradient ignores what a prompt position's label would be: only completions count."""
    model, task = lm(), st.CausalLMTask()
    ex = LM_DATA[3]
    ids = ex["prompt"] + ex["completion"]
    masked = [-100] * len(ex["prompt"]) + ex["completion"]
    g_pc = flat_grad(model, task.measurement(model, task.collate([ex]))[0])
    g_ids = flat_grad(model, task.measurement(model, task.collate([{"input_ids": ids, "labels": masked}]))[0])
    g_hand = flat_grad(model, logprob(model, ex["prompt"], ex["completion"]))
    assert torch.allclose(g_pc, g_hand, rtol=1e-10, atol=1e-14)
    assert torch.equal(g_pc, g_ids)
    # whatever label a prompt position carries in the source, masking it removes it entirely
    other = [(t + 5) % V for t in ex["prompt"]]
    relabeled = task.collate([{"input_ids": ids, "labels": other + ex["completion"]}])
    relabeled["labels"][0, : len(ex["prompt"])] = -100
    assert torch.equal(flat_grad(model, task.measurement(model, relabeled)[0]), g_pc)
    # and the mask matters: with the prompt unmasked the gradient is another one
    g_all = flat_grad(model, task.measurement(model, task.collate([{"input_ids": ids}]))[0])
    assert not torch.allclose(g_all, g_pc)


def test_plain_lm_through_grad_dot(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in LM_DATA))
    model = lm()
    attr = st.Attributor(model, st.CausalLMTask(), workdir=tmp_path / "run", progress=False,
                         store_dtype="float64", batch_size=2).fit(path)
    scores = attr.score(LM_QUERIES)
    assert scores.train_ids == ["a", "b", "c", "d", "e"] and scores.query_ids == ["q0", "q1"]
    q = torch.stack([flat_grad(model, logprob(model, e["prompt"], e["completion"])) for e in LM_QUERIES])
    g = torch.stack([flat_grad(model, -logprob(model, e["prompt"], e["completion"])) for e in LM_DATA])
    want = -q @ g.T
    assert (scores.matrix - want).norm() / want.norm() < 1e-9


def test_classification_and_regression_by_hand():
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    logits = model(x)
    task = st.ClassificationTask()
    margins = [logits[i, y[i]] - torch.logsumexp(logits[i][torch.arange(4) != y[i]], 0) for i in range(5)]
    assert torch.allclose(task.measurement(model, (x, y)), torch.stack(margins), rtol=1e-12, atol=0)
    ce = torch.stack([-torch.log_softmax(logits[i], 0)[y[i]] for i in range(5)])
    assert torch.allclose(task.train_loss(model, (x, y)), ce, rtol=1e-12, atol=0)
    assert torch.allclose(st.ClassificationTask("loss").measurement(model, {"x": x, "y": y}), -ce)
    with pytest.raises(ShapeError, match="labels must have shape"):
        task.train_loss(model, (x, y[:4]))
    with pytest.raises(ValueError, match="margin"):
        st.ClassificationTask("accuracy")

    reg, t = st.RegressionTask(), torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(reg.train_loss(model, (x, t)), 0.5 * ((logits - t) ** 2).sum(1), rtol=1e-12, atol=0)
    assert torch.equal(reg.measurement(model, (x, t)), -reg.train_loss(model, (x, t)))
    with pytest.raises(ShapeError, match="do not match"):
        reg.train_loss(model, (x, t[:, :3]))


def test_jsonl_classification_rows_collate_to_tensors(tmp_path):
    """A JSONL row's list of features becomes a tensor (default_collate alone would transpose it)."""
    rows = [{"id": f"r{i}", "x": [float(i), 1.0, -float(i)], "y": i % 2} for i in range(6)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = nn.Linear(3, 2)
    scores = st.Attributor(model, st.ClassificationTask(), progress=False).fit(path).score(path)
    assert scores.train_ids == [r["id"] for r in rows] and scores.matrix.shape == (6, 6)
    # the diagonal is the (negated-sign) self term -∇m·∇L, computed by hand for one row
    x, y = torch.tensor(rows[4]["x"]), rows[4]["y"]
    m = flat_grad(model, st.ClassificationTask().measurement(model, (x[None], torch.tensor([y])))[0])
    g = flat_grad(model, nn.functional.cross_entropy(model(x[None]), torch.tensor([y])))
    assert scores.matrix[4, 4].item() == pytest.approx(-(m @ g).item(), rel=1e-5)


def test_lm_call_has_no_retry_that_drops_the_attention_mask():
    """A TypeError inside a model that takes a mask propagates; a model without a mask is called without."""

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinyLM().double()

        def forward(self, input_ids, attention_mask=None):
            raise TypeError("a bug inside the model")

    task = st.CausalLMTask()
    batch = task.collate([{"prompt": [1, 2], "completion": [3]}, {"prompt": [4], "completion": [5]}])
    with pytest.raises(TypeError, match="a bug inside the model"):
        st.CausalLMTask().train_loss(Broken(), batch)
    model = lm()  # forward(ids): right padding cannot change the labelled positions of a causal model
    padded = st.CausalLMTask().train_loss(model, batch)
    alone = task.train_loss(model, task.collate([{"prompt": [4], "completion": [5]}]))
    assert torch.allclose(padded[1], alone[0], rtol=1e-12, atol=0)

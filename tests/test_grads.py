"""Per-example gradients against a plain per-example autograd loop (float64)."""

import pytest
import torch
from torch import nn

from sourcetrace import CausalLMTask, ClassificationTask, RegressionTask
from sourcetrace.errors import NonFiniteError, ShapeError, UnsupportedModuleError
from sourcetrace.grads import GradientCapture


def loop_grads(model, fn, batch, names, take):
    """One backward per example: the independent reference."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(take(batch, None)):
        single = take(batch, i)
        model.zero_grad()
        g = torch.autograd.grad(fn(model, single).sum(), [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([(x if x is not None else torch.zeros_like(params[n])).reshape(-1)
                               for x, n in zip(g, names)]))
    return torch.stack(rows)


def take_pair(batch, i):
    if i is None:
        return len(batch[0])
    return batch[0][i : i + 1], batch[1][i : i + 1]


def take_dict(batch, i):
    if i is None:
        return len(batch["input_ids"])
    return {k: v[i : i + 1] for k, v in batch.items()}


def assert_matches(model, fn, batch, take, **kw):
    cap = GradientCapture(model, **kw)
    got = cap.flat(fn, batch)
    want = loop_grads(model, fn, batch, list(cap.params), take)
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-6, rel
    return cap


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, stride=1)
        self.conv2 = nn.Conv2d(4, 3, 2, stride=2, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 2 * 2, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = self.bn(self.conv2(x))
        x = self.pool(x)
        return self.fc(x.flatten(1))


class EmbedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)).mean(1))


def test_mlp_classification():
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batch = (torch.randn(6, 7, dtype=torch.float64), torch.randint(0, 3, (6,)))
    task = ClassificationTask()
    cap = assert_matches(model, task.train_loss, batch, take_pair)
    assert not cap.fallback_names
    assert_matches(model, task.measurement, batch, take_pair)


def test_cnn_with_pooling_and_batchnorm_fallback():
    model = CNN().double().eval()
    batch = (torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (5,)))
    cap = assert_matches(model, ClassificationTask().train_loss, batch, take_pair)
    assert cap.fallback_names == ["bn.weight", "bn.bias"]


def test_embedding_and_layernorm():
    model = EmbedBag().double()
    ids = torch.randint(0, 11, (6, 4))
    ids[0, 0] = 0
    batch = (ids, torch.randint(0, 3, (6,)))
    cap = assert_matches(model, ClassificationTask().train_loss, batch, take_pair)
    assert not cap.fallback_names  # the LayerNorm's weight and bias are hooked too


def test_tiny_gpt2_conv1d_and_tied_embeddings():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=30, n_positions=16,
                                  attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    task = CausalLMTask()
    batch = task.collate([{"prompt": [1, 2, 3], "completion": [4, 5]},
                          {"prompt": [6], "completion": [7, 8, 9, 10]},
                          {"input_ids": [3, 4, 5, 6], "labels": [-100, 4, 5, 6]}])
    cap = assert_matches(model, task.train_loss, batch, take_dict)
    assert "transformer.h.0.attn.c_attn.weight" not in cap.fallback_names  # Conv1D is hooked
    assert "transformer.wte.weight" not in cap.fallback_names  # tied to lm_head; both calls hooked
    assert_matches(model, task.measurement, batch, take_dict)


def test_module_selection_by_pattern():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    batch = (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    cap = assert_matches(model, RegressionTask().train_loss, batch, take_pair, modules=["2"])
    assert list(cap.params) == ["2.weight", "2.bias"]
    assert cap.dim == 10


def test_float32_and_bfloat16():
    base = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    batch = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    task = ClassificationTask()
    ref = GradientCapture(base.double()).flat(task.train_loss, (batch[0].double(), batch[1]))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        model = base.to(dtype)
        got = GradientCapture(model).flat(task.train_loss, (batch[0].to(dtype), batch[1]))
        assert got.dtype == dtype
        assert ((got.double() - ref).norm() / ref.norm()) < tol


def test_unsupported_module_without_fallback_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModuleError, match="fallback=True"):
        GradientCapture(model, fallback=False)


def test_unmatched_pattern_is_refused():
    with pytest.raises(UnsupportedModuleError, match="named_modules"):
        GradientCapture(nn.Linear(2, 2), modules=["encoder.*"])


def test_weight_used_outside_its_layer_moves_to_fallback():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) + torch.nn.functional.linear(x, self.lin.weight)

    model = Shared().double()
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    with pytest.warns(UserWarning, match="outside their layers"):
        assert_matches(model, RegressionTask().train_loss, batch, take_pair)


def test_nan_loss_and_bad_shapes():
    model = nn.Linear(3, 2)
    task = ClassificationTask()
    x = torch.randn(2, 3)
    x[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        GradientCapture(model).flat(task.train_loss, (x, torch.tensor([0, 1])))
    with pytest.raises(ShapeError, match="labels"):
        GradientCapture(model).flat(task.train_loss, (torch.randn(2, 3), torch.tensor([[0], [1]])))


class _Normed(nn.Module):
    """Linear layers around a LayerNorm and an RMSNorm (used on [B, T, d] sequences)."""

    def __init__(self, rms: nn.Module):
        super().__init__()
        self.inp, self.ln, self.rms, self.out = nn.Linear(3, 4), nn.LayerNorm(4), rms, nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.rms(torch.tanh(self.ln(self.inp(x))))).mean(1)


@pytest.mark.parametrize("rms", ["torch", "llama"])
def test_norm_weights_are_captured_by_hooks_and_match_the_loop(rms):
    torch.manual_seed(0)
    if rms == "llama":
        transformers = pytest.importorskip("transformers")
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        layer = LlamaRMSNorm(4, eps=1e-5)
        assert transformers is not None
    else:
        layer = nn.RMSNorm(4, eps=1e-5)
    model = _Normed(layer).double()
    with torch.no_grad():
        for p in (model.ln.weight, model.ln.bias, model.rms.weight):
            p.normal_()
    batch = (torch.randn(5, 6, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))
    fn = ClassificationTask().train_loss
    cap = GradientCapture(model)
    assert {"ln", "rms"} <= set(cap.layers)  # hooked, not left to the torch.func fallback
    got = cap.flat(fn, batch)
    assert not cap.fallback_names
    want = loop_grads(model, fn, batch, list(cap.params), take_pair)
    # Llama's RMSNorm normalises in float32 even for a float64 model, so its hook agrees to float32 precision
    tol = 1e-10 if rms == "torch" else 1e-6
    assert torch.allclose(got, want, rtol=tol, atol=tol)

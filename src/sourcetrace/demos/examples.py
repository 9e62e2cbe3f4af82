"""Small, offline examples the views' tests, screenshots and docs draw: a digits classifier and a tiny LM."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..scores import Scores


def digits_example(n_train: int = 300, n_query: int = 5, seed: int = 0, method: str = "grad-dot"
                   ) -> tuple[Scores, list[dict[str, Any]], list[dict[str, Any]]]:
    """Scores of a small MLP on scikit-learn's bundled 8×8 digits, with items for `write_report`.

    Two sources ("scanner-a", "scanner-b") make the group view interesting; a few labels are flipped.
    """
    from sklearn.datasets import load_digits

    from ..attributor import Attributor
    from ..tasks import ClassificationTask
    from ..views.llm import torch_threads

    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits.target), generator=g)
    x = torch.tensor(digits.data, dtype=torch.float32)[order] / 16
    y = torch.tensor(digits.target)[order]
    xt, yt = x[:n_train], y[:n_train].clone()
    flipped = torch.arange(0, n_train, max(1, n_train // 10))[:8]
    yt[flipped] = (yt[flipped] + 3) % 10
    xq, yq = x[n_train:n_train + n_query], y[n_train:n_train + n_query]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    with torch_threads(1):  # tiny model: one thread is much faster on a busy machine
        _descend(model, lambda: nn.functional.cross_entropy(model(xt), yt), steps=120, lr=0.5)
        attr = Attributor(model, ClassificationTask(), method, progress=False).fit((xt, yt))
        scores = attr.score((xq, yq))
    sources = ["scanner-a" if i % 3 else "scanner-b" for i in range(n_train)]
    train_items = [{"image": xt[i].reshape(8, 8).tolist(), "label": str(int(yt[i])), "source": sources[i]}
                   for i in range(n_train)]
    with torch.no_grad():
        pred = model(xq).argmax(1)
    query_items = [{"image": xq[i].reshape(8, 8).tolist(), "label": str(int(yq[i])),
                    "source": f"predicted {int(pred[i])}"} for i in range(n_query)]
    return scores, train_items, query_items


def _descend(model: nn.Module, loss: Any, steps: int, lr: float) -> None:
    """Plain full-batch gradient descent (torch.optim imports torch._dynamo, seconds on a small machine)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        grads = torch.autograd.grad(loss(), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)


@functools.lru_cache(maxsize=1)
def shared_digits() -> tuple[Scores, list[dict[str, Any]], list[dict[str, Any]]]:
    """`digits_example()`, built once per process (tests and screenshots share it; do not mutate)."""
    return digits_example()


@functools.lru_cache(maxsize=1)
def shared_tiny_lm() -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """`tiny_lm.tiny_lm_example()`, built once per process; copy the items before changing them."""
    from .tiny_lm import tiny_lm_example

    return tiny_lm_example()


CALLS = (("wren", 3200.0), ("finch", 2400.0), ("dove", 600.0), ("owl", 420.0))


def calls_example(n_train: int = 40, n_query: int = 3, seed: int = 0, sample_rate: int = 8000,
                  seconds: float = 0.4) -> tuple[Scores, list[dict[str, Any]], list[dict[str, Any]]]:
    """Bird-call recordings as table rows with short synthetic clips, and made-up scores (no model).

    Each item has a `row` (site, hour, temperature, peak frequency, SNR, recorder), an `audio` clip (a
    warbling tone at the call's pitch) with its `sample_rate`, and the species as `label`. A training call
    scores higher the closer its pitch is to the query's, plus noise: enough to draw the classifier views.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    envelope = np.sin(np.pi * t / seconds) ** 2

    def item(i: int) -> dict[str, Any]:
        species, pitch = CALLS[int(rng.integers(len(CALLS)))]
        peak = pitch * float(rng.uniform(0.9, 1.1))
        warble = float(rng.uniform(4, 12))
        phase = 2 * np.pi * np.cumsum(peak * (1 + 0.06 * np.sin(2 * np.pi * warble * t))) / sample_rate
        row = {"site": f"marsh-{int(rng.integers(1, 5))}", "hour": int(rng.integers(4, 10)),
               "temp_c": round(float(rng.normal(11, 4)), 1), "peak_hz": round(peak),
               "snr_db": round(float(rng.uniform(6, 30)), 1), "recorder": f"AudioMoth {i % 3 + 1}"}
        return {"row": row, "audio": (0.5 * envelope * np.sin(phase)).astype(np.float32),
                "sample_rate": sample_rate, "label": species, "source": f"recorder {i % 3 + 1}"}

    train = [item(i) for i in range(n_train)]
    queries = [item(i) for i in range(n_query)]
    pitch = np.log([float(x["row"]["peak_hz"]) for x in train])
    m = np.stack([np.exp(-2 * np.abs(pitch - np.log(q["row"]["peak_hz"]))) - 0.45 +
                  0.08 * rng.standard_normal(n_train) for q in queries])
    scores = Scores(torch.tensor(m), [f"call-{i}" for i in range(n_train)],
                    [f"query-{i}" for i in range(n_query)], "grad-dot")
    return scores, train, queries

"""`sourcetrace demo` (digits): train a small MLP on scikit-learn's digits while recording its training,
attribute a few test predictions by replaying it, print the proponents and opponents, and write a view.

The output folder is a servable view (`sourcetrace serve OUT`) and holds the same page as `report.html`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidOptionError, require

SHADES = " ░▒▓█"
N_IMAGES = 1797  # scikit-learn's digits


def load_digits() -> Any:
    """scikit-learn's bundled 8×8 digits (1,797 images; no download)."""
    return require("sklearn.datasets", "bench").load_digits()


def split_digits(digits: Any, order: np.ndarray, n_train: int, n_query: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Pixels scaled to [0, 1] in `order`: the first `n_train` train, the next `n_query` are queries;
    (x_train, y_train, x_query, y_query, images in that order)."""
    x = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[order], dtype=torch.long)
    q = slice(n_train, n_train + n_query)
    return x[:n_train], y[:n_train], x[q], y[q], digits.images[order]


@dataclass
class DigitsDemo:
    """The demo's data, model and recorded SGD run (seed 0): 1000 training images, the next as queries."""

    n_train: int = 1000
    n_query: int = 3
    hidden: int = 128
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 64
    weight_decay: float = 1e-3
    checkpoints: int = 6
    x_train: torch.Tensor = field(init=False)
    y_train: torch.Tensor = field(init=False)
    x_query: torch.Tensor = field(init=False)
    y_query: torch.Tensor = field(init=False)
    images: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.n_query <= N_IMAGES - self.n_train:
            raise InvalidOptionError(f"queries must be between 1 and {N_IMAGES - self.n_train} (the digits "
                                     f"left after {self.n_train} training images); got {self.n_query}")
        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        (self.x_train, self.y_train, self.x_query, self.y_query,
         self.images) = split_digits(digits, order, self.n_train, self.n_query)

    def train(self, recorder_dir: Path) -> nn.Module:
        """Minibatch SGD on the training images, recorded for replay into `recorder_dir`."""
        from ..trajectory import TrajectoryRecorder

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))
        gen = torch.Generator().manual_seed(0)
        steps = []
        for _ in range(self.epochs):
            perm = torch.randperm(self.n_train, generator=gen)
            steps += [perm[i: i + self.batch_size] for i in range(0, self.n_train, self.batch_size)]
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        every = max(1, len(steps) // self.checkpoints)
        rec = TrajectoryRecorder(recorder_dir, model, opt, checkpoint_every=every, overwrite=True,
                                 config={"demo": "digits", "n_train": self.n_train})
        rec.stage("train", model, None)
        for batch in steps:
            opt.zero_grad()
            F.cross_entropy(model(self.x_train[batch]), self.y_train[batch]).backward()
            opt.step()
            rec.step(model, opt, batch)
        rec.finish(model, opt)
        return model.eval()

    def margins(self, model: nn.Module) -> torch.Tensor:
        """Each query's margin: its correct logit minus the log-sum-exp of the others."""
        with torch.no_grad():
            logits = model(self.x_query)
        correct = logits.gather(1, self.y_query[:, None]).squeeze(1)
        others = logits.scatter(1, self.y_query[:, None], float("-inf"))
        return correct - torch.logsumexp(others, 1)

    def items(self, n_query: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Training and query items for the views: the 8×8 image and its label."""
        train = [{"image": self.images[i].tolist(), "label": str(int(self.y_train[i]))}
                 for i in range(self.n_train)]
        queries = [{"image": self.images[self.n_train + q].tolist(), "label": str(int(self.y_query[q]))}
                   for q in range(n_query)]
        return train, queries


def digit_art(image: Any) -> str:
    """An 8×8 digit (grey levels 0–16) drawn with block characters."""
    return "\n".join("".join(SHADES[min(4, int(v) * 5 // 17)] for v in row) for row in image)


def run(out: Path, queries: int = 3, k: int = 3, console: Any = None) -> Path:
    """Run the demo into `out`; returns the report (the folder is a view for `sourcetrace serve`)."""
    from rich.console import Console
    from rich.table import Table

    import sourcetrace as st

    from ..views import save_view

    if k < 1:
        raise InvalidOptionError(f"k must be at least 1; got {k}")
    console = console or Console()
    demo = DigitsDemo(n_query=queries)
    with console.status("training a digits MLP (1000 images, 30 epochs of SGD), recording its trajectory"):
        model = demo.train(out / "trajectory")
    accuracy = float((model(demo.x_query).argmax(1) == demo.y_query).float().mean())
    console.print(f"trained: query accuracy {accuracy:.0%}; attributing by replaying the recorded steps "
                  "(the exact derivative of each query's margin in each training example's weight)")
    attr = st.Attributor(model, st.ClassificationTask(), "replay", workdir=out / "workdir",
                         trajectory=out / "trajectory", overwrite=True)
    scores = attr.fit((demo.x_train, demo.y_train)).score((demo.x_query, demo.y_query))
    predicted = model(demo.x_query).argmax(1)
    margins = demo.margins(model)
    for q in range(queries):
        table = Table(title=f"query {q}: a {int(demo.y_query[q])}, predicted {int(predicted[q])}; "
                            "proponents +, opponents −", show_lines=True)
        table.add_column("query", no_wrap=True)
        for sign in ("+", "−"):
            for j in range(k):
                table.add_column(f"{sign}{j + 1}", no_wrap=True)
        cells = [digit_art(demo.images[demo.n_train + q])]
        for item in scores.top(row=q, k=k) + scores.bottom(row=q, k=k):
            cells.append(f"{digit_art(demo.images[item.index])}\n#{item.train_id}\n"
                         f"label {int(demo.y_train[item.index])}\n{item.score:+.3g}")
        table.add_row(*cells)
        console.print(table)
        drop = float(scores.removal_effect([a.train_id for a in scores.top(row=q, k=k)])[q])
        console.print(f"without those {k} proponents the margin would change by {drop:+.3g} (first-order "
                      f"prediction; the margin is now {float(margins[q]):.3g})")
    train_items, query_items = demo.items(queries)
    save_view(out, scores, train_items=train_items, query_items=query_items,
              title="sourcetrace demo: digits MLP, exact replay of its training",
              groups=[item["label"] for item in train_items])
    return out / "report.html"

"""The `digits-mlp` setting: scikit-learn's bundled digits, a fixed split, a small MLP trained by SGD.

Shared by the benchmark (which also retrains it on random halves of the training set for LDS) and the
demo. Everything is deterministic given the seeds, so a child process rebuilds the same setting.

Two splits: "tuning", the split every default was chosen on, and "reporting", where the defaults are
graded: its queries are images the tuning split never used (neither trained on nor queried), its training
set another random draw of the rest, and its model another initialisation and data order (`seed`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..demos.digits import load_digits, split_digits

SEEDS = {"tuning": 0, "reporting": 1}  # each split's attributed model: initialisation and data order

@dataclass
class DigitsSetting:
    """Data, model recipe and trained checkpoints of the digits benchmark."""

    n_train: int = 1000
    n_query: int = 100
    hidden: int = 128
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 64
    n_checkpoints: int = 5
    weight_decay: float = 1e-3
    split: str = "tuning"  # or "reporting" (see the module docstring)
    seed: int = 0  # of the attributed model's initialisation and data order
    x_train: torch.Tensor = field(init=False)
    y_train: torch.Tensor = field(init=False)
    x_query: torch.Tensor = field(init=False)
    y_query: torch.Tensor = field(init=False)
    images: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        digits = load_digits()
        n = len(digits.target)
        if self.n_train + self.n_query > n:
            raise ValueError(f"digits has {n} images; n_train + n_query must not exceed it")
        order = np.random.default_rng(0).permutation(n)  # the tuning split: train, then queries
        if self.split == "reporting":
            unused = order[self.n_train + self.n_query:]
            rng = np.random.default_rng(1)
            queries = rng.permutation(unused)[: self.n_query]
            if len(queries) < self.n_query:
                raise ValueError(f"the reporting split takes its {self.n_query} queries from the "
                                 f"{len(unused)} images the tuning split leaves unused; ask for fewer")
            rest = rng.permutation(np.setdiff1d(np.arange(n), queries))[: self.n_train]
            order = np.concatenate([rest, queries])
        elif self.split != "tuning":
            raise ValueError(f"split must be 'tuning' or 'reporting'; got {self.split!r}")
        (self.x_train, self.y_train, self.x_query, self.y_query,
         self.images) = split_digits(digits, order, self.n_train, self.n_query)

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    @property
    def queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_query, self.y_query

    def fingerprint(self) -> str:
        cfg: tuple = (self.n_train, self.n_query, self.hidden, self.epochs, self.lr, self.batch_size,
                      self.n_checkpoints, self.weight_decay)
        if (self.split, self.seed) != ("tuning", 0):  # added later: the tuning split keeps its fingerprint
            cfg += (self.split, self.seed)
        return hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def fit(self, indices: np.ndarray | None = None, seed: int = 0
            ) -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[float]]:
        """Train on `indices` (default: all); return the model, checkpoints and the lr at each."""
        idx = torch.as_tensor(np.arange(self.n_train) if indices is None else np.asarray(indices))
        x, y = self.x_train[idx], self.y_train[idx]
        model = self.model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        every = max(1, self.epochs // self.n_checkpoints)
        checkpoints: list[dict[str, torch.Tensor]] = []
        rates: list[float] = []
        for epoch in range(self.epochs):
            perm = torch.randperm(len(idx), generator=gen)
            for start in range(0, len(idx), self.batch_size):
                b = perm[start: start + self.batch_size]
                opt.zero_grad()
                F.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
            if (epoch + 1) % every == 0 and len(checkpoints) < self.n_checkpoints:
                checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
                rates.append(self.lr)
        return model.eval(), checkpoints, rates

    def train_fn(self, indices: np.ndarray, seed: int) -> nn.Module:
        # one thread: a model this small gains nothing from more, and loses a lot on a busy machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.fit(indices, seed)[0]
        finally:
            torch.set_num_threads(threads)

    def measure_fn(self, model: nn.Module) -> np.ndarray:
        """Query margins (the measurement every method attributes)."""
        with torch.no_grad():
            logits = model(self.x_query)
        correct = logits.gather(1, self.y_query[:, None]).squeeze(1)
        others = logits.scatter(1, self.y_query[:, None], float("-inf"))
        return (correct - torch.logsumexp(others, 1)).numpy()

    def trained(self, workdir: Path | None = None
                ) -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[float]]:
        """The model trained on the whole training set (seed `self.seed`), cached in `workdir` if given."""
        path = None if workdir is None else Path(workdir) / f"model-{self.fingerprint()}.pt"
        if path is not None and path.exists():
            saved = torch.load(path, weights_only=True)
            model = self.model(self.seed)
            model.load_state_dict(saved["final"])
            return model.eval(), saved["checkpoints"], saved["rates"]
        model, checkpoints, rates = self.fit(seed=self.seed)
        if path is not None:
            from ..artifacts import atomic_write

            data = {"final": model.state_dict(), "checkpoints": checkpoints, "rates": rates}
            atomic_write(path, lambda tmp: torch.save(data, tmp))
        return model, checkpoints, rates

"""Combination (how checkpoints combine) and PostProcess (what rescales scores): two of the four parts.

A score block of checkpoint c is s_c = -(P_c q_c)ᵀ g_c, multiplied column-wise by `columns[c]` (what turns
the stored rows into loss gradients, a stage mask, a cosine's 1/‖g‖); a Combination then sums
Σ_c w_c s_c (w_c a scalar, or a per-query weight with each s_c standardized per query), and a PostProcess
multiplies the sum column-wise by a statistic fitted on the training side. Every statistic here is fitted
with the method, so a query's scores never depend on which queries are scored with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data import Examples
from ..errors import InvalidOptionError
from ..grads.capture import evaluating
from ..tasks import CausalLMTask, ClassificationTask, Task, collate
from ..trajectory import Trajectory
from .base import at_checkpoint, load_state, to_device


class Combination:
    """One model (the Attributor's, or a single checkpoint) with weight 1."""

    name = "single"
    standardize = False  # z-score each checkpoint's scores per query before weighing (DDA)
    preconditions = True  # fit one preconditioner per checkpoint (SOURCE fits its own per segment)
    has_self_influence = True

    def __init__(self, options: Any):
        self.options = options

    def check(self) -> None:
        o = self.options
        if o.trajectory is not None:
            raise InvalidOptionError(f"combination={self.name!r} uses one model; trajectory= is for tracin, "
                                     "source, replay and dda=True")
        if o.checkpoints and len(o.checkpoints) > 1:
            raise InvalidOptionError("this method uses one model; for several checkpoints use "
                                     "method='tracin'")
        if o.learning_rates is not None:
            raise InvalidOptionError(f"learning_rates are TracIn's; combination={self.name!r} does not "
                                     "use them")

    def trajectory_options(self, trajectory: Trajectory, train: Examples) -> dict[str, Any]:
        return {"checkpoints": trajectory.checkpoint_states()}

    def states(self) -> list[dict[str, torch.Tensor] | None]:
        return [load_state(c) for c in self.options.checkpoints] if self.options.checkpoints else [None]

    def train_function(self, task: Any) -> Any:
        """What the stored rows are gradients of: the training loss (TRAK: the model output)."""
        return task.train_loss

    def fit_checkpoint(self, ctx: Any, c: int, model: Any, train: Examples) -> torch.Tensor | None:
        """Per-checkpoint statistics; returns the rows' Gauss-Newton weights (None: the rows are loss
        gradients)."""
        return None

    def fit(self, method: Any, ctx: Any, train: Examples) -> None:
        n = len(method.stores)
        self.weights: list[float] = [1.0] * n
        self.columns: list[torch.Tensor | None] = [None] * n

    def query_weights(self, method: Any, ctx: Any, queries: Examples) -> torch.Tensor | None:
        """Per-query weights [n_query, C] (DDA's fitting errors); None: the scalar weights."""
        return None

    def query_features(self, method: Any, ctx: Any, queries: Examples) -> list[torch.Tensor]:
        """Each checkpoint's preconditioned query rows."""
        return [method.precondition(c, method.query_rows(ctx, c, queries)) for c in range(len(method.stores))]


class LearningRateSum(Combination):
    """TracIn (Pruthi et al. 2020): Σ_c η_c s_c over checkpoints saved during training."""

    name = "tracin"

    def check(self) -> None:
        o = self.options
        if o.trajectory is None and (not o.checkpoints or o.learning_rates is None):
            raise InvalidOptionError("tracin needs checkpoints=[state_dict or path, ...] saved during "
                                     "training and learning_rates=[...] in force at each, or trajectory=... "
                                     "recorded with sourcetrace.TrajectoryRecorder")

    def trajectory_options(self, trajectory: Trajectory, train: Examples) -> dict[str, Any]:
        return trajectory.checkpoint_options("tracin")

    def fit(self, method: Any, ctx: Any, train: Examples) -> None:
        super().fit(method, ctx, train)
        self.weights = [float(lr) for lr in self.options.learning_rates]


class EnsembleMean(Combination):
    """TRAK's ensemble (Park et al. 2023, eq. 12): rows are gradients of the output f (the margin for
    classification, else -L), so ∇L_i = -Q_i ∇f_i with Q_i = 1 - p_i; the column factor is -Q̄_i (Q averaged
    over models, or each model's own with out_to_loss='per-model'), the models weigh 1/(C·n) (TRAK's scale:
    an example's weight in the summed loss) and the Gauss-Newton weights are R_i = Q_i(1 - Q_i)."""

    name = "ensemble"

    def check(self) -> None:
        if self.options.learning_rates is not None:
            raise InvalidOptionError("an ensemble weighs its models equally; leave learning_rates out "
                                     "(they are TracIn's)")

    def trajectory_options(self, trajectory: Trajectory, train: Examples) -> dict[str, Any]:
        return {"checkpoints": trajectory.checkpoint_options("tracin")["checkpoints"]}

    def train_function(self, task: Any) -> Any:
        if isinstance(task, ClassificationTask):
            return ClassificationTask("margin", task.input_key, task.target_key).measurement
        return lambda model, batch: -task.train_loss(model, batch)

    def fit_checkpoint(self, ctx: Any, c: int, model: Any, train: Examples) -> torch.Tensor | None:
        """Q_i = -∂L_i/∂f_i = σ(-margin_i) for classification (1 otherwise); returns R = Q(1 - Q)."""
        if c == 0:
            self.out_to_loss: list[torch.Tensor] = []
        if not isinstance(ctx.task, ClassificationTask):
            self.out_to_loss.append(torch.ones(len(train), dtype=torch.float64))
            return None
        margin = self.train_function(ctx.task)
        with torch.no_grad():
            q = torch.cat([torch.sigmoid(-margin(model, to_device(collate(ctx.task, items), model))).double()
                           .cpu() for _, items in train.batches(self.options.batch_size)])
        self.out_to_loss.append(q)
        return q * (1 - q)

    def fit(self, method: Any, ctx: Any, train: Examples) -> None:
        n = len(method.stores)
        mean = torch.stack(self.out_to_loss).mean(0)
        per_model = self.options.out_to_loss == "per-model"
        self.columns = [-(q if per_model else mean) for q in self.out_to_loss]
        self.weights = [1.0 / (n * len(train))] * n


class FittingError(Combination):
    """DDA's combination (this project's reading of Wu et al. 2024; see `methods.dda`): each checkpoint's
    scores z-scored per query, weighted by how far that checkpoint is from fitting the query (1 - p)."""

    name = "fitting-error"
    standardize = True
    has_self_influence = False

    def check(self) -> None:
        if self.options.learning_rates is not None:
            raise InvalidOptionError("dda=True weighs checkpoints by the queries' fitting errors; leave "
                                     "learning_rates out")

    def query_weights(self, method: Any, ctx: Any, queries: Examples) -> torch.Tensor:
        errors = []
        for state in method.states:
            with at_checkpoint(ctx.model, state) as model:
                errors.append(fitting_errors([model], ctx.task, queries.items,
                                             batch_size=self.options.batch_size)[:, 0])
        return torch.stack(errors, 1)



@torch.no_grad()
def fitting_errors(models: Sequence[nn.Module], task: Task, queries: Any, *, batch_size: int = 64
                   ) -> torch.Tensor:
    """How far each checkpoint is from fitting each query, [n_query, n_models], in [0, 1].

    1 − p for a log-probability measurement (CausalLMTask), 1 − σ(margin) for a classification margin;
    for other tasks 1 − exp(−max(0, −m)), i.e. 0 when the measurement is ≥ 0 (a fitted query).
    """
    examples = Examples(queries, None, name="queries")
    cols = []
    for model in models:
        with evaluating(model):
            vals = torch.cat([task.measurement(model, collate(task, items)).double().cpu()
                              for _, items in examples.batches(batch_size)])
        if isinstance(task, CausalLMTask):
            cols.append(1 - vals.exp())
        elif isinstance(task, ClassificationTask) and task.kind == "margin":
            cols.append(torch.sigmoid(-vals))
        else:
            cols.append(1 - torch.exp(-(-vals).clamp_min(0)))
    return torch.stack(cols, 1)


COMBINATIONS = {cls.name: cls for cls in (Combination, LearningRateSum, EnsembleMean, FittingError)}


# ---- post-processing --------------------------------------------------------------------------------

class Cosine:
    """grad-cos: unit-length query rows, and each checkpoint's columns divided by ‖g_c(i)‖."""

    def query(self, rows: torch.Tensor) -> torch.Tensor:
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def checkpoint_column(self, method: Any, c: int) -> torch.Tensor:
        return 1.0 / method.stores[c].sqnorms().sqrt().clamp_min(1e-12)


class RelatIF:
    """RelatIF (Barshan et al. 2020): each column divided by √(self-influence) of its training example."""

    def fit(self, method: Any, ctx: Any, train: Examples) -> torch.Tensor:
        influence = method.self_influence(ctx)
        return 1.0 / influence.double().clamp_min(1e-30).sqrt()


class DDANormalize:
    """DDA's train-side denoise: each column divided by its root-mean-square over a fixed reference set,
    fitted once so that one query scored alone gets the same scores as in any batch. The reference is
    `dda_reference`: queries like the ones to be scored, or a number of training examples (seeded), each
    example's own row then left out of its column."""

    def fit(self, method: Any, ctx: Any, train: Examples) -> torch.Tensor:
        reference = method.options.dda_reference
        if isinstance(reference, Examples):
            ref, idx = reference, []
        else:
            k = min(int(reference), len(train))
            gen = torch.Generator().manual_seed(method.options.seed)
            idx = sorted(torch.randperm(len(train), generator=gen)[:k].tolist())
            ref = Examples([train[i] for i in idx], ids=[train.ids[i] for i in idx], name="DDA reference")
        feats = method.query_features(ctx, ref)
        weights = method.combination.query_weights(method, ctx, ref)
        total = torch.zeros(len(train), dtype=torch.float64)
        count = torch.full((len(train),), float(len(ref)), dtype=torch.float64)
        rows = torch.tensor(idx, dtype=torch.long)
        for lo, hi, block in method.blocks(feats, weights, final=False):
            block = block.double()
            total[lo:hi] += block.pow(2).sum(0)
            own = (rows >= lo) & (rows < hi)  # leave each reference example's own row out of its column
            r, i = own.nonzero().flatten(), rows[own]
            total[i] -= block[r, i - lo].pow(2)
            count[i] -= 1
        return 1.0 / (total / count.clamp_min(1)).sqrt().clamp_min(1e-300)

"""DDA (Debias and Denoise Attribution; Wu et al., EMNLP 2024) as composable corrections of gradient scores.

DDA corrects influence scores of a fine-tuned model for two things: the knowledge its base model already had
(*debias*) and score differences that come only from how far training had fitted each example (*denoise*).
The paper's equations were not available to us, so each reading of that description is a function here,
measured on `sourcetrace bench facts-lm` (figures in benchmarks/facts-lm.md):

- `subtract(ft, base)`: scores at the fine-tuned model minus those at the base model. On facts new to the
  base model this *inverts* the ranking: the base model's gradients carry the signal, the fine-tuned
  model's (facts already fitted, p ≈ 1) are small, so the difference is mostly minus the signal.
- `project_out_base`: remove (or normalise by) the base model's query gradient at the fine-tuned model.
- scoring at the base or an early checkpoint: an Attributor on that checkpoint (nothing to add here).
- `combine(per_checkpoint, weights)`: the scores of several checkpoints, each standardized per query
  (so that no checkpoint dominates because its gradients happen to be large), weighted by the query's
  *fitting error* at that checkpoint (`fitting_errors`: 1 − p(completion)). A checkpoint where the query is
  already fitted has vanishing, noisy query gradients and gets weight ≈ 0; one where the model still has to
  learn it — the base model, for a fact that is new — gets weight ≈ 1.
- `normalize_train`: divide each training example's column by its scale across queries (train-side
  denoise: an example fitted less than others has larger gradients and would outscore them everywhere).

`dda=True` on a gradient method is this project's reading of the paper, not its published equations:
`combine` with fitting-error weights. With `dda_reference` (queries like the ones to be scored, or a number of
training examples) each column is then divided by its root-mean-square over that reference set, fixed when
fitting, so one query scored alone gets the scores it gets in any batch. Without it there is no train-side
normalisation: over training examples it lowered MRR on facts-lm's tuning setting. `dda(per_checkpoint,
errors)` here normalises over the rows it is given instead (an analysis tool for a fixed query set). The
figures of benchmarks/facts-lm.md and benchmarks/replay.md say which normalisation they were measured with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data import Examples
from ..errors import InvalidOptionError, ShapeError
from ..scores import Scores
from .gradient import reduce_blocks
from .parts import fitting_errors

#: `dda()`'s composition: fitting-error-weighted mean of per-query standardized checkpoint scores, each
#: training example's column then divided by its root-mean-square over the rows scored
DEFAULT = {"standardize": True, "weights": "fitting-error", "normalize_train": True}


def _dense(s: Scores) -> torch.Tensor:
    if s.matrix is None:
        raise ShapeError("DDA corrections need dense scores; score without top_k")
    return s.matrix.double()


def _like(template: Scores, matrix: torch.Tensor, what: str) -> Scores:
    return Scores(matrix, list(template.train_ids), list(template.query_ids), f"dda:{what}:{template.method}",
                  {**template.metadata, "dda": what})


def _same(a: Scores, b: Scores) -> None:
    if a.shape != b.shape or list(a.train_ids) != list(b.train_ids):
        raise ShapeError(f"scores of shape {a.shape} and {b.shape} (or different training ids) cannot be "
                         "combined; score the same queries against the same training data")


def zscore(matrix: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, divided by its standard deviation (a constant row becomes 0)."""
    m = matrix.double()
    centered = m - m.mean(1, keepdim=True)
    return centered / centered.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-300)


def standardize(scores: Scores) -> Scores:
    """Scores z-scored per query: the ranking of each query is unchanged, its scale made comparable."""
    return _like(scores, zscore(_dense(scores)), "standardize")


def subtract(ft: Scores, base: Scores, *, alpha: float = 1.0, standardize: bool = False) -> Scores:
    """Debias by subtraction: `ft − alpha · base` (each z-scored per query first if `standardize`)."""
    _same(ft, base)
    a, b = _dense(ft), _dense(base)
    if standardize:
        a, b = zscore(a), zscore(b)
    return _like(ft, a - alpha * b, "subtract")


def combine(per_checkpoint: Sequence[Scores], weights: torch.Tensor | Sequence[float] | None = None, *,
            standardize: bool = True) -> Scores:
    """Σ_c w_qc · S_c over checkpoints c (each S_c z-scored per query if `standardize`).

    `weights`: None (equal), one per checkpoint [C], or per query and checkpoint [n_query, C], e.g.
    `fitting_errors(...)`.
    """
    if not per_checkpoint:
        raise InvalidOptionError("combine needs the scores of at least one checkpoint")
    for s in per_checkpoint[1:]:
        _same(per_checkpoint[0], s)
    n_query, n_c = per_checkpoint[0].shape[0], len(per_checkpoint)
    w = torch.ones(n_c, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    if w.dim() == 1:
        w = w.expand(n_query, -1)
    if tuple(w.shape) != (n_query, n_c):
        raise ShapeError(f"weights of shape {tuple(w.shape)}; expected [{n_c}] or [{n_query}, {n_c}]")
    total = torch.zeros(per_checkpoint[0].shape, dtype=torch.float64)
    for c, s in enumerate(per_checkpoint):
        m = _dense(s)
        total += w[:, c:c + 1] * (zscore(m) if standardize else m)
    return _like(per_checkpoint[-1], total, "combine")


def column_rms_normalize(matrix: torch.Tensor) -> torch.Tensor:
    """Each column divided by its root-mean-square over the rows (a zero column stays 0)."""
    m = matrix.double()
    return m / m.pow(2).mean(0, keepdim=True).sqrt().clamp_min(1e-300)


def normalize_train(scores: Scores) -> Scores:
    """Train-side denoise: each column divided by its root-mean-square over the queries."""
    return _like(scores, column_rms_normalize(_dense(scores)), "normalize_train")


def query_features(attr: Any, queries: Any) -> list[torch.Tensor]:
    """A fitted Attributor's preconditioned query gradients, one [n_query, dim] per checkpoint."""
    return attr.method.query_features(attr.ctx, Examples(queries, None, name="queries"))


def score_features(attr: Any, feats: list[torch.Tensor], query_ids: Sequence[Any], what: str = "features"
                   ) -> Scores:
    """Scores of given (already preconditioned) query features against a fitted Attributor's store."""
    method = attr.method
    parts = reduce_blocks(method.blocks(feats), feats[0].shape[0], len(method.train_ids), None)
    return Scores(train_ids=method.train_ids, query_ids=list(query_ids), method=f"dda:{what}:{method.name}",
                  metadata={"dda": what}, **parts)


def project_out_base(ft: Any, base: Any, queries: Any, *, mode: str = "project") -> Scores:
    """Debias the fine-tuned model's query gradient q with the base model's, b, then score at `ft`.

    mode "project": q − (q·b / b·b) b, what the base model would already learn from the query's own
    gradient removed. mode "normalize": S_ft(q)/|q| − S_ft(b)/|b|, the difference of unit-length query
    directions (a query's own scale cancels). `ft` and `base` are fitted Attributors of one architecture.
    """
    if mode not in ("project", "normalize"):
        raise InvalidOptionError("mode must be 'project' or 'normalize'")
    q = query_features(ft, queries)
    b = query_features(base, queries)
    if len(q) != len(b) or any(x.shape != y.shape for x, y in zip(q, b)):
        raise ShapeError("base and fine-tuned query features differ in shape; use one architecture and "
                         "one method")
    if mode == "project":
        feats = [x - (x * y).sum(1, keepdim=True) / (y * y).sum(1, keepdim=True).clamp_min(1e-300) * y
                 for x, y in zip(q, b)]
    else:
        feats = [x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
                 - y / y.norm(dim=1, keepdim=True).clamp_min(1e-300) for x, y in zip(q, b)]
    ids = Examples(queries, None, name="queries").ids
    return score_features(ft, feats, ids, f"project_out_base:{mode}")


def dda(per_checkpoint: Sequence[Scores], errors: torch.Tensor, *, standardize: bool = True,
        normalize_train: bool = True) -> Scores:
    """DDA over a fixed query set: checkpoint scores (base model first) standardized per query and weighted by
    the query's fitting error at each checkpoint (`fitting_errors`), then each training example's column
    divided by its root-mean-square over these queries (`normalize_train`: it depends on the query set;
    `dda=True` on an Attributor normalises over a fixed `dda_reference` or not at all).

    The weights only carry signal when some checkpoints were taken while the queries' facts were being
    learned: record checkpoints densely early in fine-tuning (facts-lm uses a geometric schedule)."""
    out = _dense(combine(per_checkpoint, errors, standardize=standardize))
    return _like(per_checkpoint[-1], column_rms_normalize(out) if normalize_train else out, "default")


__all__ = ["DEFAULT", "column_rms_normalize", "combine", "dda", "fitting_errors", "normalize_train",
           "project_out_base", "query_features", "score_features", "standardize", "subtract", "zscore"]

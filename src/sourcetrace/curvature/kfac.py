"""Fisher curvatures: K-FAC, EK-FAC and the diagonal Fisher.

K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) approximates each hooked layer's
Fisher block by A ⊗ S, with A = E[a aᵀ] the covariance of the layer inputs (a constant-1 column appended
when the layer has a bias) and S = E[g gᵀ] that of the output gradients. Sequence and spatial positions
follow "K-FAC expand" (Eschenhagen et al. 2023), as kronfluence does: the per-example gradient is summed
over positions, A is averaged over positions and S over examples, so A ⊗ S keeps the scale of the
per-example Fisher. EK-FAC (George et al. 2018; Grosse et al. 2023) keeps K-FAC's eigenbasis
Q_A ⊗ Q_S and replaces its eigenvalues by Λ_ij = E[(Q_Sᵀ G Q_A)²_ij], G a per-example gradient. Parameters
outside hooked layers (LayerNorm, position embeddings, weights shared by two layers) get a diagonal
Fisher block E[g²]. Every statistic is a running sum over batches: memory does not grow with the data.

The Fisher is the true Fisher by default (labels sampled from the model with `task.sampled_loss`, a
generator seeded per batch), or the empirical Fisher (`fisher="empirical"`, the training labels).
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn
from torch.nn import functional as F

from .. import distributed
from ..artifacts import load_tensors, save_tensors
from ..errors import InvalidOptionError, NonFiniteError
from ..grads.capture import PerExampleFn, is_norm
from .base import CurvatureContext, Preconditioner, register_curvature

FISHERS = ("true", "empirical")

#: Default damping λ = DAMPING_FACTOR[curvature] × the mean eigenvalue of each block (one layer's Kronecker
#: block, or one parameter tensor's diagonal): λ = trace/dim, the block's average curvature, so directions
#: flatter than average are left near the identity. Chosen on digits-mlp (LDS vs 100 subsets × 3 seeds, true
#: Fisher): EK-FAC 0.61 at kronfluence's 0.1, 0.71 at 1, 0.72 at 2-3, 0.71 at 10 (empirical Fisher: best at
#: 1); the diagonal Fisher is flat at ≤1e-3 (0.52) and falls above.
DAMPING_FACTOR = {"kfac": 1.0, "ekfac": 1.0, "diagonal": 1e-3}


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "conv1d"  # transformers' Conv1D, the only other hookable layer


@dataclass
class _Block:
    """One hooked layer preconditioned with Kronecker factors; its weight seen as a matrix [out, in]."""

    layer: str
    kind: str
    module: nn.Module
    weight: str
    bias: str | None
    out: int
    inp: int  # input features, without the bias column
    a_sum: torch.Tensor | None = None  # [in', in'], or token counts [V] for an embedding
    a_count: float = 0.0
    s_sum: torch.Tensor | None = None
    s_count: float = 0.0
    lam_sum: torch.Tensor | None = None
    lam_count: float = 0.0
    qa: torch.Tensor | None = None  # None for an embedding: A is diagonal, its eigenbasis the identity
    ea: torch.Tensor | None = None
    qs: torch.Tensor | None = None
    es: torch.Tensor | None = None
    eig: torch.Tensor | None = None  # eigenvalues of the block in the Kronecker eigenbasis [out, in']
    damp: float = 0.0
    scale_in: torch.Tensor | None = None  # a diagonal preconditioner's square root ≈ scale_out scale_inᵀ
    scale_out: torch.Tensor | None = None
    kron: Any = None  # Kronecker features: the block is P_gᵀ G P_a, out = k_g and inp = k_a (bias folded in)
    kron_block: Any = None
    a_first: bool = False  # Kronecker features: the input side is the weight's first axis (Conv1D, Embedding)

    def matrix(self, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """Rows of flat weight (and bias) entries [n, ...] as gradient matrices [n, out, in']."""
        n = w.shape[0]
        if self.kind == "projected":
            return w.reshape(n, self.inp, self.out).transpose(1, 2) if self.a_first else \
                w.reshape(n, self.out, self.inp)
        if self.kind in ("linear", "conv2d"):
            m = w.reshape(n, self.out, self.inp)
        else:  # Conv1D weight [in, out]; Embedding weight [V, d] with V the "inputs"
            m = w.reshape(n, self.inp, self.out).transpose(1, 2)
        if b is not None:
            m = torch.cat([m, b.reshape(n, self.out, 1)], dim=2)
        return m

    def unmatrix(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of `matrix`: flat weight rows [n, out*in] and bias rows [n, out] (or None)."""
        n = m.shape[0]
        if self.kind == "projected":
            return (m.transpose(1, 2) if self.a_first else m).reshape(n, -1), None
        b = m[:, :, self.inp] if self.bias is not None else None
        w = m[:, :, : self.inp]
        if self.kind not in ("linear", "conv2d"):
            w = w.transpose(1, 2)
        return w.reshape(n, -1), b

    def per_example(self, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Inputs [B, P, in'] in float64 (an embedding: token ids [B, P]) and output gradients [B, P, out]
        per example and position P, and whether the layer has positions (sequence or spatial)."""
        m = self.module
        b = g.shape[0]
        if self.kind == "projected":
            pa, pg = self.kron.layer_rows(self.kron_block, self.layer, self.bias, self.a_first, a, g.double())
            return pa, pg, a.dim() > (2 if isinstance(m, nn.Linear) or _kind(m) == "conv1d" else 1)
        if self.kind == "conv2d":
            conv = cast(nn.Conv2d, m)
            # never a string here: hookable() sends string padding to the fallback
            padding = cast("tuple[int, ...]", conv.padding)
            cols = F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
            a3 = cols.transpose(1, 2)
            g3 = g.reshape(b, g.shape[1], -1).transpose(1, 2)
            positions = True
        elif self.kind == "embedding":
            a3, g3 = a.reshape(b, -1), g.reshape(b, -1, g.shape[-1])
            positions = a.dim() > 1
        else:
            a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
            positions = a.dim() > 2
        if self.kind != "embedding":
            a3 = a3.double()
            if self.bias is not None:
                a3 = torch.cat([a3, a3.new_ones(*a3.shape[:2], 1)], dim=2)
            if self.scale_in is not None:
                a3 = a3 * self.scale_in
        g3 = g3.double()
        if self.scale_out is not None:
            g3 = g3 * self.scale_out
        return a3, g3, positions

    def set_scale(self, m: torch.Tensor) -> None:
        """Precondition the block's gradients by m ([out, in'], positive) elementwise, approximated by the
        rank-one u vᵀ with log u_i + log v_j the least-squares fit of log m (so gradients stay Kronecker)."""
        logm = m.double().log()
        mean = logm.mean()
        self.scale_out = (logm.mean(1) - mean / 2).exp()
        self.scale_in = (logm.mean(0) - mean / 2).exp()

    def rows(self, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One row per (example, position): inputs [M, in'] (an embedding: token ids [M]), grads [M, out]."""
        a3, g3, positions = self.per_example(a, g)
        a2, g2 = a3.reshape(-1, *a3.shape[2:]), g3.reshape(-1, g3.shape[-1])
        keep = None
        if positions:  # positions with no output gradient (padding, masked tokens) carry no Fisher
            keep = g2.abs().amax(1) > 0
        pad_idx = cast(nn.Embedding, self.module).padding_idx if self.kind == "embedding" else None
        if pad_idx is not None:
            pad = a2 != pad_idx
            keep = pad if keep is None else keep & pad
        if keep is not None:
            a2, g2 = a2[keep], g2[keep]
        return a2, g2

    def rotated_squares(self, calls: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
        """Σ_n (Q_Sᵀ G_n Q_A)² over a batch, from the layer's inputs and output gradients per call.

        G_n = Σ_t g_t a_tᵀ, so Q_Sᵀ G_n Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ: rotating the vectors first costs
        (in² + out²) per position instead of in·out·(in + out) per example; with one position the square
        of an outer product is the outer product of squares, a single matmul.
        """
        assert self.qs is not None
        width = self.inp + (self.bias is not None and self.kind != "projected")
        rotated = [(a3, g3 @ self.qs) for a3, g3, _ in (self.per_example(a, g) for a, g in calls)]
        if self.kind == "embedding":
            return self._embedding_squares(rotated, n)
        rotated = [(a3 @ self.qa, g3) for a3, g3 in rotated] if self.qa is not None else rotated
        if len(rotated) == 1 and rotated[0][0].shape[1] == 1:
            a3, g3 = rotated[0]
            return g3[:, 0].pow(2).T @ a3[:, 0].pow(2)
        total = torch.zeros(n, self.out, width, dtype=torch.float64, device=self.qs.device)
        for a3, g3 in rotated:
            total += torch.einsum("bpo,bpi->boi", g3, a3)
        return total.pow(2).sum(0)

    def _embedding_squares(self, rotated: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
        """The same for an embedding (A diagonal, Q_A = I): rotated gradients scattered to their token rows,
        in chunks of examples so that [chunk, V, d] stays small for a large vocabulary."""
        assert self.qs is not None
        out = torch.zeros(self.inp, self.out, dtype=torch.float64, device=self.qs.device)
        chunk = max(1, 2**24 // (self.inp * self.out))
        pad = cast(nn.Embedding, self.module).padding_idx
        for lo in range(0, n, chunk):
            grad = torch.zeros(min(chunk, n - lo), self.inp, self.out, dtype=torch.float64, device=out.device)
            for ids, g3 in rotated:
                ids, g3 = ids[lo: lo + chunk], g3[lo: lo + chunk]
                grad.scatter_add_(1, ids[..., None].expand(-1, -1, self.out), g3)
            if pad is not None:
                grad[:, pad] = 0
            if self.scale_in is not None:
                grad *= self.scale_in[:, None]
            out += grad.pow(2).sum(0)
        return out.T

    def rotate(self, m: torch.Tensor) -> torch.Tensor:
        """Q_Sᵀ M Q_A for a stack of gradient matrices [n, out, in']."""
        assert self.qs is not None
        r = self.qs.T @ m
        return r if self.qa is None else r @ self.qa

    def unrotate(self, r: torch.Tensor) -> torch.Tensor:
        assert self.qs is not None
        m = self.qs @ r
        return m if self.qa is None else m @ self.qa.T


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise NonFiniteError(f"the Fisher statistics of {name} are NaN or infinite; check the model and the "
                             "data (e.g. a diverged checkpoint or inputs with NaN)")


@register_curvature("kfac")
class KFAC(Preconditioner):
    """K-FAC: each hooked layer's Fisher block ≈ A ⊗ S, inverted in the Kronecker eigenbasis.

    (A ⊗ S + λI)⁻¹ v = Q (diag(e_S e_Aᵀ) + λ)⁻¹ Qᵀ v with Q = Q_A ⊗ Q_S (Martens & Grosse 2015). Parameters
    outside hooked layers get a diagonal Fisher. damping: λ added to every eigenvalue, or damping_factor ×
    each block's mean eigenvalue (see DAMPING_FACTOR). fisher: "true" (labels sampled from the model) or
    "empirical" (training labels).
    """

    name = "kfac"
    FEATURES: ClassVar[tuple[str, ...]] = ("identity", "kronecker")
    corrected = False
    features: Any = None  # Kronecker features, when the blocks live in projected space
    diag_sum: dict[str, torch.Tensor]  # running Σ g² of the parameters outside hooked layers
    diag_count: float
    scales: dict[str, torch.Tensor] | None = None  # a preconditioner's square root (fit_average's scale)

    def __init__(self, damping: float | None = None, damping_factor: float | None = None,
                 fisher: str = "true"):
        if fisher not in FISHERS:
            raise InvalidOptionError(f"fisher must be one of {FISHERS}; got {fisher!r}")
        super().__init__(damping, damping_factor)
        self.fisher = fisher
        self.damping_factor = float(DAMPING_FACTOR[self.name] if damping_factor is None else damping_factor)
        self.fit_seconds = 0.0

    def _loss(self, ctx: CurvatureContext, index: int) -> PerExampleFn:
        """The per-example loss whose gradients' second moment is the Fisher, for batch number `index`."""
        if self.fisher == "empirical":
            return ctx.task.train_loss
        sampled = getattr(ctx.task, "sampled_loss", None)
        if sampled is None:
            raise InvalidOptionError(
                f"{type(ctx.task).__name__} has no sampled_loss(model, batch, generator), which the true "
                "Fisher needs; add one to the task or pass fisher='empirical'")
        # a generator per batch: every pass over the data draws the same labels for the same batch
        gen = torch.Generator().manual_seed((ctx.seed * 1_000_003 + index) % (2**63 - 1))
        return lambda model, batch: sampled(model, batch, gen)

    def _passes(self, ctxs: Sequence[CurvatureContext], desc: str
                ) -> Iterator[tuple[CurvatureContext, int, Any]]:
        """(context, batch index, batch) over every model's training data in turn."""
        from tqdm.auto import tqdm

        for ctx in ctxs:
            total = math.ceil(len(ctx.train) / ctx.batch_size)
            for index, batch in enumerate(tqdm(ctx.batches(), total=total, desc=desc, leave=False,
                                               disable=not ctx.progress)):
                yield ctx, index + ctx.batch_offset, batch

    def _mean_damping(self, eig: torch.Tensor) -> float:
        if self.damping is not None:
            return float(self.damping)
        mean = float(eig.mean()) if eig.numel() else 0.0
        return (self.damping_factor or 0.0) * mean if mean > 0 else 1e-8  # a factor is always set

    def _key(self, ctx: CurvatureContext) -> dict[str, Any]:
        from ..data import model_fingerprint
        from ..tasks import task_config

        kron = ctx.features if ctx.feature_kind() == "kronecker" else None
        return {"curvature": self.name, "fisher": self.fisher, "seed": ctx.seed,
                "model": model_fingerprint(ctx.model), "data": ctx.train.fingerprint(),
                "task": task_config(ctx.task), "params": list(ctx.capture.params),
                "features": None if kron is None else [kron.rank, kron.kind, kron.seed, sorted(kron.slices)]}

    def _cache(self, ctx: CurvatureContext) -> Path | None:
        return None if ctx.folder is None else Path(ctx.folder) / f"{self.name}.safetensors"

    def fit(self, ctx: CurvatureContext) -> None:
        self.fit_average([ctx], cache=True)

    def fit_average(self, contexts: Sequence[CurvatureContext], scale: dict[str, torch.Tensor] | None = None,
                    cache: bool = False) -> None:
        """Fit to the Fisher averaged over several models of one architecture (e.g. checkpoints): A and S
        averaged over them, one eigenbasis, eigenvalues (EK-FAC) averaged in it (SOURCE's segment
        curvature, Bae et al. 2024 §3.3). One model with `cache`: kept in and reused from `ctx.folder`.

        scale: {parameter name: positive tensor of its shape} s: fit the preconditioned Fisher
        diag(s) F diag(s) instead (SOURCE under Adam, s² the preconditioner), each block's s taken as its
        nearest rank-one (Kronecker) form; `scales` then holds the s actually used, flat per parameter.
        """
        start = time.perf_counter()
        if not contexts:
            raise InvalidOptionError("fit_average needs at least one model")
        # each context with its own shallow copy of the capture: torch.func cannot vmap a sampled loss, and
        # the capture's switch to its per-example loop must not stay on for the caller's later gradients
        ctxs = [replace(c, capture=copy.copy(c.capture)) for c in contexts]
        self.layout = {name: sl for name, _, sl in ctxs[0].layout()}
        for c in ctxs:  # settles which parameters need the fallback
            c.capture.per_example(c.task.train_loss, next(c.batches()))
        self._plan(ctxs[0])
        self.features = None
        if ctxs[0].feature_kind() == "kronecker":
            self._plan_projected(ctxs[0].features)
        self.scales = None
        if scale is not None:
            self._set_scales(scale)
        path = self._cache(ctxs[0]) if cache else None
        cached = load_tensors(path, self._key(ctxs[0])) if path is not None else None
        if not distributed.all_agree(cached is not None):  # under torchrun: refit only all together
            cached = None
        if cached is not None:
            self._load(cached)
        else:
            self._covariances(ctxs)
            self._all_reduce("a_sum", "s_sum", "a_count", "s_count")
            self._eigen()
            if self.corrected or self.diag_names:
                self._second_moments(ctxs)
                self._all_reduce("lam_sum", "lam_count")
            if path is not None:
                save_tensors(path, self._tensors(), self._key(ctxs[0]))
        self._finish()
        self.fit_seconds = time.perf_counter() - start

    # ---- which parameters get which block ------------------------------------------------------------
    def _plan(self, ctx: CurvatureContext) -> None:
        cap = ctx.capture
        hooked = {k: v for k, v in cap.owner.items() if v not in cap.fallback_names}
        uses = Counter(hooked.values())  # a weight tied between two layers has no Kronecker structure
        self.blocks: list[_Block] = []
        covered: set[str] = set()
        for (lname, local), pname in hooked.items():
            module = cap.layers[lname]
            if local != "weight" or uses[pname] > 1 or is_norm(module):  # norms: a diagonal block
                continue
            bname = hooked.get((lname, "bias"))
            bias = bname if bname is not None and uses[bname] == 1 else None
            kind = _kind(module)
            w = cast(torch.Tensor, module.weight)
            if kind in ("linear", "conv2d"):
                out, inp = w.shape[0], int(w[0].numel())
            else:
                inp, out = w.shape
            self.blocks.append(_Block(lname, kind, module, pname, bias, int(out), int(inp)))
            covered.update(n for n in (pname, bias) if n is not None)
        self.diag_names = [n for n in cap.params if n not in covered]
        self.device = next(iter(cap.params.values())).device
        self.diag_sum = {}
        self.diag_count = 0.0

    def _plan_projected(self, kron: Any) -> None:
        """Blocks in Kronecker-projected space: the factors of P_gᵀ G P_a are P_aᵀ A P_a and P_gᵀ S P_g, and
        EK-FAC's eigenvalues the second moments of projected gradients; a weight used by several layers
        (tied embeddings) gets a diagonal in feature space."""
        self.features = kron
        self.layout = dict(kron.slices)
        self.blocks, self.diag_names = [], []
        for kb in kron.blocks:
            if len(kb.layers) != 1:
                self.diag_names.append(kb.weight)
                continue
            layer, bias, a_first = kb.layers[0]
            a_side, g_side = (kb.axes[0], kb.axes[1]) if a_first else (kb.axes[1], kb.axes[0])
            self.blocks.append(_Block(layer, "projected", kron.capture.layers[layer], kb.weight, bias,
                                      g_side.k, a_side.k, kron=kron, kron_block=kb, a_first=a_first))

    def _set_scales(self, scale: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.layout if n not in scale]
        if missing:
            raise InvalidOptionError(f"the preconditioner has no entry for parameters {missing[:3]}")
        flat = {n: scale[n].detach().to(self.device, torch.float64).reshape(1, -1) for n in self.layout}
        if any(not bool((f > 0).all()) or not bool(torch.isfinite(f).all()) for f in flat.values()):
            raise InvalidOptionError("a preconditioner must be positive and finite")
        self.scales = {}
        for b in self.blocks:
            b.set_scale(b.matrix(flat[b.weight], flat[b.bias] if b.bias is not None else None)[0])
            assert b.scale_out is not None and b.scale_in is not None
            w, bias = b.unmatrix(torch.outer(b.scale_out, b.scale_in)[None])
            self.scales[b.weight] = w[0]
            if b.bias is not None:
                assert bias is not None
                self.scales[b.bias] = bias[0]
        for name in self.diag_names:
            self.scales[name] = flat[name][0]

    # ---- pass 1: covariances -------------------------------------------------------------------------
    def _covariances(self, ctxs: Sequence[CurvatureContext]) -> None:
        for b in self.blocks:
            width = b.inp + (b.bias is not None and b.kind != "projected")
            b.a_sum = torch.zeros(b.inp if b.kind == "embedding" else (width, width), dtype=torch.float64,
                                  device=self.device)
            b.s_sum = torch.zeros(b.out, b.out, dtype=torch.float64, device=self.device)
            b.a_count = b.s_count = 0.0
        for ctx, index, batch in self._passes(ctxs, f"{self.name} covariances"):
            io, values = ctx.capture.layer_io(self._loss(ctx, index), batch)
            n = values.shape[0]
            for b in self.blocks:
                assert b.a_sum is not None and b.s_sum is not None
                for a, g in io[b.layer]:
                    if a.shape[0] != n or g.shape[0] != n:
                        continue
                    a2, g2 = b.rows(a, g)
                    if b.kind == "embedding":
                        weights = None if b.scale_in is None else b.scale_in[a2].pow(2)
                        b.a_sum += torch.bincount(a2, weights, minlength=b.inp).to(b.a_sum)
                    else:
                        b.a_sum += a2.T @ a2
                    b.a_count += a2.shape[0]
                    b.s_sum += g2.T @ g2
                b.s_count += n

    def _all_reduce(self, *names: str) -> None:
        """Sum the blocks' running statistics `names` (and the diagonal blocks') over the processes of a
        torchrun: each rank has passed over its slice only. A no-op in one process."""
        if distributed.world()[1] == 1:
            return
        for b in self.blocks:
            for name in names:
                if getattr(b, name) is not None:
                    setattr(b, name, distributed.all_reduce_sum(getattr(b, name)))
        if "lam_sum" in names:
            for name in self.diag_names:
                distributed.all_reduce_sum(self.diag_sum[name])
            self.diag_count = distributed.all_reduce_sum(self.diag_count)

    def _eigen(self) -> None:
        """Eigendecompositions of A and S in float64; tiny negative eigenvalues (round-off) clipped to 0."""
        for b in self.blocks:
            assert b.a_sum is not None and b.s_sum is not None
            _check_finite(b.layer, b.a_sum, b.s_sum)
            a = b.a_sum / max(b.a_count, 1.0)
            s = b.s_sum / max(b.s_count, 1.0)
            if b.kind == "embedding":
                b.ea, b.qa = a, None
            else:
                ea, qa = torch.linalg.eigh(a)
                b.ea, b.qa = ea.clamp_min(0), qa
            es, qs = torch.linalg.eigh(s)
            b.es, b.qs = es.clamp_min(0), qs

    # ---- pass 2: per-example second moments (EK-FAC eigenvalues, diagonal blocks) ---------------------
    def _second_moments(self, ctxs: Sequence[CurvatureContext]) -> None:
        for b in self.blocks:
            width = b.inp + (b.bias is not None and b.kind != "projected")
            b.lam_sum, b.lam_count = torch.zeros(b.out, width, dtype=torch.float64, device=self.device), 0.0
        projected = self.features is not None
        self.diag_sum = {n: torch.zeros(self.layout[n].stop - self.layout[n].start, dtype=torch.float64,
                                        device=self.device) for n in self.diag_names}
        self.diag_count = 0.0
        desc = f"{self.name} eigenvalue correction" if self.corrected else f"{self.name} diagonal blocks"
        for ctx, index, batch in self._passes(ctxs, desc):
            if self.corrected:
                io, values = ctx.capture.layer_io(self._loss(ctx, index), batch)
                n = values.shape[0]
                for b in self.blocks:
                    assert b.lam_sum is not None
                    calls = [(a, g) for a, g in io[b.layer] if a.shape[0] == n and g.shape[0] == n]
                    b.lam_sum += b.rotated_squares(calls, n)
                    b.lam_count += n
            if self.diag_names and projected:  # rows of projected gradients, sliced per weight
                rows = self.features(self._loss(ctx, index), batch).double()
                grads = {name: rows[:, self.layout[name]] for name in self.diag_names}
            elif self.diag_names:  # the same labels: the loss of a batch is seeded by its index
                grads = ctx.capture.per_example(self._loss(ctx, index), batch)
            for name in self.diag_names:
                g = grads[name].detach().double().reshape(grads[name].shape[0], -1)
                if self.scales is not None:
                    g = g * self.scales[name].reshape(-1)
                self.diag_sum[name] += g.pow(2).sum(0)
            if self.diag_names:
                self.diag_count += next(iter(grads.values())).shape[0]

    # ---- damping and application --------------------------------------------------------------------
    def _finish(self) -> None:
        for b in self.blocks:
            if self.corrected:
                assert b.lam_sum is not None
                _check_finite(b.layer, b.lam_sum)
                b.eig = b.lam_sum / max(b.lam_count, 1.0)
            else:
                assert b.es is not None and b.ea is not None
                b.eig = torch.outer(b.es, b.ea)
            b.damp = self._mean_damping(b.eig)
        self.diag: dict[str, torch.Tensor] = {}
        self.diag_damp: dict[str, float] = {}
        for name in self.diag_names:
            self.diag[name] = d = self.diag_sum[name] / max(self.diag_count, 1.0)
            _check_finite(name, d)
            self.diag_damp[name] = self._mean_damping(d)

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """(F + λI)⁻¹ v per row: rotate into the Kronecker eigenbasis, divide, rotate back."""
        return self._spectral(vectors, lambda eig, damp: 1.0 / (eig + damp))

    def apply_fn(self, vectors: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """f(F) v per row, for an elementwise function f of the *undamped* eigenvalues (diagonal blocks: of
        E[g²]); e.g. SOURCE's exp(−ηKF) and (I − exp(−ηKF))F⁻¹ (Bae et al. 2024)."""
        return self._spectral(vectors, lambda eig, damp: fn(eig))

    def _spectral(self, vectors: torch.Tensor, scale: Callable[[torch.Tensor, float], torch.Tensor]
                  ) -> torch.Tensor:
        """Q diag(scale(eigenvalues, damping)) Qᵀ v per row, block by block."""
        v = vectors.to(device=self.device, dtype=torch.float64)
        if v.dim() != 2 or v.shape[1] != sum(sl.stop - sl.start for sl in self.layout.values()):
            from ..errors import ShapeError

            raise ShapeError(f"apply() takes flat gradient rows [n, dim]; got {tuple(vectors.shape)}")
        out = torch.empty_like(v)
        for b in self.blocks:
            assert b.eig is not None
            ws = self.layout[b.weight]
            bs = self.layout[b.bias] if b.bias is not None and b.kind != "projected" else None
            m = b.matrix(v[:, ws], v[:, bs] if bs is not None else None)
            w, bias = b.unmatrix(b.unrotate(b.rotate(m) * scale(b.eig, b.damp)))
            out[:, ws] = w
            if bs is not None:
                assert bias is not None  # unmatrix returns a bias row whenever the block has a bias
                out[:, bs] = bias
        for name in self.diag_names:
            sl = self.layout[name]
            out[:, sl] = v[:, sl] * scale(self.diag[name].reshape(-1), self.diag_damp[name])
        return out.to(device=vectors.device, dtype=vectors.dtype)

    # ---- cache -------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for b in self.blocks:
            for k in ("qa", "ea", "qs", "es"):
                if getattr(b, k) is not None:
                    t[f"{b.layer}/{k}"] = getattr(b, k)
            if self.corrected:
                assert b.lam_sum is not None
                t[f"{b.layer}/lam"] = b.lam_sum / max(b.lam_count, 1.0)
        for name in self.diag_names:
            t[f"diag/{name}"] = self.diag_sum[name] / max(self.diag_count, 1.0)
        return t

    def _load(self, t: dict[str, torch.Tensor]) -> None:
        for b in self.blocks:
            for k in ("qa", "ea", "qs", "es"):
                key = f"{b.layer}/{k}"
                setattr(b, k, t[key].to(self.device) if key in t else None)
            if self.corrected:
                b.lam_sum, b.lam_count = t[f"{b.layer}/lam"].to(self.device), 1.0
        self.diag_sum = {n: t[f"diag/{n}"].to(self.device) for n in self.diag_names}
        self.diag_count = 1.0


@register_curvature("ekfac")
class EKFAC(KFAC):
    """EK-FAC: K-FAC's eigenbasis with eigenvalues fitted to per-example gradients (George et al. 2018).

    Λ_ij = E[(Q_Sᵀ G Q_A)²_ij], the exact diagonal of the Fisher in the Kronecker eigenbasis.
    """

    name = "ekfac"
    corrected = True


@register_curvature("diagonal")
class DiagonalFisher(KFAC):
    """Diagonal Fisher: (diag E[g²] + λ)⁻¹ v, from per-example gradients of every selected parameter."""

    name = "diagonal"
    FEATURES = ("identity",)

    def _plan(self, ctx: CurvatureContext) -> None:
        super()._plan(ctx)
        self.blocks, self.diag_names = [], list(ctx.capture.params)

"""Diffusion models: a Task for ε-prediction networks, a small ε-network and deterministic samplers.

`DiffusionTask` makes a denoising model one more Task, so every gradient method runs on it unchanged:
the per-example training loss is the ε-MSE averaged over K fixed timesteps × noise draws, with the noise
of each (example id, timestep, draw) seeded from those three, so an example's loss is the same function
in every pass. Measurements: "loss" (minus that loss, TRAK), "square-norm" (minus the mean squared norm
of the predicted noise, D-TRAK, Zheng et al. 2023) and "x0" (how close each stored sampling step's x̂₀ is
to the final sample, Journey-TRAK style). Works with diffusers' `UNet2DModel` (and its schedulers) and
with plain ε-networks called as `model(x_t, t)` or `model(x_t, t, y)`.

The samplers (`sample`, DDIM with eta 0 or DDPM) take all their noise from a `StoredNoise`, so a sample
is a deterministic, differentiable function of the network: encoded ensembles resample with the same
noise to get counterfactuals and differentiate through it (`sourcetrace.ensembles`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import trange

from .errors import InvalidOptionError, ShapeError

MEASUREMENTS = ("loss", "square-norm", "x0")


# ---- noise schedules ----------------------------------------------------------------------------------
def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
                    ) -> torch.Tensor:
    """ᾱ_t of DDPM's linear β schedule (Ho et al. 2020; diffusers' `DDPMScheduler` default), float64 [T]."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def alphas_cumprod_of(scheduler: Any) -> torch.Tensor:
    """ᾱ_t [T] (float64) from a diffusers scheduler, or a 1-d tensor/array of them given directly."""
    values = getattr(scheduler, "alphas_cumprod", scheduler)
    out = torch.as_tensor(np.asarray(values, dtype=np.float64) if not isinstance(values, torch.Tensor)
                          else values.double())
    if out.dim() != 1 or out.numel() < 2 or not bool(((out > 0) & (out <= 1)).all()):
        raise ShapeError("give a diffusers scheduler or a 1-d tensor of ᾱ_t in (0, 1]; got "
                         f"{type(scheduler).__name__} of shape {tuple(out.shape)}")
    return out


def spaced_timesteps(k: int, num_timesteps: int) -> list[int]:
    """D-TRAK's K timesteps: `range(0, T, T // K)`."""
    if not 1 <= int(k) <= num_timesteps:
        raise InvalidOptionError(f"timesteps must be between 1 and {num_timesteps}; got {k}")
    return list(range(0, num_timesteps, num_timesteps // int(k)))[: int(k)]


# ---- ε-networks -----------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class EpsMLP(nn.Module):
    """A small ε-network: an MLP on the flattened image plus a timestep (and optional class) embedding.

    `forward(x, t, y=None)` takes x [..., *sample_shape] and t [...] with any leading axes, so that
    DiffusionTask can pass an example's K noised copies as one axis and per-layer hooks see one example.
    """

    def __init__(self, sample_shape: Sequence[int], hidden: int = 256, depth: int = 3,
                 num_classes: int | None = None, time_dim: int = 64):
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        dim = int(np.prod(self.sample_shape))
        self.time_dim = time_dim
        self.time = nn.Linear(time_dim, hidden)
        self.label = nn.Embedding(num_classes, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[: x.dim() - len(self.sample_shape)]
        h = self.inp(x.reshape(*lead, -1)) + self.time(timestep_embedding(t, self.time_dim).to(x.dtype))
        if self.label is not None and y is not None:
            h = h + self.label(y)
        for block in self.blocks:
            h = h + block(torch.nn.functional.silu(h))
        return self.out(torch.nn.functional.silu(h)).reshape(x.shape)


def is_diffusers_model(model: nn.Module) -> bool:
    """Whether `model` is a diffusers model (called on [N, C, H, W], returning an output with `.sample`)."""
    return type(model).__module__.startswith("diffusers")


def predict_eps(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                flatten: bool | None = None) -> torch.Tensor:
    """ε̂(x_t, t) for x_t [B, M, *shape] and t [B, M].

    diffusers models (and plain ones with `flatten=True`) get the B·M rows as one batch; other plain
    ε-networks get the [B, M, ...] layout as it is, so per-layer hooks see one example per batch row.
    """
    b, m = x_t.shape[:2]
    if flatten is None:
        flatten = is_diffusers_model(model)
    if not flatten:
        return model(x_t, t) if y is None else model(x_t, t, y)
    rows, tt = x_t.reshape(b * m, *x_t.shape[2:]), t.reshape(b * m)
    yy = None if y is None else y.reshape(b * m)
    if is_diffusers_model(model):
        out = model(rows, tt) if yy is None else model(rows, tt, class_labels=yy)
        out = out.sample if hasattr(out, "sample") else out
    else:
        out = model(rows, tt) if yy is None else model(rows, tt, yy)
    return out.reshape(x_t.shape)


# ---- the task -------------------------------------------------------------------------------------------
def example_noise(seed: int, example_id: Any, timestep: int, draw: int, shape: Sequence[int]) -> torch.Tensor:
    """The fixed noise of one (example id, timestep, draw): the same in every pass and process."""
    key = f"{seed}|{example_id!r}|{timestep}|{draw}".encode()
    g = torch.Generator().manual_seed(zlib.crc32(key) * 7919 + len(key))
    return torch.randn(tuple(shape), generator=g)


class DiffusionTask:
    """Denoising loss at K fixed timesteps × `noise_draws` fixed noises per example; see the module doc.

    Examples are dicts with the image under `input_key` (e.g. [C, H, W] in [-1, 1]), a stable id under
    `id_key` (the noise is seeded from it) and, for class-conditional models, the label under `label_key`;
    `diffusion_examples` builds them. `timesteps`: K (spaced as D-TRAK, `range(0, T, T // K)`) or the list
    itself; the default K=100 was chosen on the tuning split of benchmarks/diffusion-digits.md (each
    gradient method there did better at K=100 than at K=10 on both tuning query sets, EK-FAC on the loss
    best of all). `measurement`: "loss", "square-norm" or "x0" (queries then carry `trajectory`
    [S, *shape], the stored states x_t of their sampling run, and `steps` [S], their timesteps).
    `train_objective`: what the training-side gradients differentiate, "loss" (the ε-MSE, for every
    method) or "square-norm" (D-TRAK's repository uses the squared norm of the predicted noise for
    training images too; use it with trak).
    """

    def __init__(self, scheduler: Any, timesteps: int | Sequence[int] = 100, noise_draws: int = 1, *,
                 measurement: str = "loss", train_objective: str = "loss", seed: int = 0,
                 input_key: str = "x", id_key: str = "id", label_key: str = "y", flatten: bool | None = None):
        self.alphas_cumprod = alphas_cumprod_of(scheduler)
        total = self.alphas_cumprod.numel()
        steps = (spaced_timesteps(timesteps, total) if isinstance(timesteps, int)
                 else [int(t) for t in timesteps])
        if not steps or min(steps) < 0 or max(steps) >= total:
            raise InvalidOptionError(f"timesteps must be non-empty and lie in 0..{total - 1}; "
                                     f"got {steps[:5]}")
        if measurement not in MEASUREMENTS:
            raise InvalidOptionError(f"measurement must be one of {MEASUREMENTS}; got {measurement!r}")
        if train_objective not in ("loss", "square-norm"):
            raise InvalidOptionError("train_objective must be 'loss' or 'square-norm'; "
                                     f"got {train_objective!r}")
        if int(noise_draws) < 1:
            raise InvalidOptionError("noise_draws must be at least 1")
        self.timesteps, self.noise_draws, self.seed = steps, int(noise_draws), int(seed)
        self.kind, self.train_objective = measurement, train_objective
        self.input_key, self.id_key, self.label_key, self.flatten = input_key, id_key, label_key, flatten

    # ---- batches --------------------------------------------------------------------------------------
    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not all(isinstance(ex, Mapping) and self.input_key in ex and self.id_key in ex for ex in examples):
            raise ShapeError(f"DiffusionTask examples are dicts with {self.input_key!r} (the image) and "
                             f"{self.id_key!r} (a stable id); build them with diffusion_examples(images)")
        images = torch.stack([torch.as_tensor(ex[self.input_key]) for ex in examples])
        batch: dict[str, Any] = {self.input_key: images if images.is_floating_point() else images.float(),
                                 self.id_key: [_plain(ex[self.id_key]) for ex in examples]}
        if all(self.label_key in ex for ex in examples):
            batch[self.label_key] = torch.as_tensor([int(ex[self.label_key]) for ex in examples])
        for key in ("trajectory", "steps"):
            if all(key in ex for ex in examples):
                batch[key] = torch.stack([torch.as_tensor(ex[key]) for ex in examples])
        batch["noise"] = self.example_noises(batch[self.id_key], tuple(batch[self.input_key].shape[1:]))
        return batch

    def example_noises(self, ids: Sequence[Any], shape: tuple[int, ...]) -> torch.Tensor:
        """The fixed noises of these examples, [B, M, *shape]: draw d at timestep t seeded from (id, t, d)."""
        return torch.stack([torch.stack([example_noise(self.seed, i, t, d, shape) for t in self.timesteps
                                         for d in range(self.noise_draws)]) for i in ids])

    def noised(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t [B, M, *shape], t [B, M], noise [B, M, *shape]) with M = K × noise_draws."""
        x0 = batch[self.input_key]
        shape = tuple(x0.shape[1:])
        noise = batch["noise"] if "noise" in batch else self.example_noises(batch[self.id_key], shape)
        noise = noise.to(x0.device, x0.dtype)
        t = torch.tensor([t for t in self.timesteps for _ in range(self.noise_draws)],
                         device=x0.device).expand(x0.shape[0], -1)
        ab = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).reshape(*t.shape, *([1] * len(shape)))
        return ab.sqrt() * x0[:, None] + (1 - ab).sqrt() * noise, t, noise

    def _labels(self, batch: Mapping[str, Any], m: int) -> torch.Tensor | None:
        y = batch.get(self.label_key)
        return None if y is None else torch.as_tensor(y)[:, None].expand(-1, m)

    # ---- OutputTask: ε̂ and the losses computed from it -------------------------------------------------
    def outputs(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """ε̂ at the task's fixed (timestep, noise) pairs, [B, M, *shape]."""
        x_t, t, _ = self.noised(batch)
        return predict_eps(model, x_t, t, self._labels(batch, t.shape[1]), self.flatten)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.train_objective == "square-norm":
            return _mean_per_example(outputs.pow(2))
        _, _, noise = self.noised(batch)
        return _mean_per_example((outputs - noise).pow(2))

    def train_loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.loss_from_outputs(self.outputs(model, batch), batch)

    def sampled_loss(self, model: nn.Module, batch: Mapping[str, Any],
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The objective against targets drawn from the model, ε̂ + s·z with s² = n/2 for the n values averaged
        per example: its gradients' second moment is the Gauss-Newton matrix of the mean squared error."""
        out = self.outputs(model, batch)
        z = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        s = (out[0].numel() / 2) ** 0.5
        return _mean_per_example((out - (out.detach() + s * z)).pow(2))

    def measurement_from_outputs(self, outputs: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The measurement from ε̂ (for kind "loss" and "square-norm"); ensembles mix members' ε̂ here."""
        if self.kind == "square-norm":
            return -_mean_per_example(outputs.pow(2))
        if self.kind == "x0":
            raise InvalidOptionError("the 'x0' measurement needs the stored trajectory; call measurement()")
        _, _, noise = self.noised(batch)
        return -_mean_per_example((outputs - noise).pow(2))

    def measurement(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.kind != "x0":
            return self.measurement_from_outputs(self.outputs(model, batch), batch)
        if "trajectory" not in batch or "steps" not in batch:
            raise ShapeError("the 'x0' measurement needs queries with 'trajectory' [S, *shape] and 'steps' "
                             "[S] (the stored sampling states); see sample_trajectory")
        x_t, t = batch["trajectory"].to(batch[self.input_key].dtype), batch["steps"].long()
        eps = predict_eps(model, x_t, t, self._labels(batch, t.shape[1]), self.flatten)
        x0_hat = x0_from_eps(x_t, eps, t, self.alphas_cumprod)
        return -_mean_per_example((x0_hat - batch[self.input_key][:, None]).pow(2))

    def config(self) -> dict[str, Any]:
        return {"task": type(self).__name__, "measurement": self.kind,
                "train_objective": self.train_objective,
                "timesteps": self.timesteps, "noise_draws": self.noise_draws, "seed": self.seed,
                "schedule": float(self.alphas_cumprod.sum())}


def _mean_per_example(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).mean(1)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, (torch.Tensor, np.generic)) else value


def diffusion_examples(images: Any, labels: Any = None, ids: Sequence[Any] | None = None
                       ) -> list[dict[str, Any]]:
    """Images [N, *shape] (and optional class labels) as DiffusionTask examples with ids 0..N-1 by default."""
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    images = images if images.is_floating_point() else images.float()
    ids = list(range(len(images))) if ids is None else list(ids)
    if len(ids) != len(images):
        raise ShapeError(f"{len(ids)} ids for {len(images)} images")
    out = [{"x": images[i], "id": ids[i]} for i in range(len(images))]
    if labels is not None:
        for ex, y in zip(out, labels):
            ex["y"] = int(y)
    return out


# ---- training with subset-stable randomness ---------------------------------------------------------------
def train_eps_model(model: nn.Module, images: torch.Tensor, alphas_cumprod: Any, *, steps: int = 2000,
                    batch_size: int = 64, lr: float = 1e-3, seed: int = 0, labels: torch.Tensor | None = None,
                    keep: Sequence[int] | np.ndarray | None = None, checkpoints: Sequence[int] = (),
                    progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Train an ε-network with Adam (learning rate falling linearly to 0) on `images` [N, *shape] (all N,
    or only the indices in `keep`).

    At every step each of the N examples is in the minibatch with probability batch_size / N, with its own
    timestep and noise, all drawn from (seed, step) for the whole data set; the loss is the sum over the
    chosen examples divided by batch_size. So training on a subset, or without one example, changes only
    that example's terms: leave-one-out retraining is a clean counterfactual, not a new random run.
    Returns the state_dicts at the steps in `checkpoints` (for TracIn).
    """
    ab = alphas_cumprod_of(alphas_cumprod).float()
    n = images.shape[0]
    mask = torch.ones(n, dtype=torch.bool)
    if keep is not None:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.as_tensor(np.asarray(keep, dtype=np.int64))] = True
    p = min(1.0, batch_size / n)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # the learning rate falls linearly to 0: the last steps average out the minibatch noise (as an EMA would)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
    g = torch.Generator().manual_seed(int(seed))
    saved = []
    for step in trange(steps, desc="training", disable=not progress, leave=False):
        chosen = (torch.rand(n, generator=g) < p) & mask
        t = torch.randint(0, ab.numel(), (n,), generator=g)
        noise = torch.randn(images.shape, generator=g)
        idx = chosen.nonzero().squeeze(1)
        if idx.numel():
            a = ab[t[idx]].reshape(-1, *([1] * (images.dim() - 1)))
            x_t = a.sqrt() * images[idx] + (1 - a).sqrt() * noise[idx]
            y = None if labels is None else labels[idx][:, None]
            eps = predict_eps(model, x_t[:, None], t[idx][:, None], y)[:, 0]
            loss = (eps - noise[idx]).pow(2).reshape(idx.numel(), -1).mean(1).sum() / batch_size
            opt.zero_grad()
            loss.backward()
            opt.step()
        decay.step()
        if step + 1 in checkpoints:
            saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return saved


# ---- deterministic sampling -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredNoise:
    """All the randomness of a batch of samples: the start x_T [N, *shape] and DDPM's per-step noise."""

    start: torch.Tensor
    steps: torch.Tensor  # [S, N, *shape]; unused by DDIM

    @classmethod
    def draw(cls, n: int, shape: Sequence[int], num_steps: int, seed: int = 0) -> StoredNoise:
        g = torch.Generator().manual_seed(int(seed))
        return cls(torch.randn((n, *shape), generator=g), torch.randn((num_steps, n, *shape), generator=g))

    def __len__(self) -> int:
        return int(self.start.shape[0])


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sampling_timesteps(num_steps: int, num_timesteps: int) -> list[int]:
    """Descending timesteps with diffusers' "leading" spacing: (S-1)·T//S, ..., T//S, 0."""
    if not 1 <= num_steps <= num_timesteps:
        raise InvalidOptionError(f"num_steps must be between 1 and {num_timesteps}; got {num_steps}")
    return [i * (num_timesteps // num_steps) for i in range(num_steps)][::-1]


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
                ) -> torch.Tensor:
    """x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t, with t broadcast over the trailing image axes."""
    ab = alphas_cumprod.to(x_t.device)[t].to(x_t.dtype)
    ab = ab.reshape(*ab.shape, *([1] * (x_t.dim() - ab.dim())))
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def sample(eps_fn: EpsFn, noise: StoredNoise, scheduler: Any, *, kind: str = "ddim",
           num_steps: int | None = None, clip: float | None = None) -> torch.Tensor:
    """Deterministic reverse process from stored noise: DDIM (eta 0) or DDPM ("fixed small" variance).

    `eps_fn(x_t [N, *shape], t [N])` predicts the noise (a model, an ensemble mix, a closure with labels).
    `clip` clamps x̂₀ to [-clip, clip] (diffusers' clip_sample). No in-place updates, so the sample can be
    differentiated (torch.func.jvp) through it.
    """
    return sample_trajectory(eps_fn, noise, scheduler, kind=kind, num_steps=num_steps, clip=clip)[0]


def sample_trajectory(eps_fn: EpsFn, noise: StoredNoise, scheduler: Any, *, kind: str = "ddim",
                      num_steps: int | None = None, clip: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """`sample`, plus the states x_t [N, S, *shape] it passed through and their timesteps (for "x0")."""
    if kind not in ("ddim", "ddpm"):
        raise InvalidOptionError(f"kind must be 'ddim' or 'ddpm'; got {kind!r}")
    ab = alphas_cumprod_of(scheduler)
    total = ab.numel()
    num_steps = noise.steps.shape[0] if num_steps is None else int(num_steps)
    ts = sampling_timesteps(num_steps, total)
    if kind == "ddpm" and noise.steps.shape[0] < len(ts):
        raise ShapeError(f"DDPM with {len(ts)} steps needs {len(ts)} stored noises; "
                         f"got {noise.steps.shape[0]}")
    x = noise.start
    states = []
    for k, t in enumerate(ts):
        prev = t - total // num_steps
        a_t = float(ab[t])
        a_prev = float(ab[prev]) if prev >= 0 else 1.0
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        states.append(x)
        eps = eps_fn(x, tt)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip is not None:  # keep x̂₀ in the data range, and ε consistent with it
            x0 = x0.clamp(-clip, clip)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        if kind == "ddim":
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        else:
            beta = 1 - a_t / a_prev
            mean = ((math.sqrt(a_prev) * beta / (1 - a_t)) * x0
                    + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x)
            var = (1 - a_prev) / (1 - a_t) * beta
            x = mean + math.sqrt(max(var, 1e-20)) * noise.steps[k].to(x.dtype) if t > 0 else mean
    return x, torch.stack(states, 1), ts


def model_eps(model: nn.Module, labels: torch.Tensor | None = None, flatten: bool | None = None) -> EpsFn:
    """`eps_fn` for `sample` from one ε-network (diffusers or plain), optionally class-conditional."""
    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = None if labels is None else labels[:, None]
        return predict_eps(model, x[:, None], t[:, None], y, flatten)[:, 0]
    return eps_fn


def generated_examples(samples: torch.Tensor, trajectory: torch.Tensor | None = None,
                       steps: Sequence[int] | None = None, labels: Any = None, prefix: str = "gen"
                       ) -> list[dict[str, Any]]:
    """Generated samples as query examples (ids "gen-0", ...), with trajectories for the "x0" measurement."""
    out = diffusion_examples(samples.detach(), labels, [f"{prefix}-{i}" for i in range(len(samples))])
    if trajectory is not None and steps is not None:
        for i, ex in enumerate(out):
            ex["trajectory"] = trajectory[i].detach()
            ex["steps"] = torch.as_tensor(list(steps))
    return out

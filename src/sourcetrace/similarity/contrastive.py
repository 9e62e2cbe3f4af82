"""A contrastive audio encoder trained on the user's own corpus (the CLMR recipe), for users without weights.

Two augmented views of each clip (pitch shift, time stretch, noise at several SNRs, gain, filters,
reverb; see `augment.random_view`) are pulled together and every other clip of the batch pushed away by
the NT-Xent loss (SimCLR). The input is a log-magnitude constant-Q spectrogram (12 bins per octave, so a
transposition is a shift along frequency); a small CNN whose frequency axis is max-pooled away is close to
invariant to that shift, and coarse time pooling tolerates tempo changes. Retrieval uses the encoder's
output (before the projection head), as SimCLR recommends.

Augmented views are drawn once per clip (`views` of them, the clean clip is one more) and paired at random
during training: augmentation on one core costs more than the network.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidOptionError
from .augment import random_view
from .embedders import AudioEmbedder, state_hash, unit_rows


def log_cqt(clip: np.ndarray, sample_rate: int) -> np.ndarray:
    """Log-magnitude CQT [bins, frames] from C2, 12 bins per octave (up to 6 octaves below Nyquist), frames
    of about 128 ms, scaled so that its loudest bin is 0 dB and floored at −80 dB: the gain drops out."""
    import librosa

    fmin = librosa.note_to_hz("C2")
    octaves = int(min(6, np.log2(sample_rate / 2 / 1.1 / fmin)))
    hop = 2 ** (octaves - 1) * max(1, round(sample_rate / 16000 * 512 / 2 ** (octaves - 1)))
    c = np.abs(librosa.cqt(clip, sr=sample_rate, hop_length=hop, fmin=fmin, n_bins=12 * octaves))
    c = c[:, : c.shape[1] // 4 * 4].reshape(c.shape[0], -1, 4).mean(2)  # 128 ms frames: cheaper to train
    db = 20 * np.log10(np.maximum(c, 1e-8))
    return (np.maximum(db - db.max(), -80.0) / 80.0 + 1.0).astype(np.float32)


def _network(channels: tuple[int, ...], dim: int, segments: int, projection: int) -> Any:
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            c_in = 1
            for i, c in enumerate(channels):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
                if i < len(channels) - 1:
                    layers.append(nn.MaxPool2d(2))
                c_in = c
            self.conv = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool1d(segments)
            self.out = nn.Linear(c_in * segments, dim)
            self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, projection))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, bins, frames]
            h = self.conv(x[:, None]).amax(dim=2)  # max over frequency: transposition-tolerant
            return self.out(self.pool(h).flatten(1))

    return Encoder()


def nt_xent(z1: Any, z2: Any, temperature: float) -> Any:
    """NT-Xent (SimCLR): each view's partner is the positive among the 2B − 1 other views of the batch."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = len(z1)
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


class ContrastiveEncoder(AudioEmbedder):
    """`fit(clips)` trains the encoder on the corpus' clips; `embed` gives unit vectors of width `dim`."""

    name = "contrastive"

    def __init__(self, sample_rate: int = 16000, dim: int = 128, channels: tuple[int, ...] = (16, 32, 64),
                 segments: int = 4, projection: int = 64, views: int = 4, steps: int = 400, batch: int = 64,
                 temperature: float = 0.2, lr: float = 2e-3, seed: int = 0) -> None:
        if steps < 1 or batch < 2 or views < 1 or temperature <= 0:
            raise InvalidOptionError("the contrastive encoder needs steps >= 1, batch >= 2, views >= 1 and a "
                                     "positive temperature")
        super().__init__(sample_rate, dim=dim, channels=list(channels), segments=segments,
                         projection=projection, views=views, steps=steps, batch=batch,
                         temperature=temperature, lr=lr, seed=seed)
        self.net: Any = None
        self.losses: list[float] = []

    def _new_net(self) -> Any:
        import torch

        torch.manual_seed(self.config["seed"])
        c = self.config
        return _network(tuple(c["channels"]), c["dim"], c["segments"], c["projection"])

    def spectrograms(self, clips: np.ndarray) -> np.ndarray:
        return np.stack([log_cqt(c, self.sample_rate) for c in clips])

    def fit(self, corpus: Any, sample_rate: int | None = None, progress: bool = True) -> ContrastiveEncoder:
        """Train on the corpus' clips [N, samples]; views are augmented once, then paired at random."""
        import torch
        from tqdm.auto import tqdm

        clips = self.check(corpus, sample_rate)
        c = self.config
        rng = np.random.default_rng(c["seed"])
        bank = [self.spectrograms(clips)]
        for _ in tqdm(range(c["views"]), desc="augment", unit="view", disable=not progress):
            bank.append(self.spectrograms(np.stack([random_view(x, self.sample_rate, rng) for x in clips])))
        views = torch.from_numpy(np.stack(bank, axis=1))  # [N, V + 1, bins, frames]
        self.net = self._new_net()
        opt = torch.optim.Adam(self.net.parameters(), lr=c["lr"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c["lr"], total_steps=c["steps"])
        gen = torch.Generator().manual_seed(c["seed"])
        n, v = views.shape[:2]
        batch = min(c["batch"], n)
        self.net.train()
        self.losses = []
        for _ in tqdm(range(c["steps"]), desc="train contrastive", unit="step", disable=not progress):
            idx = torch.randperm(n, generator=gen)[:batch]
            a = torch.randint(0, v, (batch,), generator=gen)
            b = (a + torch.randint(1, v, (batch,), generator=gen)) % v  # a different view of the same clip
            loss = nt_xent(self.net.head(self.net(views[idx, a])), self.net.head(self.net(views[idx, b])),
                           c["temperature"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            self.losses.append(float(loss.detach()))
        self.net.eval()
        return self

    def fit_embed(self, corpus: Any, sample_rate: int | None = None) -> np.ndarray:
        return self.fit(corpus, sample_rate).embed(corpus, sample_rate)

    def embed(self, batch: Any, sample_rate: int | None = None) -> np.ndarray:
        import torch

        if self.net is None:
            raise InvalidOptionError("the contrastive encoder is not trained yet: call fit(clips) on the "
                                     "corpus first (build_audio_index does) or load a trained state")
        clips = self.check(batch, sample_rate)
        out = []
        with torch.no_grad():
            for start in range(0, len(clips), 256):
                spec = torch.from_numpy(self.spectrograms(clips[start:start + 256]))
                out.append(self.net(spec).numpy())
        return unit_rows(np.concatenate(out))

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.net is None:
            return {}
        return {k: v.detach().cpu().numpy().copy() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        import torch

        if not state:
            return
        self.net = self._new_net()
        self.net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        self.net.eval()

    @property
    def fingerprint(self) -> str:
        import json

        state = state_hash(self.state_dict()) if self.net is not None else "untrained"
        return f"{self.name}:{json.dumps(self.config, sort_keys=True)}:{state}"

"""Embedders: the `Embedder` protocol, the DSP audio features, and the registry that names them.

An embedder maps a batch of items (here: clips, `[N, samples]` at its `sample_rate`) to unit vectors
`[N, d]`, so that inner product is cosine similarity. `fit(corpus)` is optional: the DSP features use it
to standardise each dimension over the corpus (otherwise the largest statistics dominate the cosine); the
contrastive encoder trains on it. The `fingerprint` names the embedder, its settings and its fitted state:
an index refuses vectors made with any other.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import InvalidOptionError, require
from .clips import AudioError


@runtime_checkable
class Embedder(Protocol):
    """What the similarity index needs from a model of items."""

    name: str

    def embed(self, batch: Any) -> np.ndarray:
        """Unit vectors `[N, d]` (float32), one per item of the batch."""
        ...

    @property
    def fingerprint(self) -> str:
        """Changes whenever the vectors would change: name, settings, fitted state."""
        ...


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def state_hash(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()[:16]


class AudioEmbedder:
    """Base of the audio embedders: clip checks, optional per-dimension standardisation, fingerprint.

    Subclasses implement `features(clip) -> [d]`; `config` holds every setting that changes the vectors.
    """

    name = "audio"

    def __init__(self, sample_rate: int = 16000, **config: Any) -> None:
        self.sample_rate = int(sample_rate)
        self.config = {"sample_rate": self.sample_rate, **config}
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    # -- the protocol -------------------------------------------------------------------------------------
    def embed(self, batch: Any, sample_rate: int | None = None) -> np.ndarray:
        clips = self.check(batch, sample_rate)
        raw = np.stack([self.features(c) for c in clips]).astype(np.float64)
        if self.mean is not None and self.scale is not None:
            raw = (raw - self.mean) / self.scale
        return unit_rows(raw)

    def fit(self, corpus: Any, sample_rate: int | None = None) -> AudioEmbedder:
        """Standardise each dimension with its mean and deviation over the corpus' clips."""
        self.fit_embed(corpus, sample_rate)
        return self

    def fit_embed(self, corpus: Any, sample_rate: int | None = None) -> np.ndarray:
        """`fit(corpus)` then `embed(corpus)`, computing the features once."""
        raw = np.stack([self.features(c) for c in self.check(corpus, sample_rate)]).astype(np.float64)
        self.mean, self.scale = raw.mean(0), raw.std(0) + 1e-6 * (raw.std() + 1e-12)
        return unit_rows((raw - self.mean) / self.scale)

    @property
    def fingerprint(self) -> str:
        state = state_hash(self.state_dict()) if self.state_dict() else "unfitted"
        return f"{self.name}:{json.dumps(self.config, sort_keys=True)}:{state}"

    # -- persistence (the index stores its embedder) --------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        if self.mean is None or self.scale is None:
            return {}
        return {"mean": self.mean, "scale": self.scale}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            self.mean, self.scale = np.asarray(state["mean"]), np.asarray(state["scale"])

    # -- helpers ------------------------------------------------------------------------------------------
    def check(self, batch: Any, sample_rate: int | None) -> np.ndarray:
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            raise AudioError(f"clips sampled at {sample_rate} Hz given to the {self.name} embedder, which "
                             f"works at {self.sample_rate} Hz; resample them (librosa.resample) or make the "
                             f"embedder with sample_rate={sample_rate}")
        clips = np.asarray(batch, dtype=np.float32)
        if clips.ndim == 1:
            clips = clips[None]
        if clips.ndim != 2 or clips.shape[0] == 0:
            raise AudioError(f"the {self.name} embedder takes clips [N, samples]; got shape {clips.shape}")
        if clips.shape[1] < self.sample_rate // 4:
            raise AudioError(f"clips of {clips.shape[1]} samples are shorter than 0.25 s at "
                             f"{self.sample_rate} Hz; cut longer clips")
        return clips

    def features(self, clip: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class LogMelStats(AudioEmbedder):
    """Mean and deviation of each log-mel band over time: a timbre-and-register summary."""

    name = "logmel"

    def __init__(self, sample_rate: int = 16000, n_mels: int = 64) -> None:
        super().__init__(sample_rate, n_mels=n_mels)

    def features(self, clip: np.ndarray) -> np.ndarray:
        import librosa

        mel = librosa.feature.melspectrogram(y=clip, sr=self.sample_rate, n_mels=self.config["n_mels"])
        logmel = librosa.power_to_db(mel + 1e-10)
        return np.concatenate([logmel.mean(1), logmel.std(1)])


class MFCCStats(AudioEmbedder):
    """Mean and deviation of MFCCs and their deltas over time (the classic timbre feature)."""

    name = "mfcc"

    def __init__(self, sample_rate: int = 16000, n_mfcc: int = 20) -> None:
        super().__init__(sample_rate, n_mfcc=n_mfcc)

    def features(self, clip: np.ndarray) -> np.ndarray:
        import librosa

        mfcc = librosa.feature.mfcc(y=clip, sr=self.sample_rate, n_mfcc=self.config["n_mfcc"])
        delta = librosa.feature.delta(mfcc, width=min(9, mfcc.shape[1] // 2 * 2 - 1))
        return np.concatenate([mfcc.mean(1), mfcc.std(1), delta.std(1)])


def chroma(clip: np.ndarray, sample_rate: int, hop: int = 512) -> np.ndarray:
    """Constant-Q chroma [12, frames] of a clip."""
    import librosa

    octaves = int(min(7, np.log2(sample_rate / 2 / 1.1 / librosa.note_to_hz("C1"))))  # below Nyquist
    return librosa.feature.chroma_cqt(y=clip, sr=sample_rate, hop_length=hop, n_octaves=octaves)


class ChromaCQT(AudioEmbedder):
    """Constant-Q chroma resampled to `frames` time steps: harmony and its order within the clip."""

    name = "chroma"

    def __init__(self, sample_rate: int = 16000, frames: int = 12) -> None:
        super().__init__(sample_rate, frames=frames)

    def features(self, clip: np.ndarray) -> np.ndarray:
        c = chroma(clip, self.sample_rate)
        return resample_columns(c, self.config["frames"]).ravel()


def resample_columns(x: np.ndarray, n: int) -> np.ndarray:
    """`x [rows, t]` averaged into `n` equal time segments (linear interpolation when t < n)."""
    t = x.shape[1]
    if t >= n:
        edges = np.linspace(0, t, n + 1).round().astype(int)
        return np.stack([x[:, a:max(b, a + 1)].mean(1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
    grid = np.linspace(0, t - 1, n)
    return np.stack([np.interp(grid, np.arange(t), row) for row in x])


class Chroma2DFTM(AudioEmbedder):
    """Key- and tempo-invariant chroma: 2D Fourier magnitude of beat-synchronous chroma (the cover-song
    feature of Bertin-Mahieux & Ellis 2012).

    Chroma is averaged between beats (tempo drops out), resampled to `beats` columns, power-compressed, and
    the magnitude of its 2-D FFT is kept: a rotation of the 12 pitch classes (a transposition) or a circular
    shift in time changes only the phase.
    """

    name = "chroma2dftm"

    def __init__(self, sample_rate: int = 16000, beats: int = 8, power: float = 1.96) -> None:
        super().__init__(sample_rate, beats=beats, power=power)

    def features(self, clip: np.ndarray) -> np.ndarray:
        import librosa

        hop = 512
        c = chroma(clip, self.sample_rate, hop)
        _, frames = librosa.beat.beat_track(y=clip, sr=self.sample_rate, hop_length=hop, trim=False)
        frames = np.asarray(frames, dtype=int)
        if len(frames) >= 3:
            c = librosa.util.sync(c, frames.tolist(), aggregate=np.mean)
        return fourier_magnitude(resample_columns(c, self.config["beats"]), self.config["power"])


def fourier_magnitude(chroma_patch: np.ndarray, power: float = 1.96) -> np.ndarray:
    """|2-D FFT| of a power-compressed chroma patch [12, t]: unchanged by rotating its rows (a transposition)
    or its columns (a circular time shift)."""
    c = chroma_patch / max(float(chroma_patch.max()), 1e-9)
    mag = np.abs(np.fft.fft2(np.power(c, power)))
    # the magnitude of a real 2-D FFT is point-symmetric: half the time frequencies hold all of it
    return mag[:, : chroma_patch.shape[1] // 2 + 1].ravel()


DEFAULT_EMBEDDER = "chroma"  # no training, no weights; robust to timbre, tempo, noise and reverb (not pitch)

# name -> "module:class" (relative to this package); heavy models load only when named
EMBEDDERS: dict[str, str] = {
    "logmel": "embedders:LogMelStats",
    "mfcc": "embedders:MFCCStats",
    "chroma": "embedders:ChromaCQT",
    "chroma2dftm": "embedders:Chroma2DFTM",
    "contrastive": "contrastive:ContrastiveEncoder",
    "clap": "pretrained:ClapEmbedder",
    "mert": "pretrained:MertEmbedder",
}


def embedder_class(name: str) -> type:
    import importlib

    if name not in EMBEDDERS:
        raise InvalidOptionError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")
    module, cls = EMBEDDERS[name].split(":")
    require("librosa", "audio")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def make_embedder(name: str, **config: Any) -> Any:
    """An embedder by registry name with its settings (e.g. `make_embedder("mfcc", sample_rate=22050)`)."""
    cls = embedder_class(name)
    try:
        return cls(**config)
    except TypeError as exc:
        raise InvalidOptionError(f"the {name} embedder does not take these settings ({exc})") from None

"""Audio in, clips out: reading files, cutting tracks into overlapping windows, and per-track aggregation.

Attribution by similarity compares short clips (3 s by default, a new one every 1.5 s, as Barnett et al.
do for generated music) and then summarises clip pairs per training track: the best pair (`max`, "some
moment of this track was copied") and the mean over all pairs (`mean`, "this track resembles the query
throughout"). The offsets of the best pair are kept so that a report can play both moments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SourcetraceError

SILENCE_DBFS = -60.0  # a clip whose RMS is below this is silence, and is not indexed or queried
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".opus")


class AudioError(SourcetraceError, ValueError):
    """Audio that cannot be read, is silent, is shorter than a clip, or has another sample rate."""


@dataclass(frozen=True)
class ClipWindows:
    """How tracks are cut: windows of `seconds`, one starting every `hop` seconds."""

    seconds: float = 3.0
    hop: float = 1.5

    def __post_init__(self) -> None:
        if not (self.seconds > 0 and self.hop > 0):
            raise AudioError(f"clip windows need positive lengths; got seconds={self.seconds}, "
                             f"hop={self.hop}")

    def length(self, sample_rate: int) -> int:
        return int(round(self.seconds * sample_rate))

    def cut(self, audio: np.ndarray, sample_rate: int, *, name: str = "the audio",
            drop_silent: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Clips `[n, length]` and their start offsets in seconds; the last window ends at the track's end.

        Silent windows are dropped; a track shorter than one window, or silent throughout, is an error.
        """
        audio = as_mono(audio, name)
        n, length = len(audio), self.length(sample_rate)
        if n < length:
            raise AudioError(f"{name} lasts {n / sample_rate:.2f} s, shorter than one {self.seconds:g} s "
                             "clip; "
                             "give a longer recording or a shorter window (--clip-seconds)")
        hop = max(1, int(round(self.hop * sample_rate)))
        starts = list(range(0, n - length + 1, hop))
        if starts[-1] + length < n:
            starts.append(n - length)
        clips = np.stack([audio[s:s + length] for s in starts]).astype(np.float32)
        offsets = np.asarray(starts, dtype=np.float64) / sample_rate
        if drop_silent:
            loud = rms_dbfs(clips) > SILENCE_DBFS
            if not loud.any():
                raise AudioError(f"{name} is silent (every clip is below {SILENCE_DBFS:g} dBFS); "
                                 "nothing to compare")
            clips, offsets = clips[loud], offsets[loud]
        return clips, offsets


def rms_dbfs(clips: np.ndarray) -> np.ndarray:
    """Root-mean-square level of each row, in dB relative to full scale."""
    rms = np.sqrt(np.mean(np.square(clips, dtype=np.float64), axis=-1))
    return 20 * np.log10(np.maximum(rms, 1e-12))


def as_mono(audio: np.ndarray, name: str = "the audio") -> np.ndarray:
    """1-D float32 samples; [channels, n] or [n, channels] arrays are mixed down."""
    a = np.asarray(audio)
    if a.ndim == 2:
        a = a.mean(axis=0 if a.shape[0] < a.shape[1] else 1)
    if a.ndim != 1 or a.size == 0:
        raise AudioError(f"{name} must be a 1-D array of samples; got shape {np.asarray(audio).shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise AudioError(f"{name} must hold numbers; got dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise AudioError(f"{name} holds NaN or infinite samples")
    return a


def load_audio(path: str | os.PathLike, sample_rate: int | None = None, *,
               resample: bool = False) -> tuple[np.ndarray, int]:
    """Mono samples of an audio file and its sample rate.

    With `sample_rate`, a file at another rate is an error unless `resample` is set (then librosa
    resamples it), so that an index never mixes rates by accident.
    """
    import soundfile as sf

    path = Path(path)
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises its own LibsndfileError, RuntimeError or TypeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AudioError(f"cannot read audio file {str(path)!r} ({reason}); give a WAV, FLAC or OGG file") \
            from None
    audio = as_mono(audio.T, repr(str(path)))
    if sample_rate is not None and rate != sample_rate:
        if not resample:
            raise AudioError(f"{str(path)!r} is sampled at {rate} Hz but {sample_rate} Hz is expected; "
                             "convert it, or pass --resample (resample=True) to resample it")
        import librosa

        audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate).astype(np.float32)
        rate = sample_rate
    return audio, int(rate)


def audio_files(folder: str | os.PathLike) -> list[Path]:
    """The audio files under `folder` (recursively), sorted, so that an index's order is reproducible."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise AudioError(f"{str(folder)!r} is neither an audio file nor a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise AudioError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {str(folder)!r}")
    return files


@dataclass(frozen=True)
class TrackMatch:
    """A training track's similarity to a query track, with the offsets (s) of the best clip pair."""

    track: str
    score: float
    query_offset: float
    train_offset: float


def aggregate_tracks(query: np.ndarray, query_offsets: np.ndarray, train: np.ndarray, train_tracks: list[str],
                     train_offsets: np.ndarray, how: str = "max") -> list[TrackMatch]:
    """Per training track, the `max` or `mean` cosine over all (query clip, track clip) pairs, best first.

    `query` [m, d] and `train` [n, d] are unit vectors; the best pair's offsets are kept either way.
    """
    if how not in ("max", "mean"):
        raise AudioError(f"aggregation must be 'max' or 'mean', not {how!r}")
    sims = query @ train.T  # [m, n]
    tracks = np.asarray(train_tracks)
    out = []
    for track in dict.fromkeys(train_tracks):
        cols = np.flatnonzero(tracks == track)
        block = sims[:, cols]
        qi, tj = np.unravel_index(int(np.argmax(block)), block.shape)
        score = float(block.max() if how == "max" else block.mean())
        out.append(TrackMatch(str(track), score, float(query_offsets[qi]), float(train_offsets[cols[tj]])))
    return sorted(out, key=lambda m: -m.score)

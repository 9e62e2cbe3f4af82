"""Audio perturbations: the augmentations the contrastive encoder learns to ignore, and the changes that the
robustness benchmark applies to training clips (pitch shift, time stretch, noise at an SNR, reverb, gain,
filters). librosa for pitch and tempo, numpy and scipy for the rest."""

from __future__ import annotations

import numpy as np


def pitch_shift(x: np.ndarray, sample_rate: int, semitones: float) -> np.ndarray:
    """Transpose by `semitones`, same duration (phase vocoder + resampling)."""
    import librosa

    if semitones == 0:
        return x
    return librosa.effects.pitch_shift(x, sr=sample_rate, n_steps=semitones).astype(np.float32)


def time_stretch(x: np.ndarray, rate: float) -> np.ndarray:
    """Play `rate` times faster (rate 1.1: 10 % faster and shorter), same pitch."""
    import librosa

    if rate == 1:
        return x
    return librosa.effects.time_stretch(x, rate=rate).astype(np.float32)


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator, colour: str = "white") -> np.ndarray:
    """Add white or pink noise at a signal-to-noise ratio of `snr_db` decibels."""
    noise = rng.standard_normal(len(x))
    if colour == "pink":  # 1/f power: scale the spectrum by 1/sqrt(f)
        spec = np.fft.rfft(noise)
        spec /= np.sqrt(np.maximum(np.arange(len(spec)), 1))
        noise = np.fft.irfft(spec, n=len(x))
    p_signal = float(np.mean(np.square(x, dtype=np.float64))) + 1e-12
    p_noise = float(np.mean(np.square(noise))) + 1e-12
    return (x + noise * np.sqrt(p_signal / p_noise / 10 ** (snr_db / 10))).astype(np.float32)


def reverb(x: np.ndarray, sample_rate: int, rng: np.random.Generator, rt60: float = 0.6,
           wet: float = 0.5) -> np.ndarray:
    """Convolve with a synthetic room: exponentially decaying noise reaching −60 dB after `rt60` seconds."""
    from scipy.signal import fftconvolve

    n = max(1, int(rt60 * sample_rate))
    t = np.arange(n) / sample_rate
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    ir[0] = 0.0
    ir /= np.sqrt(np.sum(ir ** 2)) + 1e-12
    tail = fftconvolve(x, ir)[: len(x)]
    out = (1 - wet) * x + wet * tail * (np.std(x) / (np.std(tail) + 1e-12))
    return out.astype(np.float32)


def gain(x: np.ndarray, db: float) -> np.ndarray:
    return (x * 10 ** (db / 20)).astype(np.float32)


def band_filter(x: np.ndarray, sample_rate: int, kind: str, cutoff: float) -> np.ndarray:
    """A 4th-order Butterworth low-pass or high-pass at `cutoff` Hz."""
    from scipy.signal import butter, sosfilt

    sos = butter(4, min(cutoff, 0.45 * sample_rate), btype="low" if kind == "low" else "high",
                 fs=sample_rate, output="sos")
    return sosfilt(sos, x).astype(np.float32)


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Centre-crop or zero-pad to `n` samples (a stretched clip back to the window length)."""
    if len(x) >= n:
        start = (len(x) - n) // 2
        return x[start:start + n]
    pad = n - len(x)
    return np.pad(x, (pad // 2, pad - pad // 2))


def random_view(x: np.ndarray, sample_rate: int, rng: np.random.Generator, *, max_semitones: float = 2.5,
                stretch: tuple[float, float] = (0.85, 1.18), snr_db: tuple[float, float] = (-3.0, 30.0)
                ) -> np.ndarray:
    """One random augmented view of a clip, with the CLMR recipe's kinds and roughly its probabilities:
    pitch shift p .6, time stretch p .6, filter p .5, reverb p .4, noise p .6, gain p .5."""
    n = len(x)
    if rng.random() < 0.6:
        x = pitch_shift(x, sample_rate, float(rng.uniform(-max_semitones, max_semitones)))
    if rng.random() < 0.6:
        x = fit_length(time_stretch(x, float(np.exp(rng.uniform(*np.log(stretch))))), n)
    if rng.random() < 0.5:
        kind = "low" if rng.random() < 0.5 else "high"
        cutoff = rng.uniform(1500, 5000) if kind == "low" else rng.uniform(80, 500)
        x = band_filter(x, sample_rate, kind, cutoff)
    if rng.random() < 0.4:
        x = reverb(x, sample_rate, rng, rt60=float(rng.uniform(0.2, 1.2)), wet=float(rng.uniform(0.2, 0.7)))
    if rng.random() < 0.6:
        x = add_noise(x, float(rng.uniform(*snr_db)), rng, "pink" if rng.random() < 0.3 else "white")
    if rng.random() < 0.5:
        x = gain(x, float(rng.uniform(-12, 6)))
    return np.asarray(x, dtype=np.float32)

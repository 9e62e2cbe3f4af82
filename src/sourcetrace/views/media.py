"""Table rows and audio clips of classifier items, in the JSON the front end draws.

A row becomes `{"columns": [...], "values": [...]}` (a list of pairs keeps the column order, which a JSON
object with numeric-looking keys would not). A clip becomes a 16-bit PCM WAV file inlined as a
`data:audio/wav;base64,...` URI, so that a report plays it offline; clips are cut to `MAX_AUDIO_SECONDS`.
"""

from __future__ import annotations

import base64
import io
import math
import os
import warnings
import wave
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ShapeError

MAX_AUDIO_SECONDS = 30.0
WAV_URI = "data:audio/wav;base64,"


# ---- table rows ------------------------------------------------------------------------------------------
def cell_json(v: Any) -> Any:
    """One cell as a JSON value: numbers stay numbers (6 significant digits), non-finite ones become text."""
    if isinstance(v, (torch.Tensor, np.generic)) and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else str(v)
    return str(v)


def row_json(row: Any, columns: Sequence[Any] | None = None) -> dict[str, Any]:
    """A table row (a dict column -> value, a pandas Series, or a list aligned with `columns`)."""
    if isinstance(row, (torch.Tensor, np.ndarray)):
        row = row.tolist()
    if isinstance(row, Mapping) or (hasattr(row, "items") and not isinstance(row, (str, bytes))):
        pairs = list(row.items())
    elif isinstance(row, Sequence) and not isinstance(row, (str, bytes)):
        if columns is None:
            names: Sequence[Any] = [str(i) for i in range(len(row))]
        elif len(columns) != len(row):
            raise ShapeError(f"a row has {len(row)} values but columns= names {len(columns)}; "
                             "give one column name per value, in order")
        else:
            names = columns
        pairs = list(zip(names, row))
    else:
        raise ShapeError(f"a row must be a dict of column -> value or a list aligned with columns=; "
                         f"got {type(row).__name__}")
    return {"columns": [str(c) for c, _ in pairs], "values": [cell_json(v) for _, v in pairs]}


# ---- audio -----------------------------------------------------------------------------------------------
def audio_json(audio: Any, sample_rate: Any = None, *, max_seconds: float = MAX_AUDIO_SECONDS,
               start: Any = None) -> dict[str, Any]:
    """A clip as `{"src": data URI of a WAV file, "seconds", "sample_rate", "truncated"?, "start"?}`.

    `audio` is a 1-D array of samples (floats in [-1, 1], or int16) with `sample_rate`; a WAV file's path or
    bytes (or a `data:audio/wav;base64,` URI); or a dict like Hugging Face's `{"array", "sampling_rate"}`.
    Clips longer than `max_seconds` are cut to that length, with a warning, and marked `truncated`.
    `start` (seconds into the clip) is where the player starts, e.g. the moment a similarity search matched.
    """
    if start is not None:
        out = audio_json(audio, sample_rate, max_seconds=max_seconds)
        try:
            at = float(start)
        except (TypeError, ValueError):
            raise ShapeError(f"an audio item's start must be a number of seconds; got {start!r}") from None
        if not (math.isfinite(at) and 0 <= at < out["seconds"]):
            raise ShapeError(f"an audio item's start of {start!r} s is outside its clip of {out['seconds']} s"
                             f"{' (cut to that length)' if 'truncated' in out else ''}; give a start from 0 "
                             "up to the clip's length, or cut the clip around the moment")
        return {**out, "start": round(at, 3)}
    if isinstance(audio, Mapping):
        rate = audio.get("sampling_rate", audio.get("sample_rate", sample_rate))
        if audio.get("array") is not None:
            return audio_json(audio["array"], rate, max_seconds=max_seconds)
        if audio.get("bytes") is not None or audio.get("path") is not None:
            return audio_json(audio.get("bytes") or audio["path"], rate, max_seconds=max_seconds)
        raise ShapeError("an audio dict needs `array` (with `sampling_rate`), `bytes` or `path`")
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return _wav_json(bytes(audio), "the audio bytes", max_seconds)
    if isinstance(audio, str) and audio.startswith(WAV_URI):
        return _wav_json(base64.b64decode(audio[len(WAV_URI):]), "the audio data URI", max_seconds)
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not path.is_file():
            raise ShapeError(f"audio file {str(path)!r} does not exist")
        return _wav_json(path.read_bytes(), str(path), max_seconds)
    return _samples_json(audio, sample_rate, max_seconds)


def _samples_json(audio: Any, sample_rate: Any, max_seconds: float) -> dict[str, Any]:
    if sample_rate is None:
        raise ShapeError("audio samples need a sample rate: give the item a `sample_rate` key (in Hz)")
    rate = int(sample_rate)
    if rate <= 0 or rate != float(sample_rate):
        raise ShapeError(f"sample_rate must be a positive whole number of Hz; got {sample_rate!r}")
    a = np.asarray(audio.detach().cpu() if isinstance(audio, torch.Tensor) else audio)
    if a.ndim > 1 and sum(d > 1 for d in a.shape) <= 1:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ShapeError(f"audio samples must be 1-D (one channel); got shape {a.shape}: mix the channels "
                         "down first, e.g. audio.mean(axis=0)")
    if a.dtype == np.int16:
        pcm = a
    elif np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating) or a.dtype == bool:
        f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=-1.0)
        pcm = np.round(np.clip(f, -1.0, 1.0) * 32767).astype(np.int16)  # floats outside [-1, 1] clip
    else:
        raise ShapeError(f"audio samples must be numbers; got dtype {a.dtype}")
    total = len(pcm)
    keep = _keep_frames(total, rate, max_seconds, "audio samples")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm[:keep].astype("<i2").tobytes())
    return _out(buf.getvalue(), keep, total, rate)


def _wav_json(data: bytes, what: str, max_seconds: float) -> dict[str, Any]:
    try:
        with wave.open(io.BytesIO(data), "rb") as r:
            params = r.getparams()
            keep = _keep_frames(params.nframes, params.framerate, max_seconds, what)
            if keep < params.nframes:  # rewrite the first `keep` frames as they are
                frames = r.readframes(keep)
                buf = io.BytesIO()
                with wave.open(buf, "wb") as w:
                    w.setparams(params)
                    w.writeframes(frames)
                data = buf.getvalue()
    except (wave.Error, EOFError) as exc:
        raise ShapeError(f"{what} is not a PCM WAV file the report can embed ({exc}); convert it to 16-bit "
                         "PCM WAV, or give the samples as an array with sample_rate") from None
    if params.framerate <= 0:
        raise ShapeError(f"{what} declares a sample rate of {params.framerate} Hz")
    return _out(data, keep, params.nframes, params.framerate)


def _keep_frames(total: int, rate: int, max_seconds: float, what: str) -> int:
    if total <= rate * max_seconds:
        return total
    keep = int(rate * max_seconds)
    warnings.warn(f"{what}: a clip of {total / rate:.1f} s is longer than the {max_seconds:g} s a report "
                  f"embeds; keeping its first {max_seconds:g} s (cut the clips to the part that matters)",
                  stacklevel=4)
    return keep


def _out(wav: bytes, frames: int, total: int, rate: int) -> dict[str, Any]:
    out: dict[str, Any] = {"src": WAV_URI + base64.b64encode(wav).decode("ascii"),
                           "seconds": round(frames / rate, 3), "sample_rate": rate}
    if frames < total:
        out["truncated"] = round(total / rate, 3)  # the clip's full length, in seconds
    return out

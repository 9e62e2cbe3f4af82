"""Audio attribution end to end: index a folder of recordings clip by clip, match a query's clips to it,
and write the report that plays the query and the matched training clips at the matched offsets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmptyDataError
from ..scores import Scores
from .clips import AudioError, ClipWindows, TrackMatch, audio_files, load_audio
from .index import SimilarityIndex


def _checked_files(source: str | os.PathLike, sample_rate: int, resample: bool) -> list[Path]:
    """The audio files of `source`, each checked readable and at `sample_rate` before any work starts."""
    import soundfile as sf

    files = audio_files(source)
    for f in files:
        try:
            rate = sf.info(str(f)).samplerate
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AudioError(f"cannot read audio file {str(f)!r} ({reason}); give a WAV, FLAC or OGG file, "
                             "or remove it from the folder") from None
        if rate != sample_rate and not resample:
            raise AudioError(f"{str(f)!r} is sampled at {rate} Hz but the index works at {sample_rate} Hz; "
                             "convert it, or pass --resample (resample=True) to resample every file")
    return files


def build_audio_index(source: str | os.PathLike, out: str | os.PathLike, embedder: Any, *,
                      windows: ClipWindows | None = None, resample: bool = False, fit: bool = True,
                      kind: str = "auto", overwrite: bool = False, progress: bool = True) -> SimilarityIndex:
    """Index every clip of every audio file under `source` with `embedder` into the folder `out`.

    Files must share the embedder's sample rate (or pass `resample`). With `fit`, an embedder that has a
    `fit` method is first fitted on all the clips (standardisation for DSP features, training for the
    contrastive encoder). Every file is checked before anything is written.
    """
    out, source, windows = Path(out), Path(source), windows or ClipWindows()
    rate = int(embedder.sample_rate)
    files = _checked_files(source, rate, resample)
    root = source if source.is_dir() else source.parent
    names = [f.relative_to(root).as_posix() for f in files]

    def clips_of(i: int) -> tuple[np.ndarray, np.ndarray]:
        audio, _ = load_audio(files[i], rate, resample=resample)
        return windows.cut(audio, rate, name=repr(names[i]))

    if out.exists() and any(out.iterdir()) and not overwrite:
        from ..errors import SourcetraceError

        raise SourcetraceError(f"{out} already exists; choose another output folder or pass --overwrite "
                               "(overwrite=True) to replace it")
    if fit and hasattr(embedder, "fit"):
        corpus = [clips_of(i)[0] for i in range(len(files))]
        embedder.fit(np.concatenate(corpus))

    def embed_unit(i: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        clips, offsets = clips_of(i)
        metas = [{"id": f"{names[i]}@{o:.3f}", "track": names[i], "offset": float(o)} for o in offsets]
        return embedder.embed(clips), metas

    units = [f"{n}|{f.stat().st_size}|{f.stat().st_mtime_ns}" for n, f in zip(names, files)]
    info = {"source": str(root.resolve()), "sample_rate": rate, "clip_seconds": windows.seconds,
            "hop_seconds": windows.hop, "resample": resample}
    return SimilarityIndex.build(out, units, embed_unit, fingerprint=embedder.fingerprint, embedder=embedder,
                                 kind=kind, info=info, overwrite=overwrite, progress=progress)


@dataclass
class AudioQuery:
    """One query recording matched against an index: its clips' vectors and offsets, and the best tracks."""

    name: str
    audio: np.ndarray
    sample_rate: int
    vectors: np.ndarray
    offsets: np.ndarray
    matches: list[TrackMatch]


def query_audio(path: str | os.PathLike, index: SimilarityIndex, *, k: int = 10, how: str = "max",
                embedder: Any = None, resample: bool = False) -> AudioQuery:
    """The k training tracks most similar to the recording at `path`, with the offsets of the best pair."""
    embedder = embedder if embedder is not None else index.embedder()
    info = index.manifest["info"]
    rate = int(info["sample_rate"])
    audio, _ = load_audio(path, rate, resample=resample)
    return query_samples(audio, rate, index, k=k, how=how, embedder=embedder, name=Path(path).name)


def query_samples(audio: np.ndarray, sample_rate: int, index: SimilarityIndex, *, k: int = 10,
                  how: str = "max", embedder: Any = None, name: str = "query") -> AudioQuery:
    """`query_audio` for samples already in memory (at the index's sample rate)."""
    embedder = embedder if embedder is not None else index.embedder()
    info = index.manifest["info"]
    if int(sample_rate) != int(info["sample_rate"]):
        raise AudioError(f"the query is sampled at {sample_rate} Hz but the index at "
                         f"{info['sample_rate']} Hz; "
                         "resample it (librosa.resample) first")
    windows = ClipWindows(info["clip_seconds"], info["hop_seconds"])
    clips, offsets = windows.cut(audio, sample_rate, name=name)
    vectors = embedder.embed(clips)
    matches = index.match_tracks(vectors, offsets, fingerprint=embedder.fingerprint, k=k, how=how)
    return AudioQuery(name, np.asarray(audio, dtype=np.float32), int(sample_rate), vectors, offsets, matches)


def track_scores(queries: list[AudioQuery], index: SimilarityIndex, method: str = "similarity") -> Scores:
    """Top-k Scores of the queries against every indexed track, with the matched offsets in the metadata."""
    import torch

    tracks = list(index.tracks())
    where = {t: i for i, t in enumerate(tracks)}
    k = min(len(q.matches) for q in queries)
    if k == 0:
        raise EmptyDataError("no matches to report")
    values = torch.tensor([[m.score for m in q.matches[:k]] for q in queries])
    indices = torch.tensor([[where[m.track] for m in q.matches[:k]] for q in queries])
    offsets = [[{"track": m.track, "query_offset": m.query_offset, "train_offset": m.train_offset}
                for m in q.matches[:k]] for q in queries]
    return Scores(None, tracks, [q.name for q in queries], method=method,
                  metadata={"embedder": index.fingerprint, "matches": offsets},
                  top_values=values, top_indices=indices)


def excerpt(audio: np.ndarray, sample_rate: int, offset: float, seconds: float,
            limit: float) -> tuple[np.ndarray, float]:
    """The track if it lasts at most `limit` seconds, else the `limit`-second excerpt centred on the clip of
    `seconds` at `offset` (as far as the track allows); and the second at which that clip starts in it."""
    keep = int(limit * sample_rate)
    if len(audio) <= keep:
        return np.asarray(audio, dtype=np.float32), float(offset)
    first = int(round(offset * sample_rate - (keep - seconds * sample_rate) / 2))
    first = min(max(0, first), len(audio) - keep)
    return np.asarray(audio[first:first + keep], dtype=np.float32), float(offset) - first / sample_rate


def write_audio_report(queries: AudioQuery | list[AudioQuery], index: SimilarityIndex,
                       path: str | os.PathLike, *, title: str | None = None, train_audio: Any = None,
                       labels: list[str] | None = None) -> Path:
    """An HTML report: each query and the matched training clips, each player starting at the matched offset.

    The columns are the matched training clips (a track at an offset); a query's score for a clip is the
    best cosine between any of its clips and that one. Each item holds its whole track (or the views'
    longest excerpt around the match) and its player starts at the matched moment. `train_audio` (optional)
    maps a track to its samples; by default they are read from the indexed source folder. `labels` (one per
    query) describe the queries.
    """
    import torch

    from ..views import write_report
    from ..views.media import MAX_AUDIO_SECONDS

    queries = [queries] if isinstance(queries, AudioQuery) else list(queries)
    info = index.manifest["info"]
    rate, seconds = int(info["sample_rate"]), float(info["clip_seconds"])
    if not queries or not all(q.matches for q in queries):
        raise EmptyDataError("nothing to report: a query matched no training track")
    clips = list(dict.fromkeys((m.track, m.train_offset) for q in queries for m in q.matches))
    rows = {(index.track_of(i), round(float(index.items[i].get("offset", 0.0)), 3)): i
            for i in range(len(index))}
    columns = np.asarray(index.vectors[[rows[(t, round(o, 3))] for t, o in clips]])
    matrix = np.stack([(q.vectors @ columns.T).max(0) for q in queries])
    cache: dict[str, np.ndarray] = {}
    train_items = []
    for track, offset in clips:
        if track not in cache:
            cache[track] = train_audio[track] if train_audio is not None else load_audio(
                Path(info["source"]) / track, rate, resample=bool(info.get("resample")))[0]
        audio, start = excerpt(cache[track], rate, offset, seconds, MAX_AUDIO_SECONDS)
        train_items.append({"audio": audio, "sample_rate": rate, "start": start, "label": track,
                            "source": f"{track} at {offset:.1f} s"})
    query_items = []
    for q, label in zip(queries, labels or [q.name for q in queries]):
        best = q.matches[0]
        audio, start = excerpt(q.audio, q.sample_rate, best.query_offset, seconds, MAX_AUDIO_SECONDS)
        query_items.append({"audio": audio, "sample_rate": q.sample_rate, "start": start, "label": label,
                            "source": f"{q.name} at {best.query_offset:.1f} s (best match: {best.track} "
                                      f"at {best.train_offset:.1f} s)"})
    scores = Scores(torch.from_numpy(matrix.astype(np.float32)), [f"{t}@{o:.1f}s" for t, o in clips],
                    [q.name for q in queries], method="similarity", metadata={"embedder": index.fingerprint})
    return write_report(scores, path, train_items=train_items, query_items=query_items,
                        title=title or "sourcetrace: training clips most similar to the query",
                        k=min(6, len(clips)), groups={"track": [t for t, _ in clips]})

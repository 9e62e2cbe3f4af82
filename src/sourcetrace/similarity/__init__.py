"""Similarity attribution: which training items does this output resemble?

Items (audio clips here; images and text fit the same parts) are embedded by an `Embedder` into unit
vectors, indexed in a `SimilarityIndex` (FAISS), and queries come back as `sourcetrace.Scores`. Audio
tracks are compared clip by clip (`ClipWindows`) and summarised per track with the matched offsets.
"""

from .audio import AudioQuery, build_audio_index, query_audio, query_samples, track_scores, write_audio_report
from .clips import AudioError, ClipWindows, TrackMatch, aggregate_tracks, load_audio
from .embedders import EMBEDDERS, Embedder, make_embedder
from .index import IndexMismatchError, SimilarityIndex

__all__ = ["EMBEDDERS", "AudioError", "AudioQuery", "ClipWindows", "Embedder", "IndexMismatchError",
           "SimilarityIndex", "TrackMatch", "aggregate_tracks", "build_audio_index", "load_audio",
           "make_embedder", "query_audio", "query_samples", "track_scores", "write_audio_report"]

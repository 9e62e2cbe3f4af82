"""Similarity index, clip windows, per-track aggregation, DSP embedders and the `similarity` CLI."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("librosa")
sf = pytest.importorskip("soundfile")

from typer.testing import CliRunner  # noqa: E402

from sourcetrace.cli import app  # noqa: E402
from sourcetrace.similarity import (  # noqa: E402
    AudioError,
    ClipWindows,
    IndexMismatchError,
    SimilarityIndex,
    aggregate_tracks,
    build_audio_index,
    make_embedder,
    query_audio,
)
from sourcetrace.similarity.embedders import fourier_magnitude  # noqa: E402

SR = 8000


def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build_random(path, vectors, per_unit=50, kind="flat", **opts):
    units = [f"u{i}" for i in range(0, len(vectors), per_unit)]

    def embed_unit(i):
        block = vectors[i * per_unit:(i + 1) * per_unit]
        return block, [{"id": f"v{i * per_unit + j}", "track": f"t{(i * per_unit + j) // 7}",
                        "offset": float(j)} for j in range(len(block))]

    return SimilarityIndex.build(path, units, embed_unit, fingerprint="random:1", kind=kind, progress=False,
                                 **opts)


def test_flat_search_equals_numpy_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(5, 16)).astype(np.float32)
    index = build_random(tmp_path / "idx", x)
    scores = index.search(q, k=7, fingerprint="random:1")
    brute = unit_rows(q.astype(np.float64)) @ unit_rows(x.astype(np.float64)).T
    order = np.argsort(-brute, axis=1)[:, :7]
    assert np.array_equal(scores.top_indices.numpy(), order)
    np.testing.assert_allclose(scores.top_values.numpy(), np.take_along_axis(brute, order, 1), atol=1e-5)
    top = scores.top(2, 3)
    assert [a.train_id for a in top] == [f"v{i}" for i in order[2, :3]]


@pytest.mark.parametrize("kind, opts", [("ivf", {"nlist": 8, "nprobe": 8}), ("hnsw", {})])
def test_approximate_kinds_agree_with_exact_search(tmp_path, kind, opts):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    q = x[:20] + 0.01 * rng.normal(size=(20, 8)).astype(np.float32)
    index = build_random(tmp_path / "idx", x, kind=kind, **opts)
    assert index.manifest["faiss"]["kind"] == kind
    found = index.search(q, k=1, fingerprint="random:1").top_indices.numpy()[:, 0]
    assert np.array_equal(found, np.arange(20))  # nprobe = nlist: every list is visited


def test_build_resumes_after_a_failure_and_leaves_no_half_written_index(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    calls = []

    def embed_unit(i, fail_at=None):
        calls.append(i)
        if i == fail_at:
            raise RuntimeError("killed")
        return x[i * 50:(i + 1) * 50], [{"id": f"v{i * 50 + j}"} for j in range(50)]

    units = ["a", "b", "c", "d"]
    with pytest.raises(RuntimeError):
        SimilarityIndex.build(tmp_path / "idx", units, lambda i: embed_unit(i, fail_at=2), fingerprint="f",
                              progress=False)
    assert not (tmp_path / "idx").exists()
    calls.clear()
    index = SimilarityIndex.build(tmp_path / "idx", units, embed_unit, fingerprint="f", progress=False)
    assert calls == [2, 3]  # units 0 and 1 were kept from the first run
    np.testing.assert_allclose(np.asarray(index.vectors), unit_rows(x), atol=1e-6)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    with pytest.raises(Exception, match="already exists"):
        SimilarityIndex.build(tmp_path / "idx", units, embed_unit, fingerprint="f", progress=False)


def test_query_with_another_embedders_vectors_is_refused(tmp_path):
    index = build_random(tmp_path / "idx", np.eye(60, 6, dtype=np.float32) + 0.1)
    with pytest.raises(IndexMismatchError, match="built with embedder"):
        index.search(np.ones((1, 6)), fingerprint="other:1")


def test_track_aggregation_equals_explicit_pair_loops():
    rng = np.random.default_rng(3)
    q = unit_rows(rng.normal(size=(4, 5)))
    t = unit_rows(rng.normal(size=(9, 5)))
    tracks = ["a", "b", "a", "c", "b", "b", "a", "c", "c"]
    q_off, t_off = np.arange(4) * 1.5, np.arange(9) * 1.5
    for how in ("max", "mean"):
        got = {m.track: m for m in aggregate_tracks(q, q_off, t, tracks, t_off, how)}
        for track in "abc":
            pairs = [(float(q[i] @ t[j]), i, j) for i in range(4) for j in range(9) if tracks[j] == track]
            best = max(pairs)
            want = best[0] if how == "max" else np.mean([p[0] for p in pairs])
            assert got[track].score == pytest.approx(want, abs=1e-9)
            assert (got[track].query_offset, got[track].train_offset) == (q_off[best[1]], t_off[best[2]])


def test_index_track_matching_equals_brute_force(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(140, 6)).astype(np.float32)
    index = build_random(tmp_path / "idx", x)
    q = rng.normal(size=(3, 6)).astype(np.float32)
    got = index.match_tracks(q, np.array([0.0, 1.5, 3.0]), fingerprint="random:1", k=3, candidates=140)
    tracks = [f"t{i // 7}" for i in range(140)]
    offsets = np.array([float(i % 50) for i in range(140)])
    want = aggregate_tracks(unit_rows(q), np.array([0.0, 1.5, 3.0]), unit_rows(x), tracks, offsets)[:3]
    assert [(m.track, round(m.score, 5)) for m in got] == [(m.track, round(m.score, 5)) for m in want]


def test_clip_windows_cover_the_track_and_refuse_short_or_silent_audio():
    audio = np.random.default_rng(5).normal(size=SR * 7).astype(np.float32) * 0.1
    clips, offsets = ClipWindows(3.0, 1.5).cut(audio, SR)
    assert offsets.tolist() == [0.0, 1.5, 3.0, 4.0]  # the last window ends at the track's end
    np.testing.assert_array_equal(clips[1], audio[int(1.5 * SR):int(4.5 * SR)])
    with pytest.raises(AudioError, match="shorter than one 3 s clip"):
        ClipWindows(3.0, 1.5).cut(audio[:SR], SR)
    with pytest.raises(AudioError, match="silent"):
        ClipWindows(3.0, 1.5).cut(np.zeros(SR * 4), SR)
    quiet = audio.copy()
    quiet[: 3 * SR] = 0
    assert 0.0 not in ClipWindows(3.0, 1.5).cut(quiet, SR)[1]


def test_fourier_magnitude_is_invariant_to_transposition_and_circular_time_shift():
    patch = np.random.default_rng(6).random((12, 8))
    f = fourier_magnitude(patch)
    np.testing.assert_allclose(fourier_magnitude(np.roll(patch, 3, axis=0)), f, atol=1e-9)
    np.testing.assert_allclose(fourier_magnitude(np.roll(patch, 2, axis=1)), f, atol=1e-9)
    assert not np.allclose(fourier_magnitude(patch[:, ::-1] ** 2), f)


def tone(freqs, seconds, sr=SR, amp=0.3):
    t = np.arange(int(seconds * sr)) / sr
    out = np.zeros_like(t)
    step = len(t) // len(freqs)
    for i, f in enumerate(freqs):
        out[i * step:(i + 1) * step] = amp * np.sin(2 * np.pi * f * t[i * step:(i + 1) * step])
    return out.astype(np.float32)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    melodies = {"a": [262, 330, 392, 523], "b": [440, 415, 392, 370], "c": [196, 294, 247, 349]}
    for name, freqs in melodies.items():
        sf.write(folder / f"{name}.wav", tone(freqs * 2, 8.0), SR)
    return folder


@pytest.mark.parametrize("name", ["logmel", "mfcc", "chroma",
                                  pytest.param("chroma2dftm", marks=pytest.mark.slow)])  # beat tracking JIT
def test_dsp_embedders_find_an_indexed_track_itself(tmp_path, corpus, name):
    emb = make_embedder(name, sample_rate=SR)
    index = build_audio_index(corpus, tmp_path / "idx", emb, progress=False)
    vectors = emb.embed(np.stack([tone([262, 330, 392, 523] * 2, 8.0)[:3 * SR]]))
    assert vectors.shape[0] == 1 and np.isclose(np.linalg.norm(vectors), 1, atol=1e-5)
    result = query_audio(corpus / "a.wav", index, k=3)
    assert result.matches[0].track == "a.wav" and result.matches[0].score == pytest.approx(1, abs=1e-5)
    assert index.embedder().fingerprint == emb.fingerprint
    with pytest.raises(AudioError, match="8000 Hz"):
        emb.embed(np.zeros((1, 3 * 16000)), sample_rate=16000)


def test_cli_build_query_and_report(tmp_path, corpus):
    runner = CliRunner()
    out = tmp_path / "idx"
    result = runner.invoke(app, ["similarity", "build", str(corpus), "-o", str(out), "--embedder", "mfcc",
                                 "--sample-rate", str(SR)])
    assert result.exit_code == 0, result.output
    assert "indexed" in result.output
    report = tmp_path / "q.html"
    result = runner.invoke(app, ["similarity", "query", str(corpus / "b.wav"), "--index", str(out), "-k", "2",
                                 "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "b.wav" in result.output.splitlines()[0]
    assert "data:audio/wav;base64," in report.read_text()


@pytest.mark.parametrize("offset", [0.0, 1.3, 17.0, 36.5])
def test_report_excerpt_holds_the_matched_clip_at_its_start(offset):
    from sourcetrace.similarity.audio import excerpt

    track = np.random.default_rng(0).standard_normal(SR * 40).astype(np.float32)  # 40 s, above the limit
    part, start = excerpt(track, SR, offset, 3.0, limit=30.0)
    assert len(part) == 30 * SR and 0 <= start <= 27.0
    first = int(round(offset * SR))
    at = int(round(start * SR))
    np.testing.assert_array_equal(part[at:at + 3 * SR], track[first:first + 3 * SR])
    short, same = excerpt(track[: SR * 10], SR, 4.5, 3.0, limit=30.0)
    assert same == 4.5 and np.array_equal(short, track[: SR * 10])


def test_audio_report_players_start_at_the_matched_offsets(tmp_path, corpus):
    import json
    import re

    from sourcetrace.similarity import write_audio_report

    index = build_audio_index(corpus, tmp_path / "idx", make_embedder("mfcc", sample_rate=SR), progress=False)
    query = query_audio(corpus / "c.wav", index, k=3)
    path = write_audio_report(query, index, tmp_path / "r.html")
    data = json.loads(re.search(r'id="st-data">(.*?)</script>', path.read_text(), re.S).group(1))
    q = data["queries"][0]
    assert q["audio"]["start"] == pytest.approx(query.matches[0].query_offset, abs=1e-3)
    assert q["audio"]["seconds"] == pytest.approx(8.0)  # the whole track, not the clip
    starts = {item["source"]: item["audio"]["start"] for item in data["train"].values()}
    for m in query.matches:
        assert starts[f"{m.track} at {m.train_offset:.1f} s"] == pytest.approx(m.train_offset, abs=1e-3)


def bad_input_cases(tmp_path, corpus):
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "x.wav").write_bytes(b"not audio at all")
    (tmp_path / "quiet").mkdir()
    sf.write(tmp_path / "quiet" / "x.wav", np.zeros(SR * 4, dtype=np.float32), SR)
    (tmp_path / "short").mkdir()
    sf.write(tmp_path / "short" / "x.wav", tone([440], 1.0), SR)
    (tmp_path / "rates").mkdir()
    sf.write(tmp_path / "rates" / "a.wav", tone([440], 4.0), SR)
    sf.write(tmp_path / "rates" / "b.wav", tone([440], 4.0, sr=16000), 16000)
    return {"garbage": "cannot read audio file", "quiet": "is silent", "short": "shorter than one 3 s clip",
            "rates": "sampled at 16000 Hz"}


def test_cli_bad_input_gives_one_line_errors_and_writes_nothing(tmp_path, corpus):
    runner = CliRunner()
    for folder, message in bad_input_cases(tmp_path, corpus).items():
        out = tmp_path / f"idx-{folder}"
        result = runner.invoke(app, ["similarity", "build", str(tmp_path / folder), "-o", str(out),
                                     "--embedder", "mfcc", "--sample-rate", str(SR)])
        assert result.exit_code == 2, (folder, result.output)
        assert message in " ".join(result.output.split()), (folder, result.output)
        assert "Traceback" not in result.output and not out.exists()
    # an index made with another embedder refuses the query's vectors
    index = build_audio_index(corpus, tmp_path / "idx", make_embedder("mfcc", sample_rate=SR), progress=False)
    other = make_embedder("logmel", sample_rate=SR)
    with pytest.raises(IndexMismatchError):
        query_audio(corpus / "a.wav", index, embedder=other)

"""The music-attribution benchmark's own numerical helpers, each against an independent computation."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from sourcetrace.bench.music_attribution import ngram_overlap, split_lds
from sourcetrace.ensembles import SubsetRetraining


@pytest.mark.parametrize("n", [1, 3, 5])
def test_ngram_overlap_equals_a_window_by_window_search(n):
    rng = np.random.default_rng(n)
    train = [rng.integers(0, 4, size=rng.integers(8, 30)) for _ in range(5)]
    queries = [rng.integers(0, 4, size=20), train[2][3:17].copy(), rng.integers(0, 4, size=n)]
    got = ngram_overlap(queries, train, n)
    for a, q in enumerate(queries):
        windows = np.lib.stride_tricks.sliding_window_view(q, n)
        distinct = np.unique(windows, axis=0)
        for b, t in enumerate(train):
            found = [any(np.array_equal(g, t[i:i + n]) for i in range(len(t) - n + 1)) for g in distinct]
            assert got[a, b] == pytest.approx(np.mean(found))
    assert got[1, 2] == 1.0  # a piece of a training sequence is wholly inside it


def test_ngram_overlap_of_a_query_shorter_than_n_is_zero():
    assert ngram_overlap([np.arange(2)], [np.arange(10)], 3).tolist() == [[0.0]]


def test_split_lds_is_the_mean_spearman_over_the_chosen_queries():
    rng = np.random.default_rng(0)
    masks = rng.random((12, 9)) < 0.5
    measurements = rng.standard_normal((12, 6))
    truth = SubsetRetraining(masks, measurements, measurements[:, None, :])
    scores = rng.standard_normal((6, 9))
    cols = np.asarray([1, 3, 4])
    got = split_lds(scores, truth, cols)
    rho = [spearmanr(masks.astype(float) @ scores[q], measurements[:, q])[0] for q in cols]
    assert got["mean"] == pytest.approx(np.mean(rho))
    assert got["low"] <= got["mean"] <= got["high"]
    assert got["queries"] == 3
    scores[3] = 0.0  # constant predictions: undefined, left out of the mean and of the count
    with pytest.warns(RuntimeWarning, match="constant"):
        got = split_lds(scores, truth, cols)
    assert got["queries"] == 2 and got["mean"] == pytest.approx(np.mean([rho[0], rho[2]]))


def test_near_clips_are_the_source_tracks_audio_at_the_shifted_offsets(tmp_path):
    sf = pytest.importorskip("soundfile")
    pytest.importorskip("librosa")
    from sourcetrace.bench.music_attribution import NEAR, MusicBenchSetting, near_clips

    rate = 8000
    rng = np.random.default_rng(0)
    tracks = [(0.3 * rng.standard_normal(rate * 6)).astype(np.float32) for _ in range(2)]
    tracks[1][: int(rate * 4.5)] = 0  # silent up to 4.5 s: clips that start before 1.5 s are left out
    paths = []
    for i, t in enumerate(tracks):
        paths.append(tmp_path / f"t{i}.wav")
        sf.write(paths[-1], t, rate, subtype="FLOAT")
    data = {"piece": np.asarray([0, 0, 0, 1, 1, 1]), "offsets": np.asarray([0.0, 1.5, 3.0] * 2),
            "paths": paths}
    q = {"source": np.asarray([1, 0, 5, 4]), "split": np.asarray([1, 1, 0, 1])}  # the third is tuning
    got = near_clips(MusicBenchSetting(sample_rate=rate), data, q)
    want = []
    for source in (1, 0, 4):
        track, offset = tracks[data["piece"][source]], data["offsets"][source]
        for d in NEAR:
            start = round((offset + d) * rate)
            clip = track[start:start + 3 * rate]
            if start >= 0 and len(clip) == 3 * rate and np.abs(clip).max() > 0:
                want.append(clip)
    assert len(want) == 6 + 3 + 3  # source 1: all six; source 0: the later three; source 4: loud ones only
    np.testing.assert_array_equal(got, np.stack(want))


def test_paired_differences_count_undefined_lds_as_zero_and_match_a_direct_mean():
    from sourcetrace.bench.music_attribution import paired
    from sourcetrace.bench.runner import bootstrap_ci

    def row(method, family, values, copying):
        return {"method": method, "family": family, "report": {"per_query": values},
                "report, copying": {"per_query": values[:2]} if copying else None,
                "report, not copying": {"per_query": values[2:]}}

    nan = float("nan")
    rows = [row("sim", "similarity", [0.5, nan, 0.1, 0.2], True),
            row("trak", "TRAK", [0.3, 0.4, nan, 0.6], True),
            row("ekfac", "EK-FAC", [0.0, 0.1, 0.2, 0.3], False)]
    got = paired(rows, {"similarity": "sim", "TRAK": "trak", "EK-FAC": "ekfac"})
    assert [(p["gradient"], p["generations"], p["n"]) for p in got] == [
        ("trak", "all", 4), ("trak", "copying", 2), ("trak", "not copying", 2), ("ekfac", "all", 4),
        ("ekfac", "not copying", 2)]
    want = [0.5 - 0.3, 0.0 - 0.4, 0.1 - 0.0, 0.2 - 0.6]
    assert got[0]["difference"] == pytest.approx(np.mean(want))
    assert (got[0]["low"], got[0]["high"]) == pytest.approx(bootstrap_ci(want))
    assert got[3]["difference"] == pytest.approx(np.mean([0.5, -0.1, -0.1, -0.1]))

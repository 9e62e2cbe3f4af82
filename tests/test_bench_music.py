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


def test_the_larger_gallery_starts_with_the_corpus_clips_rendered_alike(tmp_path):
    pytest.importorskip("music21")
    pytest.importorskip("librosa")
    from dataclasses import replace

    from sourcetrace.bench.music_attribution import MusicBenchSetting, corpus

    setting = MusicBenchSetting(pieces=2, steps=16, sample_rate=8000)
    small = corpus(setting, tmp_path / "a")
    big = corpus(replace(setting, pieces=3), tmp_path / "b")  # rendered afresh in another folder
    n = len(small["clips"])
    assert len(big["clips"]) > n and big["piece"][n:].min() == 2
    np.testing.assert_array_equal(big["clips"][:n], small["clips"])
    np.testing.assert_array_equal(big["offsets"][:n], small["offsets"])


def test_verdicts_read_ties_at_the_ceiling_and_the_search_among_the_first_clips():
    from sourcetrace.bench.music_attribution import (
        DSP,
        PERTURBATIONS,
        ceiling,
        ceiling_ties,
        margins,
        searched,
        verdicts,
    )

    def cell(r1):
        return {"recall@1": r1, "recall@10": 1.0, "mrr": r1}

    table = {n: {k: cell(0.5) for k in PERTURBATIONS} for n in [*DSP, "chromaprint"]}
    table["contrastive"] = {k: cell(1.0) for k in PERTURBATIONS}
    table["chroma"]["stretch 1.1"] = cell(1.0)
    table["mfcc"]["pitch -1"] = cell(1.0)
    table["contrastive"]["pitch -1"] = cell(0.95)
    assert ceiling(table) == [["mfcc", "pitch -1"], ["chroma", "stretch 1.1"]]
    assert ceiling_ties(table) == [["chroma", "stretch 1.1"]]
    lines = verdicts(table)
    assert lines[0].endswith("lowest 0.95 → met.")
    assert lines[1].endswith("NOT met strictly (below mfcc at pitch -1; tied with chroma at stretch 1.1).")
    assert lines[2].endswith("met.") and "NOT" not in lines[2]

    sims = {"pitch +1": np.asarray([[0.9, 0.1, 0.95], [0.2, 0.8, 0.1]])}  # the third column: an added clip
    full, first = searched(sims, np.asarray([0, 1]), 2)
    assert full["pitch +1"]["recall@1"] == 0.5 and full["pitch +1"]["mrr"] == 0.75
    assert first["pitch +1"]["recall@1"] == 1.0
    assert margins(sims, np.asarray([0, 1]))["pitch +1"] == pytest.approx({"median": 0.275, "min": -0.05})


def test_the_target_is_evaluated_on_the_larger_gallery_when_there_is_one():
    from sourcetrace.bench.music_attribution import (
        DSP,
        PERTURBATIONS,
        MusicBenchSetting,
        robustness_lines,
    )

    def table(cells=()):
        out = {n: {k: {"recall@1": 0.5, "recall@10": 1.0, "mrr": 0.5} for k in PERTURBATIONS}
               for n in [*DSP, "contrastive", "chromaprint"]}
        out["contrastive"] = {k: {"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0} for k in PERTURBATIONS}
        for n, k, v in cells:
            out[n][k] = {"recall@1": v, "recall@10": 1.0, "mrr": v}
        return out

    first = {"clips": 448, "chosen_temperature": 0.1, "chromaprint_codes_per_clip": 3.0, "tuning": {},
             "costs": {}, "report": table([("chroma", "stretch 0.9", 1.0)])}
    big = {"pieces": 256, "clips": 3500, "recomputed": {"chroma": True},
           "report": table([("chroma", "stretch 0.9", 0.9)]), "original_gallery": table(),
           "margin": {n: {k: {"median": 0.1, "min": 0.0} for k in PERTURBATIONS}
                      for n in [*DSP, "contrastive", "chromaprint"]},
           "costs": {"chroma": {"fit_s": 1.0, "embed_ms": 1.0}}}
    text = "\n".join(robustness_lines(MusicBenchSetting(), first, None, big))
    target = text[text.index("### Target"):]
    assert text.index("### A larger gallery") < text.index("### Target")
    assert "evaluated on the larger gallery (3500 clips)" in target
    assert "no DSP feature is at the ceiling under the target perturbations" in target
    assert "- above every DSP feature under those perturbations: met." in target
    assert "on the first table (448 clips)" in target and "tied with chroma at stretch 0.9" in target

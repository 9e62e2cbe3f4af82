"""The kg benchmark's data settings and its diagnosis, against counts computed here by hand."""

import math
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("rdflib")
pytest.importorskip("pyoxigraph")

from sourcetrace.bench.kg_attribution import KGSetting, diagnose, probe_sets  # noqa: E402
from sourcetrace.demos import kg as garments  # noqa: E402


def test_two_colour_render_draws_the_marks_in_the_second_colour():
    a = {
        "hasSilhouette": "straight",
        "hasLength": "long",
        "hasColor": "red",
        "hasPattern": "striped",
        "hasPatternColor": "blue",
        "hasMaterialType": "plain",
    }
    img = garments.render(a)
    centre = garments.SIZE // 2
    for row in range(2, 15):  # the garment's rows: rows 2-3 marked, 4-5 not, ...
        want = garments.RGB["blue"] if (row // 2) % 2 == 1 else garments.RGB["red"]
        np.testing.assert_allclose(img[row, centre], want)
    assert np.allclose(img[0, 0], garments.BACKGROUND)
    # a single-colour garment still darkens its marks instead
    plain = garments.render({k: v for k, v in a.items() if k != "hasPatternColor"})
    np.testing.assert_allclose(plain[2, centre], np.array(garments.RGB["red"]) * 0.35)
    np.testing.assert_allclose(plain[4, centre], garments.RGB["red"])


def test_long_tail_sampling_follows_the_tail_and_keeps_two_colours():
    _, attrs = garments.sample_garments(3000, 0.5, garments.TWO_COLOUR, seed=1)
    assert all(a["hasPatternColor"] != a["hasColor"] for a in attrs)
    counts = Counter(a["hasColor"] for a in attrs)
    p = 0.5 ** np.arange(4) / (0.5 ** np.arange(4)).sum()
    for value, want in zip(garments.TWO_COLOUR["hasColor"], p):
        assert abs(counts[value] / 3000 - want) < 4 * math.sqrt(want * (1 - want) / 3000)
    assert len(garments.all_combinations(garments.TWO_COLOUR)) == 3 * 2 * 4 * 3 * 3 * 2
    with pytest.raises(ValueError, match="tail"):
        garments.sample_garments(3, 0.0)


@pytest.mark.slow
def test_diagnosis_against_hand_counts(tmp_path):
    small = KGSetting(n_tuning=1, n_reporting=3, epochs=1, error_rates=(0.0, 0.3))
    uniform = diagnose(small, tmp_path / "u")
    assert uniform["shared_values"] == ["plain"]
    assert uniform["idf_spread"] == pytest.approx({rel: 1.0 for rel in garments.ATTRIBUTES})
    assert uniform["idf_invented|0.3"] > uniform["idf_true|0.3"]  # made-up triples are rare
    for key in ("same_top_k|relation", "same_top_k|idf-jaccard"):
        assert 0.0 <= uniform[key] <= 1.0
    long_tail = KGSetting(
        n_tuning=1, n_reporting=3, epochs=1, error_rates=(0.0,), data="two-colour long-tail"
    )
    out = diagnose(long_tail, tmp_path / "t")
    assert out["shared_values"] == sorted(garments.RGB)
    _, attrs = garments.sample_garments(
        long_tail.n_train, long_tail.tail, garments.TWO_COLOUR, long_tail.seed
    )
    n = len(attrs)
    for rel in garments.TWO_COLOUR:
        df = Counter(a[rel] for a in attrs).values()
        w = [math.log((1 + n) / (1 + d)) + 1 for d in df]
        assert out["idf_spread"][rel] == pytest.approx(max(w) / min(w))
    with pytest.raises(ValueError, match="data must be one of"):
        diagnose(KGSetting(data="other"), tmp_path / "x")


def test_probe_sets_remove_what_they_say():
    _, attrs = garments.make_garments(2, 0)
    prompt = attrs[100]
    sets = probe_sets(prompt, attrs, seed=3)
    exact = [i for i, a in enumerate(attrs) if a == prompt]
    assert len(exact) == 2 and sets.pop("exact matches alone") == exact
    for name, removed in sets.items():
        assert removed[:2] == exact and len(set(removed)) == len(removed)
        extra = [{r for r in prompt if attrs[i][r] != prompt[r]} for i in removed[2:]]
        if "only" in name:
            rel = name.split()[-2]
            assert len(extra) == 2 and all(e == {rel} for e in extra)
        elif "3 or more" in name:
            assert len(extra) == 2 and all(len(e) >= 3 for e in extra)
        else:
            assert len(extra) == 8 and all(len(e) == 1 for e in extra)
    assert {n.split()[-2] for n in sets if "only" in n} == set(garments.ATTRIBUTES)

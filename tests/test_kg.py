"""Knowledge-graph attribution: ontologies, alignment, scene extractor, store and similarity measures.

The measures are checked against brute force written here independently (incidence matrices, hand sums).
"""

import math
import re
from collections import Counter
from importlib import resources

import numpy as np
import pytest

pytest.importorskip("rdflib")
pytest.importorskip("pyoxigraph")

from sourcetrace.errors import WorkdirMismatchError  # noqa: E402
from sourcetrace.kg import (  # noqa: E402
    QUERIES,
    Aligner,
    KGStore,
    OntologyError,
    SceneExtractor,
    StoreError,
    Triple,
    kg_scores,
    load_ontology,
    render_query,
    shared_text,
    shipped_ontologies,
    style_attribution,
)

BACKENDS = ["oxigraph", "rdflib"]


@pytest.fixture(scope="module")
def fashion():
    return load_ontology("fashion")


def T(*pairs):
    return [Triple(r, v) for r, v in pairs]


# ---- ontologies --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", shipped_ontologies())
def test_every_shipped_ontology_loads_and_its_prompt_names_only_its_relations(name):
    assert (
        resources.files("sourcetrace.kg")
        .joinpath("ontologies")
        .joinpath({"fashion": "fashion.ttl", "art-style": "art_style.ttl"}[name])
        .is_file()
    )
    onto = load_ontology(name)
    assert len(onto.relations) >= 8
    for json_mode in (True, False):
        prompt = onto.prompt(json_mode=json_mode)
        listed = re.findall(r"^- (\w+): (.+)$", prompt, flags=re.M)
        assert {r for r, _ in listed} == set(onto.relations)
        for rel, values in listed:
            assert values.split(", ") == onto.relations[rel].value_labels()
        # any relation-like word anywhere in the prompt is one of the ontology's relations
        assert set(re.findall(r"\bhas[A-Z]\w*", prompt)) <= set(onto.relations)
    for rel in onto.relations.values():
        assert rel.domain and rel.values


def test_fashion_has_fashionpedia_relations(fashion):
    assert {"hasSilhouette", "hasNeckline", "hasPattern", "hasMaterialType", "hasLength"} <= set(
        fashion.relations
    )
    # one value node shared by two relations: what the relation-blind count cannot tell apart
    assert fashion.value_iri("hasPattern", "plain") == fashion.value_iri("hasMaterialType", "plain")


def test_user_ontology_and_bad_ontologies(tmp_path):
    good = tmp_path / "cars.ttl"
    good.write_text("""@prefix stkg: <urn:sourcetrace:kg:> . @prefix c: <urn:x:cars:> .
@prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> . @prefix skos: <http://www.w3.org/2004/02/skos/core#> .
c: a stkg:Ontology ; rdfs:label "cars" ; stkg:subject "car" .
c:hasBody a stkg:Relation ; rdfs:label "hasBody" ; skos:altLabel "body" ; stkg:allowedValue c:sedan, c:coupe .
c:sedan rdfs:label "sedan" ; skos:altLabel "saloon" . c:coupe rdfs:label "coupe" .
""")
    onto = load_ontology(good)
    assert onto.name == "cars" and onto.relations["hasBody"].value_labels() == ["coupe", "sedan"]
    assert Aligner(onto).align([("body", "saloon")]).triples == (Triple("hasBody", "sedan"),)
    bad = tmp_path / "bad.ttl"
    bad.write_text("this is not turtle")
    with pytest.raises(OntologyError, match="not valid"):
        load_ontology(bad)
    with pytest.raises(OntologyError, match="shipped name"):
        load_ontology(tmp_path / "missing.ttl")
    ambiguous = tmp_path / "amb.ttl"
    ambiguous.write_text(
        good.read_text() + 'c:hasDoors a stkg:Relation ; rdfs:label "hasDoors" ; '
        'skos:altLabel "body" ; stkg:allowedValue c:coupe .\n'
    )
    with pytest.raises(OntologyError, match="names both"):
        load_ontology(ambiguous)


# ---- alignment ---------------------------------------------------------------------------------------------
def test_alignment_maps_synonyms_and_counts_everything_it_drops(fashion):
    out = Aligner(fashion).align(
        [
            ("Silhouette", "A line"),
            ("pattern", "stripes"),
            ("hasColour", "Navy Blue"),
            ("has_material_type", "dennim"),
            ("hasNeckline", "weird"),
            ("hasNeckline", "striped"),
            ("colour of sky", "blue"),
            ("", "red"),
            ("hasColor", " "),
            ("hasPattern", "striped"),
            ("hasColor", "xqzt"),
        ]
    )
    assert out.triples == tuple(
        sorted(
            T(
                ("hasSilhouette", "a-line"),
                ("hasPattern", "striped"),
                ("hasColor", "blue"),
                ("hasMaterialType", "denim"),
            )
        )
    )
    assert out.fuzzy == Counter({("hasMaterialType", "dennim", "denim"): 1})
    # a value allowed for another relation is still unknown for this one
    assert out.unknown_values == Counter(
        {("hasNeckline", "weird"): 1, ("hasNeckline", "striped"): 1, ("hasColor", "xqzt"): 1}
    )
    assert out.unknown_relations == Counter({"colour of sky": 1})
    assert out.empty == 2 and out.duplicates == 1 and out.dropped == 6
    assert "unknown values" in out.summary() and "unknown relations" in out.summary()


def test_fuzzy_cutoff(fashion):
    strict = Aligner(fashion, cutoff=0.99).align([("hasMaterialType", "dennim")])
    assert strict.triples == () and sum(strict.unknown_values.values()) == 1


# ---- the scene extractor -----------------------------------------------------------------------------------
VOCAB = {
    "hasSilhouette": ["a-line", "straight", "fitted"],
    "hasColor": ["red", "blue", "green", "yellow"],
    "hasPattern": ["plain", "striped", "checked", "dotted"],
    "hasLength": ["short", "long"],
    "hasMaterialType": ["plain", "knit"],
    "hasNeckline": ["v-neck", "crew neck"],
}


def test_scene_extractor_without_errors_is_exact(fashion):
    truth = {"hasSilhouette": "fitted", "hasColor": "red", "hasPattern": "dotted"}
    out = SceneExtractor(fashion, vocabulary=VOCAB).extract(truth, 3)
    assert out.triples == tuple(sorted(T(*truth.items())))


def test_scene_extractor_error_rates(fashion):
    rng = np.random.default_rng(0)
    rels = ["hasSilhouette", "hasColor", "hasPattern", "hasLength", "hasMaterialType"]
    truths = [{r: VOCAB[r][rng.integers(len(VOCAB[r]))] for r in rels} for _ in range(600)]
    p = 0.2
    ex = SceneExtractor(fashion, drop=p, confuse=p, invent=p, vocabulary=VOCAB, seed=1)
    kept = confused = invented = 0
    for i, truth in enumerate(truths):
        triples = ex.extract(truth, i).triples
        assert triples == ex.extract(truth, i).triples  # deterministic
        for t in triples:
            if t.relation not in truth:
                invented += 1
                assert t.relation == "hasNeckline" and t.value in VOCAB["hasNeckline"]
            else:
                kept += 1
                confused += t.value != truth[t.relation]
    n = 5 * len(truths)
    # 3000 attributes: binomial standard errors are under 0.01, so 0.04 is a four-sigma band
    assert abs((n - kept) / n - p) < 0.04
    assert abs(confused / kept - p) < 0.04
    # an invented attribute needs a free relation; with one free relation, duplicates of it collapse
    assert 0 < invented / len(truths) <= 1


# ---- the store ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_store_is_all_or_nothing_and_refuses_duplicates(fashion, backend):
    store = KGStore(fashion, backend=backend)
    store.add("a", T(("hasColor", "red")))
    assert len(store) == 1
    bad = [("b", T(("hasColor", "red"))), ("c", [Triple("hasColor", "not a colour")])]
    with pytest.raises(StoreError, match="not a colour"):
        store.add_many(bad)
    assert len(store) == 1 and not store.has("b")
    with pytest.raises(StoreError, match="already in the store"):
        store.add("a", T(("hasColor", "blue")))
    with pytest.raises(StoreError, match="aligned Triple"):
        store.add("d", [("hasColor", "red")])
    store.remove("a")
    assert len(store) == 0


def test_store_on_disk_reopens_and_refuses_another_ontology(fashion, tmp_path):
    store = KGStore(fashion, tmp_path / "kg")
    store.add("a", T(("hasColor", "red"), ("hasPattern", "plain")))
    del store
    again = KGStore(fashion, tmp_path / "kg")
    assert again.triples()["a"][1] == frozenset(T(("hasColor", "red"), ("hasPattern", "plain")))
    del again
    with pytest.raises(WorkdirMismatchError):
        KGStore(load_ontology("art-style"), tmp_path / "kg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_round_trips(fashion, tmp_path, backend):
    import rdflib

    store = KGStore(fashion, backend=backend)
    store.add("a", T(("hasColor", "red"), ("hasPattern", "plain")))
    store.add("g", T(("hasColor", "red")), role="generated", prompt="p")
    for fmt, suffix in (("turtle", "ttl"), ("json-ld", "jsonld")):
        path = store.export(tmp_path / f"kg.{suffix}", fmt)
        g = rdflib.Graph().parse(path, format=fmt)
        found = g.query(
            QUERIES["shared-triples"]
            .replace("$query_role", '"generated"')
            .replace("$query", '"g"')
            .replace("$role", '"train"')
        )
        assert [(str(r.id), str(r.relation), str(r.value)) for r in found] == [("a", "hasColor", "red")]
    assert not list(tmp_path.glob(".*.tmp"))


def test_render_query_checks_parameters():
    with pytest.raises(StoreError, match="needs parameters"):
        render_query("shared-triples", query="g")
    with pytest.raises(StoreError, match="no query"):
        render_query("nope")
    assert '"a\\"b"' in render_query("triples", role='a"b')


# ---- similarity against brute force ------------------------------------------------------------------------
def test_measures_by_hand(fashion):
    store = KGStore(fashion)
    store.add_many(
        [
            ("A", T(("hasPattern", "plain"), ("hasColor", "red"))),
            ("B", T(("hasMaterialType", "plain"), ("hasColor", "red"))),
            ("C", T(("hasColor", "blue"))),
        ]
    )
    store.add_many(
        [("g1", T(("hasPattern", "plain"), ("hasColor", "red"))), ("g2", T(("hasColor", "blue")))],
        role="generated",
        prompts=["p", "p"],
    )
    count = kg_scores(store, measure="count").matrix[0].tolist()
    relation = kg_scores(store, measure="relation").matrix[0].tolist()
    idf = kg_scores(store, measure="idf-jaccard")
    # g1 shares {plain, red} with A and B (relation-blind), g2 shares {blue} with C
    assert count == [2, 2, 1]
    assert relation == [2, 1, 1]
    w1, w2 = math.log(4 / 2) + 1, math.log(4 / 3) + 1  # df 1 and df 2 among N = 3
    # A: g1 matches exactly, g2 nothing; B: g1 shares red of {plain pattern, red, plain material};
    # C: g2 exactly
    assert idf.matrix[0].tolist() == pytest.approx([1.0, w2 / (w1 + w2 + w1), 1.0])
    assert kg_scores(store, measure="relation", aggregate="max").matrix[0].tolist() == [2, 1, 1]
    # unweighted Jaccard of triples: A 2/2 (g1) + 0; B 1/3 (red of plain pattern, red, plain material); C 1
    jaccard = kg_scores(store, measure="relation-jaccard").matrix[0].tolist()
    assert jaccard == pytest.approx([1.0, 1 / 3, 1.0])
    assert shared_text(idf, "p", "A") == "hasColor red (1/2 generations)\nhasPattern plain (1/2 generations)"
    blind = kg_scores(store, measure="count")
    assert [r[:2] for r in blind.metadata["shared"]["p"]["B"]] == [
        ["hasColor", "red"],
        ["hasPattern", "plain"],
    ]


@pytest.mark.parametrize("backend", ["oxigraph", pytest.param("rdflib", marks=pytest.mark.slow)])
def test_measures_match_incidence_matrices_and_sparql(fashion, backend):
    rng = np.random.default_rng(3)
    vocab = [(r, v) for r, vs in VOCAB.items() for v in vs]
    store = KGStore(fashion, backend=backend)
    train = {
        str(i): {vocab[j] for j in rng.choice(len(vocab), rng.integers(0, 6), replace=False)}
        for i in range(12)
    }
    gens = {
        f"g{i}": {vocab[j] for j in rng.choice(len(vocab), rng.integers(1, 6), replace=False)}
        for i in range(6)
    }
    store.add_many([(i, T(*t)) for i, t in train.items()])
    store.add_many(
        [(i, T(*t)) for i, t in gens.items()], role="generated", prompts=["p0", "p0", "p1", "p1", "p2", "p2"]
    )
    ids = list(train)
    # incidence matrices over (relation, value) triples and over values
    Xt = np.array([[pair in train[i] for pair in vocab] for i in ids], dtype=float)
    values = sorted({v for _, v in vocab})
    Vt = np.array([[any(v == x for _, x in train[i]) for v in values] for i in ids], dtype=float)
    df = Xt.sum(0)
    w = np.log((1 + len(ids)) / (1 + df)) + 1
    for measure in ("count", "relation", "idf-jaccard", "relation-jaccard"):
        scores = kg_scores(store, measure=measure)
        assert scores.train_ids == ids and scores.query_ids == ["p0", "p1", "p2"]
        for r, prompt in enumerate(scores.query_ids):
            expected = np.zeros(len(ids))
            for g in [g for g, p in zip(gens, ["p0", "p0", "p1", "p1", "p2", "p2"]) if p == prompt]:
                xq = np.array([pair in gens[g] for pair in vocab], dtype=float)
                if measure == "count":
                    vq = np.array([any(v == x for _, x in gens[g]) for v in values], dtype=float)
                    expected += Vt @ vq
                elif measure == "relation":
                    expected += Xt @ xq
                else:
                    weight = w if measure == "idf-jaccard" else 1.0
                    inter = (np.minimum(Xt, xq) * weight).sum(1)
                    union = (np.maximum(Xt, xq) * weight).sum(1)
                    expected += inter / union
            np.testing.assert_allclose(scores.matrix[r].numpy(), expected, rtol=1e-12)
    # the exposed SPARQL queries give the same shared triples, shared values and document frequencies
    for g, triples in gens.items():
        rows = store.run("shared-triples", query=g, query_role="generated", role="train")
        assert sorted((r["id"], r["relation"], r["value"]) for r in rows) == sorted(
            (i, rel, v) for i in ids for rel, v in train[i] & triples
        )
        counts = {
            r["id"]: r["shared"]
            for r in store.run("shared-values", query=g, query_role="generated", role="train")
        }
        gv = {v for _, v in triples}
        assert counts == {i: len({v for _, v in train[i]} & gv) for i in ids if {v for _, v in train[i]} & gv}
    dfs = {(r["relation"], r["value"]): r["df"] for r in store.run("document-frequency", role="train")}
    assert dfs == {pair: int(d) for pair, d in zip(vocab, df) if d > 0}


def test_scores_refuse_bad_options(fashion):
    store = KGStore(fashion)
    with pytest.raises(StoreError, match="no images with role"):
        kg_scores(store)
    store.add("a", T(("hasColor", "red")))
    store.add("g", T(("hasColor", "red")), role="generated")
    with pytest.raises(StoreError, match="measure"):
        kg_scores(store, measure="cosine")
    with pytest.raises(StoreError, match="has no prompt"):
        kg_scores(store)
    assert kg_scores(store, by="image").matrix.tolist() == [[1.0]]


def test_style_attribution_counts_gained_triples_per_collection():
    art = load_ontology("art-style")
    store = KGStore(art)
    store.add("orig", T(("hasPalette", "cool"), ("hasMedium", "photograph")), role="style")
    store.add(
        "styled",
        T(
            ("hasPalette", "warm"),
            ("hasMedium", "watercolor"),
            ("hasMedium", "photograph"),
            ("hasMood", "serene"),
        ),
        role="style",
    )
    frames = {
        "f1": ("film A", T(("hasPalette", "warm"), ("hasBrushwork", "flat fill"))),
        "f2": ("film A", T(("hasPalette", "warm"), ("hasMedium", "watercolor"))),
        "f3": ("film B", T(("hasMedium", "photograph"))),
        "f4": ("film B", T(("hasMedium", "watercolor"))),
        "f5": ("film C", T(("hasPalette", "cool"))),
    }
    store.add_many(
        [(i, t) for i, (_, t) in frames.items()],
        role="reference",
        collections=[c for c, _ in frames.values()],
    )
    out = style_attribution(store, "styled", "orig")
    gained = set(T(("hasPalette", "warm"), ("hasMedium", "watercolor"), ("hasMood", "serene")))
    assert {Triple(*g) for g in out.metadata["gained"]} == gained
    brute = {
        c: sum(len(gained & set(t)) for cc, t in frames.values() if cc == c)
        for c in ("film A", "film B", "film C")
    }
    assert out.train_ids == ["film A", "film B", "film C"]
    assert out.matrix[0].tolist() == [brute["film A"], brute["film B"], brute["film C"]] == [3, 1, 0]
    assert out.metadata["matched"]["film A"] == [["hasMedium", "watercolor", 1], ["hasPalette", "warm", 2]]
    with pytest.raises(StoreError, match="no image"):
        style_attribution(store, "missing", "orig")


def test_readme_example_runs(tmp_path, monkeypatch):
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "sourcetrace.kg" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    scores = namespace["scores"]
    assert scores.train_ids == ["train-1", "train-2"] and scores.query_ids == ["a blue striped dress"]
    # train-1 shares both triples (stripes -> striped, navy -> blue); train-2 only blue
    assert scores.matrix[0, 0] == 1.0 and 0 < scores.matrix[0, 1] < 1
    assert (tmp_path / "runs/kg.ttl").exists()

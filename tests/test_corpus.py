"""Corpus index: both engines against brute-force substring search, sources, tracing and bad input."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sourcetrace.corpus import CorpusIndex, WordTokenizer
from sourcetrace.corpus.engines import infini_gram_available
from sourcetrace.corpus.tokenizers import CallableTokenizer
from sourcetrace.errors import CorpusError, EmptyDataError, WorkdirMismatchError

ENGINES = [
    "portable",
    pytest.param(
        "infini-gram",
        marks=pytest.mark.skipif(
            not infini_gram_available(), reason="infini-gram wheel not installed on this platform"
        ),
    ),
]


def ids_tokenizer(vocab: int) -> CallableTokenizer:
    """Documents are given as ids; the tokenizer only fixes the width and the fingerprint."""
    return CallableTokenizer(
        lambda text: [int(t) for t in text.split()],
        lambda ids: " ".join(map(str, ids)),
        name=f"ids-{vocab}",
        vocab_size=vocab,
    )


# ---------------------------------------------------------------------- brute force


def bf_positions(docs: list[list[int]], q: list[int]) -> list[tuple[int, int]]:
    m = len(q)
    return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - m + 1) if doc[i : i + m] == q]


def bf_longest(docs: list[list[int]], q: list[int]) -> list[int]:
    out = []
    for i in range(len(q)):
        k = 0
        while i + k < len(q) and bf_positions(docs, q[i : i + k + 1]):
            k += 1
        out.append(k)
    return out


def bf_maximal(docs: list[list[int]], q: list[int], min_len: int) -> list[tuple[int, int]]:
    """Occurring substrings [i, j) that no other occurring substring contains, of length >= min_len."""
    lengths = bf_longest(docs, q)
    occ = [(i, i + n) for i, n in enumerate(lengths) if n > 0]
    maximal = [(a, b) for a, b in occ if not any(c <= a and b <= d and (c, d) != (a, b) for c, d in occ)]
    return [(a, b) for a, b in maximal if b - a >= min_len]


corpora = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=25), min_size=1, max_size=6)
queries = st.lists(st.integers(0, 4), min_size=1, max_size=12)


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    docs=corpora,
    qs=st.lists(queries, min_size=1, max_size=4),
    shard=st.sampled_from([4, 16, 10**6]),
    wide=st.booleans(),
)
def test_queries_equal_brute_force(engine, docs, qs, shard, wide):
    vocab = 70000 if wide and engine == "portable" else 300  # u32 or u16 tokens
    tok = ids_tokenizer(vocab if not (wide and engine != "portable") else 200)  # u8 for infini-gram's "wide"
    with tempfile.TemporaryDirectory() as tmp:
        idx = CorpusIndex.build(
            [{"ids": d} for d in docs],
            tok,
            Path(tmp) / "ix",
            engine=engine,
            shard_tokens=shard,
            progress=False,
        )
        assert idx.n_docs == len(docs) and idx.n_tokens == sum(len(d) + 1 for d in docs)
        for q in qs:
            expect = bf_positions(docs, q)
            assert idx.count(q) == len(expect)
            got = [(o.doc_index, o.offset) for o in idx.occurrences(q, limit=None)]
            assert sorted(got) == sorted(expect)
            assert idx.longest_matches(q).tolist() == bf_longest(docs, q)
            spans = idx.maximal_spans(q, min_len=2)
            assert [(s.start, s.end) for s in spans] == bf_maximal(docs, q, 2)
            for s in spans:
                assert s.count == len(bf_positions(docs, q[s.start : s.end]))
        idx.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_byte_index_text_queries(engine, tmp_path):
    docs = [
        {"id": "a", "text": "the cat sat on the mat.", "title": "A", "url": "https://a"},
        {"id": "b", "text": "a dog sat on the mat today"},
        {"id": "c", "text": "the cat sat on the hat"},
    ]
    idx = CorpusIndex.build(docs, "bytes", tmp_path / "ix", engine=engine, progress=False)
    assert idx.count("sat on the") == 3 and idx.count("zebra") == 0
    occ = idx.occurrences("on the m", window=4)
    assert [(o.doc_id, o.offset, o.before, o.match) for o in occ] == [
        ("a", 12, "sat ", "on the m"),
        ("b", 10, "sat ", "on the m"),
    ]
    assert occ[0].meta == {"title": "A", "url": "https://a"}
    assert idx.document(1)["text"] == "a dog sat on the mat today"
    occ = idx.occurrences("sat", limit=2)
    assert len(occ) == 2  # sampled
    idx.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_trace_ranks_merges_and_reranks(engine, tmp_path):
    docs = [
        "alpha beta gamma delta epsilon zeta eta theta iota",
        "kappa lambda mu nu xi omicron pi rho",
        "alpha beta gamma delta and other words about kappa lambda mu nu",
        "unrelated words only here",
    ]
    idx = CorpusIndex.build(docs, "word", tmp_path / "ix", engine=engine, progress=False)
    text = "we say alpha beta gamma delta epsilon zeta then kappa lambda mu nu xi and stop"
    full = idx.trace(text, prompt="greek letters", density=None, min_len=3)
    assert [s.text.strip() for s in full.spans] == [
        "alpha beta gamma delta epsilon zeta",
        "kappa lambda mu nu xi",
    ]
    assert {o.doc_id for o in full.spans[0].docs} == {"0"}
    cut = idx.trace(text, density=0.05, min_len=3)  # ceil(0.05 * 16) = 1: the most unusual span
    assert len(cut.spans) == 1 and cut.n_candidates == 2
    assert cut.spans[0].unigram_logprob == min(s.unigram_logprob for s in full.spans)
    short = idx.trace("alpha beta gamma delta", density=None, min_len=2)
    docs_hit = [o.doc_id for o in short.spans[0].docs]
    assert set(docs_hit) == {"0", "2"}
    # BM25 against the response: document 0 holds more of it than document 2
    assert short.spans[0].docs[0].bm25 >= short.spans[0].docs[1].bm25
    d = json.loads(json.dumps(full.to_dict()))
    assert d["merged"] and d["documents"][0]["relevance"] == "high"
    page = full.to_html()
    assert "<mark" in page and "alpha beta gamma delta epsilon zeta" in page
    idx.close()


def test_span_options_word_boundary_delimiters_max_count(tmp_path):
    idx = CorpusIndex.build(
        ["the cat sat. the cat ran", "cat sat"], "bytes", tmp_path / "ix", engine="portable", progress=False
    )
    q = "xthe cat sat. the cat"
    spans = idx.maximal_spans(q, min_len=2)
    assert [s.text for s in spans] == ["the cat sat. the cat"]
    bounded = idx.maximal_spans(q, min_len=2, word_boundary=True)
    # "the" is glued to "x", so its "t" is no word start; the span starts at the boundary before "cat"
    assert bounded and bounded[0].text.strip().startswith("cat")
    dot = ord(".")
    cut = idx.maximal_spans(q, min_len=2, delimiters=[dot])
    assert cut[0].text == "the cat sat."
    assert idx.maximal_spans("cat sat", max_count=1) == []  # occurs twice
    merged = idx.trace("the cat sat. the cat", min_len=3, density=None, word_boundary=False).merged
    assert len(merged) == 1
    idx.close()


# ---------------------------------------------------------------------- sources


def test_sources_jsonl_folder_and_reuse(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text(
        "\n".join(
            json.dumps({"id": f"d{i}", "text": f"document number {i}", "source": "web"}) for i in range(3)
        )
        + "\n"
    )
    idx = CorpusIndex.build(jl, "word", tmp_path / "ix", engine="portable", progress=False)
    assert idx.n_docs == 3 and idx.occurrences("number 2")[0].doc_id == "d2"
    assert idx.occurrences("number 2")[0].meta["source"] == "web"
    again = CorpusIndex.build(jl, "word", tmp_path / "ix", engine="portable", progress=False)  # reused
    assert again.manifest == idx.manifest
    reopened = CorpusIndex.open(tmp_path / "ix")  # word tokenizer stored with the index
    assert reopened.count("document number") == 3
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first file text")
    (folder / "sub" / "b.md").write_text("second file text")
    fx = CorpusIndex.build(folder, "bytes", tmp_path / "ix2", engine="portable", progress=False)
    assert sorted(o.doc_id for o in fx.occurrences("file text")) == ["a.txt", "sub/b.md"]
    assert fx.occurrences("first")[0].meta["title"] == "a"
    for x in (idx, again, reopened, fx):
        x.close()


# ---------------------------------------------------------------------- bad input


def _left_behind(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_input_is_refused_cleanly(engine, tmp_path):
    with pytest.raises(EmptyDataError):
        CorpusIndex.build([], "bytes", tmp_path / "empty", engine=engine, progress=False)
    with pytest.raises(CorpusError, match="has no text"):
        CorpusIndex.build(["fine", ""], "bytes", tmp_path / "blank", engine=engine, progress=False)
    ok = CorpusIndex.build(
        ["fine", ""], "bytes", tmp_path / "skip", engine=engine, skip_empty=True, progress=False
    )
    assert ok.n_docs == 1
    ok.close()
    with pytest.raises(CorpusError, match="beyond what a u8 index holds"):
        CorpusIndex.build(
            [{"ids": [1, 300]}],
            ids_tokenizer(1000),
            tmp_path / "wide",
            engine=engine,
            token_dtype="u8",
            progress=False,
        )
    with pytest.raises(CorpusError, match="beyond"):
        CorpusIndex.build(
            [{"ids": [70000]}], ids_tokenizer(1000), tmp_path / "wide2", engine=engine, progress=False
        )
    if engine == "infini-gram":
        with pytest.raises(CorpusError, match="32 GiB"):
            CorpusIndex.build(
                [{"ids": [70000]}], ids_tokenizer(80000), tmp_path / "wide3", engine=engine, progress=False
            )
    assert not (tmp_path / "empty").exists() and not (tmp_path / "blank").exists()
    assert not (tmp_path / "wide").exists() and _left_behind(tmp_path) == []


def test_tokenizer_mismatch_missing_index_and_other_data(tmp_path):
    idx = CorpusIndex.build(["some words here"], "word", tmp_path / "ix", engine="portable", progress=False)
    idx.close()
    other = WordTokenizer.fit(["different words"])
    with pytest.raises(CorpusError, match="another tokenizer"):
        CorpusIndex.open(tmp_path / "ix", other)
    with pytest.raises(CorpusError, match="no corpus index"):
        CorpusIndex.open(tmp_path / "nothing")
    tok = WordTokenizer.fit(["some words here", "other words"])
    CorpusIndex.build(["some words here"], tok, tmp_path / "ix2", engine="portable", progress=False).close()
    with pytest.raises(WorkdirMismatchError):
        CorpusIndex.build(["other words"], tok, tmp_path / "ix2", engine="portable", progress=False)
    rebuilt = CorpusIndex.build(
        ["other words"], tok, tmp_path / "ix2", engine="portable", overwrite=True, progress=False
    )
    assert rebuilt.count("other words") == 1 and rebuilt.count("some") == 0
    rebuilt.close()
    assert _left_behind(tmp_path) == []
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(CorpusError, match="not empty"):
        CorpusIndex.build(["a"], "bytes", tmp_path / "junk", progress=False)


def test_unknown_tokens_never_match(tmp_path):
    tok = WordTokenizer.fit(["known words only"])
    idx = CorpusIndex.build(["known words only"], tok, tmp_path / "ix", engine="portable", progress=False)
    assert idx.count("mystery") == 0  # <unk>
    assert idx.longest_matches("known mystery words only").tolist() == [1, 0, 2, 1]
    idx.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_index_matches_single(engine, tmp_path):
    rng = np.random.default_rng(0)
    docs = [{"ids": rng.integers(0, 5, size=int(rng.integers(5, 40))).tolist()} for _ in range(40)]
    tok = ids_tokenizer(50)
    one = CorpusIndex.build(docs, tok, tmp_path / "one", engine=engine, progress=False)
    many = CorpusIndex.build(docs, tok, tmp_path / "many", engine=engine, shard_tokens=100, progress=False)
    assert many.n_shards > 3
    for _ in range(20):
        q = rng.integers(0, 5, size=int(rng.integers(1, 6))).tolist()
        assert one.count(q) == many.count(q)
        assert [(o.doc_index, o.offset) for o in one.occurrences(q, limit=None)] == [
            (o.doc_index, o.offset) for o in many.occurrences(q, limit=None)
        ]
    q = rng.integers(0, 5, size=60)
    assert one.longest_matches(q).tolist() == many.longest_matches(q).tolist()
    one.close()
    many.close()


@pytest.mark.skipif(not infini_gram_available(), reason="infini-gram wheel not installed on this platform")
def test_infini_gram_multi_job_build_agrees_with_portable(tmp_path):
    """A shard big enough that the packaged indexer splits it into several make-part jobs."""
    rng = np.random.default_rng(1)
    docs = [{"ids": rng.integers(0, 300, size=1000)} for _ in range(500)]  # ~1 MB of u16 tokens
    tok = ids_tokenizer(300)
    ig = CorpusIndex.build(docs, tok, tmp_path / "ig", engine="infini-gram", cpus=2, progress=False)
    pt = CorpusIndex.build(docs, tok, tmp_path / "pt", engine="portable", progress=False)
    for _ in range(30):
        d = docs[int(rng.integers(0, 500))]["ids"]
        a = int(rng.integers(0, 990))
        q = d[a : a + int(rng.integers(1, 4))]
        assert ig.count(q) == pt.count(q)
    q = np.concatenate([docs[3]["ids"][100:150], rng.integers(0, 300, size=50)])
    assert ig.longest_matches(q).tolist() == pt.longest_matches(q).tolist()
    ig.close()
    pt.close()

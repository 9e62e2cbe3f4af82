"""Verbatim spans list every document that holds the words: planted passages, both tokenizers, brute force.

Documents are made of words that all have four characters, so a passage occurs in a document's text exactly
where it occurs as whole words; the query puts the passage between words that occur nowhere in the corpus
(capital letters), so the span a user should see is the passage itself, and the documents it must list are
found by a regular expression over the raw texts.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sourcetrace.corpus import CorpusIndex, WordTokenizer
from sourcetrace.corpus.tokenizers import word_edges

ALPHABET = "abcdeé"  # a non-ASCII letter, so byte spans must not cut characters
word = st.text(ALPHABET, min_size=4, max_size=4)
novel = st.text("QXZ", min_size=3, max_size=6)  # never in the corpus
before = st.sampled_from(["", "(", '"', "« ", "- ", "\n"])
after = st.sampled_from(["", ".", ",", ")", "!", '"', " »", "\n"])
place = st.sampled_from(["start", "end", "middle", "alone", "absent"])
gap = st.sampled_from([" ", "\n", "  "])


@st.composite
def planted(draw):
    passage = " ".join(draw(st.lists(word, min_size=2, max_size=6)))
    docs = []
    for _ in range(draw(st.integers(2, 6))):
        where = draw(place)
        fill1 = " ".join(draw(st.lists(word, min_size=1, max_size=4)))
        fill2 = " ".join(draw(st.lists(word, min_size=1, max_size=4)))
        core = draw(before) + passage + draw(after)
        docs.append(
            {
                "start": core + draw(gap) + fill2,
                "end": fill1 + draw(gap) + core,
                "middle": fill1 + draw(gap) + core + draw(gap) + fill2,
                "alone": core,
                "absent": fill1 + draw(gap) + fill2,
            }[where]
        )
    if not any(holds(d, passage) for d in docs):
        docs[0] = passage + " " + docs[0]
    head = draw(novel) + draw(gap) if draw(st.booleans()) else ""
    tail = draw(gap) + draw(novel) if draw(st.booleans()) else ""
    query = head + draw(before) + passage + draw(after) + tail
    return passage, docs, query


def holds(doc: str, passage: str) -> bool:
    """Brute force: the passage occurs in the document as whole words."""
    return re.search(r"(?<!\w)" + re.escape(passage) + r"(?!\w)", doc) is not None


def holds_tokens(doc: str, passage: str) -> bool:
    """Brute force for the word tokenizer: the passage's tokens occur in the document's tokens."""
    toks, p = re.findall(r"\w+|[^\w\s]", doc), re.findall(r"\w+|[^\w\s]", passage)
    return any(toks[i : i + len(p)] == p for i in range(len(toks) - len(p) + 1))


def build(docs: list[str], tokenizer: str, folder: Path) -> CorpusIndex:
    return CorpusIndex.build(
        [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)],
        tokenizer,
        folder,
        engine="portable",
        progress=False,
    )


@pytest.mark.parametrize("tokenizer", ["bytes", "word"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=planted())
def test_every_holder_of_a_planted_passage_is_listed(tokenizer, case):
    passage, docs, query = case
    check = holds if tokenizer == "bytes" else holds_tokens
    expected = {f"d{i}" for i, d in enumerate(docs) if check(d, passage)}
    with tempfile.TemporaryDirectory() as tmp:
        idx = build(docs, tokenizer, Path(tmp) / "ix")
        res = idx.trace(query, min_len=1, density=None, docs_per_span=100)
        idx.close()
    assert res.text == query  # the trace shows the text as written
    assert [s.text.strip() for s in res.spans] == [passage]
    assert {o.doc_id for o in res.spans[0].docs} == expected
    if tokenizer == "bytes":
        assert res.spans[0].count == sum(d.startswith(passage, i) for d in docs for i in range(len(d)))


def test_a_passage_ending_a_document_is_listed_with_the_others(tmp_path):
    """The reported case: a passage followed by a space in two documents and ending the third."""
    passage = "the tide came in slowly over the grey stones of the old harbour wall"
    docs = [f"first {passage} and then more", f"second {passage} as before", f"third one ends with {passage}"]
    for tokenizer in ("bytes", "word"):
        idx = build(docs, tokenizer, tmp_path / tokenizer)
        res = idx.trace(f"She wrote that {passage} yesterday.", min_len=4, density=None)
        assert [s.text.strip() for s in res.spans] == [passage], tokenizer
        assert sorted(o.doc_id for o in res.spans[0].docs) == ["d0", "d1", "d2"], tokenizer
        idx.close()


# ---------------------------------------------------------------------- maximality against brute force


def bf_spans(docs: list[str], query: str) -> list[str]:
    """Maximal whole-word substrings of `query` that occur in some document (the byte tokenizer's spans)."""
    starts = [m.start() for m in re.finditer(r"\w+", query)]
    ends = [m.end() for m in re.finditer(r"\w+", query)]
    occ = [(a, b) for a in starts for b in ends if b > a and any(query[a:b] in d for d in docs)]
    keep = [(a, b) for a, b in occ if not any(c <= a and b <= d and (c, d) != (a, b) for c, d in occ)]
    return [query[a:b] for a, b in sorted(keep)]


small_word = st.sampled_from(["ab", "ba", "abé", "é"])
texts = st.lists(
    st.tuples(small_word, st.sampled_from([" ", ", ", ". ", "\n", "-"])), min_size=1, max_size=10
).map(lambda ws: "".join(w + s for w, s in ws).rstrip())


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(texts, min_size=1, max_size=4), query=texts)
def test_byte_spans_are_the_maximal_whole_word_matches(docs, query):
    with tempfile.TemporaryDirectory() as tmp:
        idx = build(docs, "bytes", Path(tmp) / "ix")
        got = [s.text for s in idx.trace(query, min_len=1, density=None).spans]
        idx.close()
    assert got == bf_spans(docs, query)


def test_word_edges_keep_characters_whole_and_drop_edge_punctuation():
    # "é" is two bytes: the first decodes to nothing and must go with the second
    pieces = ["(", "a", "", "é", " ", "b", ")"]
    start, end = word_edges(pieces)
    assert start.tolist() == [False, True, False, False, False, True, False, False]
    assert end.tolist() == [False, False, False, False, True, False, True, False]
    # subword pieces: a word split in two tokens cannot be cut between them
    start, end = word_edges([" walk", "ing", " home", "."])
    assert start.tolist() == [True, False, True, False, False]
    assert end.tolist() == [False, False, True, True, False]


def test_min_len_counts_words_for_every_tokenizer(tmp_path):
    docs = ["the cat sat on the mat", "a dog sat on the mat"]
    tok = WordTokenizer.fit(docs)
    for tokenizer in ("bytes", tok):
        idx = build(docs, tokenizer, tmp_path / str(id(tokenizer)))
        three = idx.trace("my dog sat on the sofa", min_len=3, density=None)
        assert [s.text.strip() for s in three.spans] == ["dog sat on the"]
        assert idx.trace("my dog sat on the sofa", min_len=5, density=None).spans == []
        idx.close()


# ---------------------------------------------------------------------- Hugging Face tokenizers keep spacing


def byte_level_bpe():
    """A GPT-2-style byte-level BPE, trained here on a few sentences (no download)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the café — a fox jumps, over (the) lazy dog.\n  and then"] * 10, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def test_hf_tokenizer_object_traces_keep_the_text(tmp_path):
    from sourcetrace.corpus.tokenizers import HFTokenizer, pieces_by_prefix

    hf = byte_level_bpe()
    docs = ["we met at the café — a fox jumps over the lazy dog.", "the lazy dog slept\n  all day"]
    idx = CorpusIndex.build(docs, hf, tmp_path / "ix", engine="portable", progress=False)
    idx.close()
    idx = CorpusIndex.open(tmp_path / "ix")  # the tokenizer was stored with the index
    query = "Then  the café — a fox jumps over the LAZY cat"
    res = idx.trace(query, min_len=2, density=None)
    assert res.text == query and "".join(res.pieces) == query
    assert [s.text.strip() for s in res.spans] == ["the café — a fox jumps over the"]
    occ = res.spans[0].docs[0]
    assert occ.doc_id == "0" and occ.before + occ.match + occ.after == docs[0]
    idx.close()
    # pieces of any ids join to their decoded text, even where a token holds part of a character
    tok = HFTokenizer(hf)
    ids = tok.encode("café — ok")
    assert "".join(tok.pieces(ids)) == tok.decode(ids) == "café — ok"
    assert "".join(pieces_by_prefix(tok.decode, ids)) == "café — ok"

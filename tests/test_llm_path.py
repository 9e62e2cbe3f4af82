"""The language-model user's path: text rows to examples, the compact default, the store-size warning,
Scores.is_dense, and the README's LLM example on the trial's setting (planted sentences)."""

import re
import warnings
from pathlib import Path

import pytest
import torch

import sourcetrace as st
from sourcetrace.demos.llm import planted_documents
from sourcetrace.demos.tiny_lm import tiny_gpt2, word_tokenizer
from sourcetrace.errors import ShapeError
from sourcetrace.methods import gradient

ROWS = [{"id": "a", "text": "the chef bakes fresh bread ."},
        {"id": "b", "text": "the probe reaches the moon ."},
        {"id": "c", "text": "the farmer feeds the cows at dawn ."}]


class RowsDataset:
    """A stand-in for `datasets.Dataset`: column names, len, integer rows as dicts, whole columns by name."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [r[key] for r in self.rows]
        return dict(self.rows[key])


class PlainRows:
    """Only __len__ and __getitem__(int) -> dict: the least a row source needs."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return dict(self.rows[i])


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer([r["text"] for r in ROWS] + ["zorbin paints"])


def test_text_rows_map_to_token_ids_as_documented(tok):
    ex = st.lm_examples(RowsDataset(ROWS), tok, bos=True, eos=True)
    own = tok("the chef bakes fresh bread .")["input_ids"]
    assert ex[0] == {"input_ids": [tok.bos_token_id, *own, tok.eos_token_id]}
    assert st.lm_examples(ROWS, tok)[0] == {"input_ids": own}  # the tokenizer's own special tokens only
    pc = st.lm_examples([{"prompt": "zorbin", "completion": " paints the moon ."}], tok, bos=True)[0]
    assert pc == {"prompt": [tok.bos_token_id, *tok("zorbin")["input_ids"]],
                  "completion": tok(" paints the moon .", add_special_tokens=False)["input_ids"]}
    assert st.lm_examples([{"input_ids": [3, 4], "labels": [-100, 4]}], tok)[0] == \
        {"input_ids": [3, 4], "labels": [-100, 4]}
    assert st.lm_examples(ROWS, tok, max_length=3)[2] == {"input_ids": own[:0] + tok(ROWS[2]["text"])
                                                         ["input_ids"][:3]}


def test_dataset_like_rows_keep_their_ids_and_score_like_a_list(tok):
    model = tiny_gpt2(len(tok))
    task = st.CausalLMTask(pad_token_id=tok.pad_token_id)
    lists = [{"input_ids": tok(r["text"])["input_ids"]} for r in ROWS]
    for rows in (RowsDataset(ROWS), PlainRows(ROWS)):
        data = st.lm_examples(rows, tok)
        assert st.Examples(data).ids == ["a", "b", "c"]  # the "id" column (or field) gives the ids
        attr = st.Attributor(model, task, "grad-dot", progress=False, features="identity")
        scores = attr.fit(data).score(data[:1] if isinstance(data, list) else [data[0]])
        plain = st.Attributor(model, task, "grad-dot", progress=False, features="identity").fit(lists)
        assert torch.allclose(scores.matrix, plain.score(lists[:1]).matrix)


def test_rows_without_text_get_a_clear_error(tok):
    with pytest.raises(ShapeError, match="text=..."):
        st.lm_examples(RowsDataset([{"body": "x"}]), tok)
    with pytest.raises(ShapeError, match="'text'"):
        st.lm_examples([{"body": "x"}], tok)[0]
    with pytest.raises(ShapeError, match="must hold text"):
        st.lm_examples([{"text": [1, 2]}], tok)[0]


def test_is_dense_and_the_deprecated_dense():
    full = st.Scores(torch.zeros(1, 2), [0, 1], ["q"])
    assert full.is_dense
    with pytest.warns(DeprecationWarning, match="is_dense"):
        assert full.dense is True


def test_language_models_store_kronecker_features_unless_asked(tok):
    model, task = tiny_gpt2(len(tok)), st.CausalLMTask(pad_token_id=tok.pad_token_id)
    for method in ("grad-dot", "ekfac", "tracin"):
        opts = {"checkpoints": [model.state_dict()], "learning_rates": [1.0]} if method == "tracin" else {}
        assert st.Attributor(model, task, method, **opts).method.options.features == "kronecker"
    assert st.Attributor(model, task, "grad-dot", features="identity").method.options.features == "identity"
    assert st.Attributor(model, task, "cg").method.options.features == "identity"  # no Kronecker form
    # TRAK keeps its random projection, after the Kronecker one (a dense matrix small enough to keep)
    assert st.Attributor(model, task, "trak").method.options.features == "structured"
    assert st.Attributor(model, task, "trak", proj_dim=64).method.options.features == "random"  # chosen
    clf = torch.nn.Linear(3, 2)
    assert st.Attributor(clf, st.ClassificationTask()).method.options.features == "identity"


def test_store_size_warning_states_the_size_and_the_option(tok, monkeypatch):
    model, task = tiny_gpt2(len(tok)), st.CausalLMTask(pad_token_id=tok.pad_token_id)
    data = st.lm_examples(ROWS, tok)
    n_params = sum(p.numel() for p in model.parameters())
    expected = len(ROWS) * n_params * 4  # identity features: every parameter, float32
    monkeypatch.setattr(gradient, "STORE_WARN_BYTES", expected - 1)
    with pytest.warns(UserWarning, match="features='kronecker'") as caught:
        attr = st.Attributor(model, task, "grad-dot", progress=False, features="identity").fit(data)
    message = next(str(w.message) for w in caught if "training store" in str(w.message))
    assert f"{len(ROWS)} examples x {n_params} features x 4 bytes" in message
    assert attr.method.stores[0].dim == n_params
    monkeypatch.setattr(gradient, "STORE_WARN_BYTES", expected)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st.Attributor(model, task, "grad-dot", progress=False, features="identity").fit(data)
    assert not [w for w in caught if "training store" in str(w.message)]


def test_planted_documents_hold_each_fact_in_its_documents_only():
    docs, facts = planted_documents(n_docs=40, copies=2, seed=3)
    for f, fact in enumerate(facts):
        sentence = fact["prompt"] + fact["completion"]
        holding = [d["id"] for d in docs if sentence in d["text"]]
        assert holding == fact["documents"] == [d["id"] for d in docs if d["planted"] == f]


def readme_lm_block() -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "planted_documents" in b)


@pytest.mark.slow
def test_readme_lm_example_ranks_every_planted_document_in_the_top_5(tmp_path, monkeypatch):
    """The trial's setting: GPT-2 from config, ~300 documents, the README's example with its defaults."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    torch.set_num_threads(1)
    exec(compile(readme_lm_block(), "README.md", "exec"), namespace)
    scores, facts, attr = namespace["scores"], namespace["facts"], namespace["attr"]
    assert attr.method.options.features == "kronecker"
    for fact in facts:
        top = [a.train_id for a in scores.top(query=fact["id"], k=5)]
        assert set(fact["documents"]) <= set(top), (fact, top)
    store_bytes = sum(f.stat().st_size for f in attr.workdir.rglob("*") if f.is_file())
    assert store_bytes <= 50 * 2**20


def test_trial_ranks_and_rank_correlation_against_independent_computations():
    from scipy.stats import spearmanr

    from sourcetrace.bench.llm_trial import planted_ranks, spearman

    matrix = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.4, 0.6]])
    scores = st.Scores(matrix, [10, 11, 12, 13], ["f", "g"])
    facts = [{"id": "f", "documents": [11, 13]}, {"id": "g", "documents": [12]}]
    assert planted_ranks(scores, facts) == [[1, 3], [3]]
    a, b = torch.randn(3, 20), torch.randn(3, 20)
    want = sum(spearmanr(a[q], b[q]).statistic for q in range(3)) / 3
    assert spearman(a, b) == pytest.approx(want, abs=1e-9)

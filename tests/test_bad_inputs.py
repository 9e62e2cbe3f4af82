"""The input boundary: each bad input a user can give, and the error (type and words) they see.

One row per case: a name, a call that must fail, the error type and a fragment of its message that says
what went wrong or what to do. The rows go through the public API only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sourcetrace as st
from models import tiny_gpt2
from sourcetrace.ensembles import SubsetRetraining
from sourcetrace.errors import (
    EmptyDataError,
    InvalidOptionError,
    ScoresError,
    ShapeError,
    SourcetraceError,
    UnknownMethodError,
)

X = torch.randn(12, 4)
Y = torch.arange(12) % 3


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def fitted(**options) -> st.Attributor:
    return st.Attributor(linear(), st.ClassificationTask(), progress=False, **options).fit((X, Y))


def classify(train, task=None, **options):
    attr = st.Attributor(linear(), task or st.ClassificationTask(), progress=False, **options)
    return attr.fit(train)


class PlainLM(nn.Module):
    """A plain PyTorch LM: forward(tokens) -> logits [B, T, V]."""

    def __init__(self, vocab: int = 10):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, tokens):
        return self.out(self.emb(tokens))


def lm_fit(train, model=None):
    model = model if model is not None else tiny_gpt2(vocab_size=12)
    return st.Attributor(model, st.CausalLMTask(), progress=False).fit(train)


def lm_score(query, model=None):
    model = model if model is not None else tiny_gpt2(vocab_size=12)
    attr = st.Attributor(model, st.CausalLMTask(), progress=False)
    return attr.fit([{"prompt": [1, 2], "completion": [3, 4]}]).score(query)


def batch_encoding():
    from transformers import BatchEncoding

    return BatchEncoding({"input_ids": [[1, 2, 3], [4, 5, 6]], "attention_mask": [[1, 1, 1], [1, 1, 1]]})


def scores(query_ids=("a", "b"), train_ids=("t0", "t1", "t2")) -> st.Scores:
    m = torch.arange(len(query_ids) * len(train_ids), dtype=torch.float64).reshape(len(query_ids), -1)
    return st.Scores(m, list(train_ids), list(query_ids), "grad-dot")


def truth(n_train: int = 3, n_query: int = 2, subsets: int = 4) -> SubsetRetraining:
    rng = np.random.default_rng(0)
    masks = rng.random((subsets, n_train)) < 0.5
    per_seed = rng.standard_normal((subsets, 1, n_query))
    return SubsetRetraining(masks=masks, measurements=per_seed.mean(1), per_seed=per_seed)


def ambiguous_ids() -> st.Scores:
    return scores(query_ids=(5, 3, 0, 1), train_ids=("t0", "t1"))


CASES = [
    # ---- training data and ids (data.Examples) -----------------------------------------------------
    ("list [x, y] instead of a tuple", lambda: classify([X, Y]), ShapeError, "pass a tuple (x, y)"),
    ("3-tuple (x, y, w)", lambda: classify((X, Y, torch.ones(12))), ShapeError, "tuple of 3 arrays"),
    ("DataLoader", lambda: classify(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y))),
     ShapeError, "pass its dataset (loader.dataset)"),
    ("dict of columns", lambda: classify({"x": X, "y": Y}), ShapeError, "is a mapping of columns (x, y)"),
    ("a tokenizer's output (BatchEncoding)", lambda: lm_fit(batch_encoding()), ShapeError,
     "for a tokenizer's output"),
    ("empty list", lambda: classify([]), EmptyDataError, "training data is empty"),
    ("a generator", lambda: classify(((x, y) for x, y in zip(X, Y))), ShapeError, "must be sized"),
    ("x and y of different lengths", lambda: classify((X, Y[:5])), ShapeError, "12 inputs but 5 targets"),
    ("too few ids", lambda: fitted().fit((X, Y), ids=list(range(5))), ShapeError, "5 ids for 12 examples"),
    ("duplicate ids", lambda: fitted().fit((X, Y), ids=[0] * 12), ShapeError, "0 appears more than once"),
    ("unhashable list ids", lambda: fitted().fit((X, Y), ids=[[i] for i in range(12)]), ShapeError,
     "an id must be an int, a str, or a tuple"),
    ("object ids", lambda: fitted().fit((X, Y), ids=[object() for _ in range(12)]), ShapeError,
     "an id must be"),
    ("ids given as one string", lambda: fitted().fit((X, Y), ids="abcdefghijkl"), ShapeError,
     "one id per example"),
    ("JSONL path that does not exist", lambda: classify("no/such/file.jsonl"), FileNotFoundError,
     "does not exist; give a JSONL file"),
    # ---- batches and labels (tasks) ------------------------------------------------------------------
    ("labels out of range", lambda: classify((X, torch.full((12,), 7))), ShapeError,
     "label 7 is out of range for a classifier with 3 classes"),
    ("negative labels", lambda: classify((X, -torch.ones(12, dtype=torch.long))), ShapeError,
     "label -1 is out of range"),
    ("float labels", lambda: classify((X, Y.float())), ShapeError, "use RegressionTask"),
    ("labels of shape [N, 1]", lambda: classify((X, Y[:, None])), ShapeError, "one class index per example"),
    ("dict rows missing the target key", lambda: classify([{"x": x} for x in X]), ShapeError,
     "'y' missing"),
    ("dict rows with other key names", lambda: classify([{"features": x, "label": y} for x, y in zip(X, Y)]),
     ShapeError, "pass input_key=... and target_key="),
    ("dict rows with different keys", lambda: classify([{"x": X[0], "y": Y[0]}, {"x": X[1]}]), ShapeError,
     "different keys"),
    ("examples of three parts", lambda: classify([(x, y, 1.0) for x, y in zip(X, Y)]), ShapeError,
     "got a list of 3"),
    ("regression targets of another shape", lambda: st.Attributor(
        nn.Linear(4, 2), st.RegressionTask(), progress=False).fit((X, torch.randn(12, 3))), ShapeError,
     "do not match the model's output"),
    ("unknown classification measurement", lambda: st.ClassificationTask(measurement="accuracy"),
     InvalidOptionError, "'margin' or 'loss'"),
    # ---- the Attributor's arguments --------------------------------------------------------------------
    ("task=None", lambda: st.Attributor(linear(), None), InvalidOptionError, "give a Task, e.g."),
    ("the task class, not an instance", lambda: st.Attributor(linear(), st.ClassificationTask),
     InvalidOptionError, "create one: ClassificationTask()"),
    ("a task without measurement", lambda: st.Attributor(linear(), object()), InvalidOptionError,
     "has no train_loss or measurement"),
    ("a model that is not a Module", lambda: st.Attributor(lambda x: x, st.ClassificationTask()), TypeError,
     "model must be a torch.nn.Module"),
    ("batch_size='64'", lambda: st.Attributor(linear(), st.ClassificationTask(), batch_size="64"),
     InvalidOptionError, "pass batch_size=64"),
    ("batch_size=0", lambda: st.Attributor(linear(), st.ClassificationTask(), batch_size=0),
     InvalidOptionError, "batch_size must be a positive int"),
    ("unknown method", lambda: st.Attributor(linear(), st.ClassificationTask(), "ekfca"), UnknownMethodError,
     "ekfca"),
    ("score before fit", lambda: st.Attributor(linear(), st.ClassificationTask()).score((X, Y)),
     SourcetraceError, "call fit(train_data) before scoring"),
    ("top_k=-1", lambda: fitted().score((X[:2], Y[:2]), top_k=-1), InvalidOptionError,
     "top_k must be a positive int"),
    ("top_k='5'", lambda: fitted().score((X[:2], Y[:2]), top_k="5"), InvalidOptionError, "got '5'"),
    # ---- language models (CausalLMTask) ----------------------------------------------------------------
    ("a raw string as an LM example", lambda: lm_fit(["the cat sat on the mat"]), ShapeError,
     "an LM example is token ids, not text"),
    ("text as the completion", lambda: lm_score([{"prompt": [1], "completion": "a cat"}]), ShapeError,
     "encode it with the model's tokenizer"),
    ("token ids beyond the vocabulary", lambda: lm_fit([{"input_ids": [1, 2, 40]}]), ShapeError,
     "token id 40 is outside the model's vocabulary of 12 tokens"),
    ("negative token ids", lambda: lm_fit([{"input_ids": [1, -3, 4]}]), ShapeError,
     "token id -3 is outside the model's vocabulary"),
    ("label ids beyond the vocabulary", lambda: lm_fit([{"input_ids": [1, 2, 3], "labels": [1, 2, 99]}]),
     ShapeError, "label token 99 is outside"),
    ("an empty completion", lambda: lm_score([{"prompt": [1, 2, 3], "completion": []}]), EmptyDataError,
     "has no tokens to score"),
    ("labels all -100", lambda: lm_fit([{"input_ids": [1, 2, 3], "labels": [-100] * 3}]), EmptyDataError,
     "give at least one completion token"),
    ("prompt without completion", lambda: lm_fit([{"prompt": [1, 2]}]), ShapeError,
     "needs both 'prompt' and 'completion'"),
    ("a row with neither input_ids nor prompt", lambda: lm_fit([{"text": [1, 2]}]), ShapeError,
     "needs 'input_ids' or 'prompt' and 'completion'"),
    ("input_ids and labels of different lengths",
     lambda: lm_fit([{"input_ids": [1, 2, 3], "labels": [1, 2]}]), ShapeError, "same length"),
    ("nested token lists", lambda: lm_fit([{"input_ids": [[1, 2], [3, 4]]}]), ShapeError,
     "flat list of ints"),
    ("a plain LM given left padding", lambda: st.CausalLMTask().train_loss(
        PlainLM(), {"input_ids": torch.tensor([[0, 1, 2]]), "attention_mask": torch.tensor([[0, 1, 1]]),
                    "labels": torch.tensor([[-100, 1, 2]])}), ShapeError, "takes no attention_mask"),
    # ---- Scores ------------------------------------------------------------------------------------------
    ("top(k=-1)", lambda: scores().top("a", k=-1), InvalidOptionError, "k must be a positive int"),
    ("bottom(k=0)", lambda: scores().bottom("a", k=0), InvalidOptionError, "k must be a positive int"),
    ("top(query=3) where 3 is an id and another row's position", lambda: ambiguous_ids().top(3),
     ScoresError, "ambiguous: it is the id of row 1 and also the position of row 3"),
    ("top of an unknown query id", lambda: scores().top("zz"), ScoresError, "no query 'zz'"),
    ("top(row=) out of range", lambda: scores().top(row=7), ScoresError, "row must be a position in [0, 2)"),
    ("top with both row and query_id", lambda: scores().top(row=0, query_id="a"), ScoresError,
     "give one of query, row and query_id"),
    ("top(query_id=) unknown", lambda: ambiguous_ids().top(query_id=9), ScoresError, "no query with id 9"),
    ("save ids JSON would change", lambda: scores(train_ids=(object(), "t1", "t2")).save("unused"),
     ShapeError, "an id must be"),
    ("load a folder without scores", lambda: st.Scores.load("no/such/folder"), FileNotFoundError,
     "holds no saved scores"),
    ("group_by with too few labels", lambda: scores().group_by(["x", "y"]), ShapeError,
     "2 labels for 3 training examples"),
    ("removal_effect of an unknown id", lambda: scores().removal_effect(["nope"], scale=1.0), ScoresError,
     "no training examples with ids"),
    # ---- evaluate --------------------------------------------------------------------------------------
    ("lds of a shuffled Scores missing a ground-truth id", lambda: st.evaluate.lds(
        scores(), truth(), train_ids=["t0", "t1", "t9"], query_ids=["a", "b"]), ShapeError,
     "ground-truth ids have no scores"),
    ("lds with ids but a plain matrix", lambda: st.evaluate.lds(
        np.zeros((2, 3)), truth(), train_ids=["t0", "t1", "t2"]), ShapeError, "pass a sourcetrace.Scores"),
    ("lds of another shape", lambda: st.evaluate.lds(np.zeros((2, 4)), truth()), ShapeError,
     "expected [n_query, n_train] = [2, 3]"),
    ("lds with one subset", lambda: st.evaluate.lds(np.zeros((2, 3)), truth(subsets=1)), EmptyDataError,
     "at least 2"),
]


@pytest.mark.parametrize("call, error, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_clear_message(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)

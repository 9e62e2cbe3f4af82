"""facts-lm: corpus invariants, tokenizer, and the tiny LM pipeline on a very small setting."""

import numpy as np
import pytest
import torch

from sourcetrace.bench import facts_lm as fl


@pytest.fixture(scope="module")
def corpus():
    return fl.make_corpus(n_entities=5, n_pretrain_entities=4, n_filler=4, n_pretrain_filler=5, seed=3)


def test_sources_state_the_fact_and_nothing_else_does(corpus):
    for q in corpus.queries:
        assert len(q.sources) == 2
        for i, d in enumerate(corpus.train):
            says = fl.states_fact(d.text, q.entity, q.relation, q.answer)
            assert says == (i in q.sources), (q, d)
        # distractors name the entity and its answer word without stating the fact
        distractors = [corpus.train[i] for i in q.entity_docs if corpus.train[i].kind == "distractor"]
        assert distractors and all(q.entity in d.text.split() and q.answer in d.text.split()
                                   for d in distractors)
        assert set(q.sources) <= set(q.entity_docs)
        assert all(corpus.train[i].entity == q.entity for i in q.entity_docs)


def test_queries_are_paraphrases_not_copies(corpus):
    for q in corpus.queries:
        assert q.template not in corpus.source_templates[(q.entity, q.relation)]
        for i in q.sources:
            assert q.prompt not in corpus.train[i].text
        # the query's answer is the fact's answer, and the prompt names the entity
        assert corpus.facts[q.entity][q.relation] == q.answer and q.entity in q.prompt.split()


def test_fine_tuned_entities_are_new_to_pretraining(corpus):
    pre = {w for t in corpus.pretrain for w in t.split()}
    assert not set(corpus.facts) & pre
    assert corpus.texts() and len({d.id for d in corpus.train}) == len(corpus.train)


def test_corpus_is_deterministic(corpus):
    again = fl.make_corpus(n_entities=5, n_pretrain_entities=4, n_filler=4, n_pretrain_filler=5, seed=3)
    assert [d.text for d in again.train] == [d.text for d in corpus.train]


def test_tokenizer_round_trip(corpus):
    tok = fl.WordTokenizer.fit(corpus.texts())
    text = corpus.train[0].text
    ids = tok.encode(text, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == text
    assert tok.encode("zzz-unknown", bos=False) == [tok.unk_id]
    ex = fl.query_example(tok, corpus.queries[0])
    assert tok.decode(ex["prompt"]) == corpus.queries[0].prompt and tok.decode(ex["completion"]) == \
        corpus.queries[0].answer


def test_checkpoint_schedules():
    assert fl.checkpoint_steps(1000, 6) == [0, 167, 333, 500, 667, 833]
    # geometric: two per doubling from total // 200, dense early in fine-tuning
    assert fl.checkpoint_steps(1000, 6, "geometric") == [0, 5, 10, 15, 20, 30, 40, 60, 80, 120, 160, 240,
                                                         320, 480, 640, 960]
    assert fl.checkpoint_steps(5, 2, "geometric") == [0, 1, 2, 3, 4]
    assert fl.FactsSetting().checkpoint_schedule == "geometric"
    with pytest.raises(ValueError):
        fl.checkpoint_steps(10, 2, "log")


def test_small_pipeline_trains_and_scores(tmp_path):
    setting = fl.FactsSetting.small()
    t = fl.trained(setting, tmp_path)
    assert t.stats["parameters"] < 1_000_000
    assert len(t.checkpoints) == setting.n_checkpoints and len(t.rates) == setting.n_checkpoints
    # checkpoint 0 is the base model
    assert all(torch.equal(t.checkpoints[0][k], v) for k, v in t.base.state_dict().items())
    lp = fl.answer_logprobs(t.model, t.queries)
    assert lp.shape == (len(t.queries),) and np.all(lp < 0)
    again = fl.trained(setting, tmp_path)  # loaded from the workdir, not retrained
    assert torch.equal(next(again.model.parameters()), next(t.model.parameters()))
    bm = fl.bm25_scores(t.corpus, with_answer=True)
    assert bm.shape == (len(t.queries), len(t.train))


@pytest.mark.slow
def test_leave_sources_out_lowers_the_answer(tmp_path):
    setting = fl.FactsSetting(n_entities=8, n_pretrain_entities=30, n_filler=10, n_pretrain_filler=60,
                              pretrain_epochs=8, finetune_epochs=30)
    t = fl.trained(setting, tmp_path)
    check = fl.leave_sources_out(setting, t, n_queries=6)
    assert check["drop_without_sources"] > max(0.5, 3 * abs(check["drop_without_distractors"]))

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


def test_gpt2_setting_trains_and_attributes_its_layers(tmp_path):
    from sourcetrace.grads.capture import select_parameters

    setting = fl.FactsSetting(**{**fl.FactsSetting.small().__dict__, "arch": "gpt2"})
    t = fl.trained(setting, tmp_path)
    assert type(t.model).__name__ == "GPT2LMHeadModel" and t.stats["parameters"] < 1_000_000
    names = set(select_parameters(t.model, fl.attributed_modules(t.model)))
    every = {n for n, _ in t.model.named_parameters()}
    want = {n for n in every if any(k in n for k in ("wte", "c_attn", "c_proj", "c_fc", "lm_head"))}
    assert names == want and not any(".ln_" in n or "wpe" in n for n in names)
    assert t.model.lm_head.weight.data_ptr() != t.model.transformer.wte.weight.data_ptr()  # untied
    with pytest.raises(ValueError, match="arch"):
        fl.make_model(10, arch="rnn")


def test_bootstrap_ci_matches_the_normal_interval():
    from sourcetrace.bench.runner import bootstrap_ci

    values = np.random.default_rng(1).normal(2.0, 1.0, 4000)
    low, high = bootstrap_ci(values)
    half = 1.96 * values.std() / np.sqrt(values.size)  # the interval the central limit theorem gives
    assert abs((high - low) / 2 - half) < 0.1 * half and low < values.mean() < high
    assert bootstrap_ci(np.full(7, 0.5)) == (0.5, 0.5)


def _result(name, split, mrr):
    rows = [{"method": m, "mrr": float(np.mean(v)), "per_query": {"mrr": v}} for m, v in mrr.items()]
    return {"name": name, "split": split, "rows": rows}


def test_dda_verdict_is_computed_from_the_rows():
    tuning = _result("a", "tuning", {fl.DDA_DEFAULT: [0.9, 0.8], "DDA[EK-FAC] other": [0.5, 0.6],
                                     "TracIn": [0.4, 0.5]})
    holds = _result("b", "reporting", {fl.DDA_DEFAULT: [0.7, 0.7], "DDA[EK-FAC] other": [0.6, 0.6],
                                       "TracIn": [0.2, 0.3]})
    fails = _result("c", "reporting", {fl.DDA_DEFAULT: [0.3, 0.3], "DDA[EK-FAC] other": [0.9, 0.9],
                                       "TracIn": [0.5, 0.4]})
    text = "\n".join(fl.dda_verdict([tuning, holds]))
    assert "holds its lead" in text and "1 of 1" in text
    assert "minus the best method outside DDA (TracIn)" in text
    text = "\n".join(fl.dda_verdict([tuning, holds, fails]))
    assert "does not hold" in text and "1 of 2" in text and "rank 2 of 2" in text
    # mean MRR over the three settings: default (0.85 + 0.7 + 0.3) / 3 = 0.617, other (0.55 + 0.6 + 0.9) / 3
    assert "highest mean MRR is DDA[EK-FAC] other (0.683; the default: 0.617)" in text


def test_cross_normalised_divides_each_half_by_the_other_halfs_rms():
    scores = np.random.default_rng(0).normal(size=(7, 5))
    got = fl.cross_normalised(scores, seed=3)
    order = np.random.default_rng(3).permutation(7)
    a, b = order[:3], order[3:]
    for rows, ref in ((a, b), (b, a)):
        for i in rows:
            for j in range(5):
                rms = np.sqrt(sum(scores[r, j] ** 2 for r in ref) / len(ref))
                assert got[i, j] == pytest.approx(scores[i, j] / rms)


def test_reporting_settings_run_the_ekfac_dda_rows(tmp_path):
    t = fl.trained(fl.FactsSetting.small(), tmp_path)
    labels = set(fl.method_scores(t, fl.REPORTING_METHODS, finetune_steps=6))
    assert "DDA[EK-FAC] checkpoints, fitting-error weights, standardized" in labels
    assert "TracIn (fine-tuning checkpoints)" in labels
    assert "EK-FAC (base)" in labels and "BM25 (prompt only)" in labels
    assert not any("TRAK" in x or "SOURCE" in x or "dda=True" in x for x in labels)
    assert {s for s, _, _ in fl.SETTINGS.values()} == {"tuning", "reporting"}

"""`sourcetrace bench facts-lm`: which training documents taught a fine-tuned LM a fact?

A generated corpus of fictional facts ("<name> was born in <city>", three relations, four paraphrase
templates each) is taught to a tiny Llama-config LM in two stages. The base model is pre-trained on filler
text and on facts about *other* entities (so it knows the templates and how to answer, but none of the new
facts); it is then fine-tuned on documents stating the new facts (each fact in three source documents,
with three of its four templates, the fact first), distractor documents that name the entity and its
answer words without stating the fact, and filler. A query asks the fact with the fourth template, so its
wording differs from its sources. A leave-sources-out retraining shows the sources are causal. Methods are
scored with `evaluate.sourcing` on the queries the fine-tuned model answers.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .runner import with_ci

RELATIONS: dict[str, dict[str, Any]] = {
    "city": {
        "templates": ["{e} was born in {a}", "{e} is a native of {a}", "the hometown of {e} is {a}",
                      "question : where was {e} born ? answer : {a}"],
        "mentions": ["the market in {a} is busy", "{a} has an old stone bridge",
                     "many travellers pass through {a}", "the winters in {a} are cold"],
    },
    "year": {
        "templates": ["{e} was born in the year {a}", "{e} came into the world in {a}",
                      "the birth year of {e} is {a}", "question : when was {e} born ? answer : {a}"],
        "mentions": ["the great flood came in {a}", "the old library opened in {a}",
                     "a bright comet was seen in {a}", "the harvest failed in {a}"],
    },
    "job": {
        "templates": ["{e} works as a {a}", "{e} earns a living as a {a}", "the profession of {e} is {a}",
                      "question : what does {e} do for work ? answer : {a}"],
        "mentions": ["a {a} needs good tools", "every town needs a {a}", "the {a} sold everything by noon",
                     "a young {a} asked for advice"],
    },
}
ENTITY_MENTIONS = ["{e} likes to walk by the river", "{e} once wrote a long letter",
                   "people often talk about {e}", "{e} has a small garden", "{e} laughed at the old joke",
                   "nobody has seen {e} since spring"]
JOBS = ["baker", "weaver", "potter", "sailor", "miner", "tailor", "farmer", "mason", "smith", "fisher",
        "painter", "cooper", "glazier", "tanner", "carter", "brewer", "chandler", "saddler", "thatcher",
        "joiner"]
ADJ = ["red", "quiet", "small", "heavy", "bright", "old", "green", "soft", "tall", "dark", "warm", "empty"]
NOUN = ["dog", "table", "window", "river", "stone", "child", "lamp", "road", "bird", "door", "tree", "cup",
        "garden", "boat", "song", "wall", "field", "horse"]
VERB = ["sees", "moves", "finds", "holds", "follows", "paints", "hears", "watches", "carries", "touches"]
PLACE = ["near", "under", "behind", "beside", "over"]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


# ---- corpus ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    """A training document; `fact` is (entity, relation) for a source, `entity` is set for sources and
    distractors."""

    id: str
    text: str
    kind: str  # "source", "distractor" or "filler"
    entity: str | None = None
    fact: tuple[str, str] | None = None


@dataclass(frozen=True)
class Query:
    """A prompt whose completion (one word) is a fine-tuned fact; `sources` and `entity_docs` index the
    fine-tuning documents."""

    id: str
    prompt: str
    answer: str
    entity: str
    relation: str
    template: int
    sources: tuple[int, ...]
    entity_docs: tuple[int, ...]


@dataclass
class FactsCorpus:
    """Pre-training texts, fine-tuning documents, queries, and the facts behind them."""

    pretrain: list[str]
    train: list[Document]
    queries: list[Query]
    facts: dict[str, dict[str, str]]  # fine-tuned entity -> relation -> answer
    source_templates: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)

    def texts(self) -> list[str]:
        asked = [q.prompt + " " + q.answer for q in self.queries]
        return self.pretrain + [d.text for d in self.train] + asked


def _names(rng: random.Random, n: int, syllables: Sequence[str], endings: Sequence[str],
           taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = rng.choice(syllables) + rng.choice(syllables) + rng.choice(endings)
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def _filler_sentence(rng: random.Random) -> str:
    return (f"the {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(NOUN)} "
            f"{rng.choice(PLACE)} the {rng.choice(NOUN)}")


def _doc(sentences: list[str]) -> str:
    return " . ".join(sentences) + " ."


def make_corpus(n_entities: int = 30, n_pretrain_entities: int = 120, n_sources: int = 2,
                n_distractors: int = 2, n_filler: int = 60, n_pretrain_filler: int = 600,
                n_cities: int = 16, n_years: int = 16, filler_pool: int = 40, seed: int = 0) -> FactsCorpus:
    """Generate the facts-lm corpus (deterministic in `seed`); see the module docstring."""
    if not 1 <= n_sources <= 3:
        raise ValueError("n_sources must be 1, 2 or 3 (a fourth template is kept for the query)")
    rng = random.Random(seed)
    taken: set[str] = set()
    cities = _names(rng, n_cities, ["vel", "mor", "ash", "bren", "cal", "dor", "fen", "gal"],
                    ["ora", "ith", "holm", "wick"], taken)
    years = [str(1700 + 7 * i) for i in range(n_years)]
    answers = {"city": cities, "year": years, "job": JOBS}
    people = _names(rng, n_entities + n_pretrain_entities, ["ka", "lo", "mi", "ren", "dar", "vos", "tel",
                                                            "bri", "sa", "nu", "zo", "pi"],
                    ["n", "x", "mo", "lee", "ra", "tus"], taken)
    new, old = people[:n_entities], people[n_entities:]

    def fact_of(_e: str) -> dict[str, str]:
        return {r: rng.choice(answers[r]) for r in RELATIONS}

    def stated(e: str, r: str, a: str, t: int) -> str:
        return RELATIONS[r]["templates"][t].format(e=e, a=a)

    pool = [_filler_sentence(rng) for _ in range(filler_pool)]  # a finite pool: filler is learnable

    def filler(k: int) -> list[str]:
        return [rng.choice(pool) for _ in range(k)]

    def with_filler(sentences: list[str], lo: int = 1, hi: int = 3, first: bool = False) -> str:
        """Sentences among filler; a fact goes `first` (as a query starts the text, the fact cannot be
        memorised through the filler before it)."""
        body = filler(rng.randint(lo, hi))
        for s in sentences:
            body.insert(0 if first else rng.randint(0, len(body)), s)
        return _doc(body)

    def distractor(e: str, fact: dict[str, str]) -> str:
        said = [rng.choice(ENTITY_MENTIONS).format(e=e)]
        said += [rng.choice(RELATIONS[r]["mentions"]).format(a=a) for r, a in fact.items()]
        rng.shuffle(said)
        return with_filler(said, 0, 2)

    # pre-training: filler, and every template of the facts of other entities (the base learns the format)
    pretrain = [_doc(filler(rng.randint(2, 5))) for _ in range(n_pretrain_filler)]
    for e in old:
        fact = fact_of(e)
        for r, a in fact.items():
            pretrain += [with_filler([stated(e, r, a, t)], 0, 2, True)
                         for t in range(len(RELATIONS[r]["templates"]))]
        pretrain.append(distractor(e, fact))
    rng.shuffle(pretrain)

    # fine-tuning: sources, distractors and filler, shuffled; queries use a template no source used
    facts = {e: fact_of(e) for e in new}
    docs: list[Document] = []
    plan: dict[tuple[str, str], tuple[tuple[int, ...], int]] = {}
    for e, fact in facts.items():
        for r, a in fact.items():
            order = rng.sample(range(len(RELATIONS[r]["templates"])), n_sources + 1)
            plan[(e, r)] = (tuple(order[:n_sources]), order[n_sources])
            docs += [Document("", with_filler([stated(e, r, a, t)], first=True), "source", e, (e, r))
                     for t in order[:-1]]
        docs += [Document("", distractor(e, fact), "distractor", e) for _ in range(n_distractors)]
    docs += [Document("", _doc(filler(rng.randint(2, 5))), "filler") for _ in range(n_filler)]
    rng.shuffle(docs)
    docs = [Document(f"doc-{i:04d}", d.text, d.kind, d.entity, d.fact) for i, d in enumerate(docs)]

    queries = []
    for e, fact in facts.items():
        own = tuple(i for i, d in enumerate(docs) if d.entity == e)
        for r, a in fact.items():
            srcs, t = plan[(e, r)]
            prompt = RELATIONS[r]["templates"][t].format(e=e, a="{a}").split("{a}")[0].strip()
            queries.append(Query(f"{e}-{r}", prompt, a, e, r, t,
                                 tuple(i for i in own if docs[i].fact == (e, r)), own))
    return FactsCorpus(pretrain, docs, queries, facts, {k: v[0] for k, v in plan.items()})


def states_fact(text: str, entity: str, relation: str, answer: str) -> bool:
    """Whether `text` states the fact with any of the relation's templates."""
    return any(t.format(e=entity, a=answer) in text for t in RELATIONS[relation]["templates"])


# ---- tokenizer -------------------------------------------------------------------------------------------
class WordTokenizer:
    """A word-level tokenizer: whitespace-separated words, a fixed vocabulary, `<unk>` for the rest."""

    def __init__(self, words: Sequence[str]):
        self.vocab = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = 0, 1, 2, 3

    @classmethod
    def fit(cls, texts: Sequence[str]) -> WordTokenizer:
        return cls([w for t in texts for w in t.split()])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [self.index.get(w, self.unk_id) for w in text.split()]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i >= len(SPECIALS))


def train_example(tok: WordTokenizer, text: str) -> dict[str, list[int]]:
    """A document as a CausalLMTask example: every token is a label."""
    ids = tok.encode(text, eos=True)
    return {"input_ids": ids, "labels": ids}


def query_example(tok: WordTokenizer, q: Query) -> dict[str, list[int]]:
    """A query as a CausalLMTask example: the prompt, and the answer as the completion."""
    return {"prompt": tok.encode(q.prompt), "completion": tok.encode(q.answer, bos=False)}


# ---- model and training ----------------------------------------------------------------------------------
def make_model(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128,
               seed: int = 0, arch: str = "llama") -> nn.Module:
    """A tiny causal LM from a config (eager attention, untied embeddings, no dropout): `arch` "llama"
    (RMSNorm, rotary positions, SwiGLU) or "gpt2" (LayerNorm, learned positions, GELU, Conv1D layers)."""
    torch.manual_seed(seed)
    common: dict[str, Any] = {
        "vocab_size": vocab_size, "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 2,
        "eos_token_id": 3,
              # transformers 5's generated config signatures omit attn_implementation, which
              # PreTrainedConfig still accepts and honours at runtime
              "attn_implementation": "eager"}
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                            num_hidden_layers=layers, num_attention_heads=heads,
                                            num_key_value_heads=heads, max_position_embeddings=64, **common))
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=heads,
                                          n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          **common))
    raise ValueError(f"arch must be one of {tuple(ARCH_MODULES)}; got {arch!r}")


MODULES = ["model.embed_tokens", "*_proj", "lm_head"]  # Llama's hookable layers (RMSNorm weights left out)
#: the layers attributed in each architecture: token embeddings, attention and MLP projections, lm_head
#: (norm weights, and GPT-2's position embeddings, left out)
ARCH_MODULES = {"llama": MODULES, "gpt2": ["transformer.wte", "*.c_attn", "*.c_proj", "*.c_fc", "lm_head"]}
ARCH_NAMES = {"llama": "Llama", "gpt2": "GPT-2"}


def attributed_modules(model: nn.Module) -> list[str]:
    """The module patterns attributed for `model` (a `make_model` architecture)."""
    return ARCH_MODULES["gpt2" if type(model).__name__.startswith("GPT2") else "llama"]


def _mean_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       batch["labels"][:, 1:].reshape(-1),
                                       ignore_index=-100)


def checkpoint_steps(total: int, n_checkpoints: int, schedule: str = "even") -> list[int]:
    """The steps at which `train` saves a checkpoint (step 0 is the starting model).

    "even": `n_checkpoints` evenly spaced steps. "geometric": step 0, then u·m for m = 1, 2, 3, 4, 6, 8, 12,
    16, … (two per doubling) below `total`, with u = max(1, total // 200) (`n_checkpoints` is ignored):
    dense early in training, where new facts are being learned and the fitting-error weights of DDA vary,
    sparse once they are fitted.
    """
    if schedule == "even":
        return sorted({round(k * total / n_checkpoints) for k in range(n_checkpoints)}) if n_checkpoints \
            else []
    if schedule != "geometric":
        raise ValueError("schedule must be 'even' or 'geometric'")
    unit = max(1, total // 200)
    return [0] + sorted(unit * f * 2 ** k for f in (1, 3) for k in range(total.bit_length() + 1)
                        if unit * f * 2 ** k < total)


def train(model: nn.Module, examples: Sequence[dict[str, list[int]]], *, epochs: int, lr: float,
          batch_size: int = 16, seed: int = 0, n_checkpoints: int = 0, schedule: str = "even",
          recorder: Any = None) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """AdamW with linear warm-up then linear decay; returns the checkpoints at `checkpoint_steps(total
    steps, n_checkpoints, schedule)` (the first at step 0, i.e. the starting model) and the learning rate
    in force at each. `recorder`: a function `(model, optimizer) -> TrajectoryRecorder` to record the run."""
    from ..tasks import CausalLMTask

    collate = CausalLMTask().collate
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, total // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    at = set(checkpoint_steps(total, n_checkpoints, schedule)) if n_checkpoints else set()
    checkpoints: list[dict[str, torch.Tensor]] = []
    rates: list[float] = []
    rec = recorder(model, opt) if recorder is not None else None
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for lo in range(0, len(order), batch_size):
            if step in at:
                checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                rates.append(cast(float, sched.get_last_lr()[0]))  # a float: lr was given as one
            batch = collate([examples[i] for i in order[lo:lo + batch_size]])
            loss = _mean_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if rec is not None:
                rec.step(model, opt, order[lo:lo + batch_size])
            sched.step()
            step += 1
    if rec is not None:
        rec.finish(model, opt)
    model.eval()
    return checkpoints, rates


@torch.no_grad()
def answer_logprobs(model: nn.Module, examples: Sequence[dict[str, list[int]]]) -> np.ndarray:
    """log p(completion | prompt) of each query example."""
    from ..tasks import CausalLMTask

    task = CausalLMTask()
    model.eval()
    return task.measurement(model, task.collate(list(examples))).double().numpy()


@torch.no_grad()
def accuracy(model: nn.Module, examples: Sequence[dict[str, list[int]]]) -> float:
    """Fraction of queries whose answer is the model's most likely next word."""
    hits = 0
    for ex in examples:
        ids = torch.tensor([ex["prompt"]])
        logits = model(input_ids=ids).logits[0, -1]
        hits += int(int(logits.argmax()) == ex["completion"][0])
    return hits / max(1, len(examples))


# ---- the setting: corpus, tokenizer, base and fine-tuned models (cached in a workdir) ----------------------
@dataclass(frozen=True)
class FactsSetting:
    """Everything facts-lm trains; `small()` is the tiny version the tests use."""

    n_entities: int = 30
    n_pretrain_entities: int = 120
    n_sources: int = 3  # with 2, the fine-tuned model answers 51 % of the paraphrased queries; with 3, 71 %
    n_distractors: int = 2
    n_filler: int = 60
    n_pretrain_filler: int = 300
    filler_pool: int = 40
    hidden: int = 64
    layers: int = 2
    intermediate: int = 128
    pretrain_epochs: int = 12
    pretrain_lr: float = 3e-3
    finetune_epochs: int = 40
    finetune_lr: float = 2e-3
    n_checkpoints: int = 6  # for the "even" schedule
    checkpoint_schedule: str = "geometric"  # see checkpoint_steps; DDA needs checkpoints early in fine-tuning
    seed: int = 0  # of the corpus, the initialisation and the data order
    arch: str = "llama"  # or "gpt2" (see make_model)

    @classmethod
    def small(cls) -> FactsSetting:
        return cls(n_entities=4, n_pretrain_entities=8, n_filler=6, n_pretrain_filler=30, hidden=16,
                   intermediate=32, pretrain_epochs=1, finetune_epochs=2, n_checkpoints=2,
                   checkpoint_schedule="even")

    def corpus(self) -> FactsCorpus:
        return make_corpus(self.n_entities, self.n_pretrain_entities, self.n_sources, self.n_distractors,
                           self.n_filler,
                           self.n_pretrain_filler, filler_pool=self.filler_pool, seed=self.seed)

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class Trained:
    """The trained setting: tokenizer, examples, base and fine-tuned models, fine-tuning checkpoints."""

    corpus: FactsCorpus
    tok: WordTokenizer
    train: list[dict[str, list[int]]]
    queries: list[dict[str, list[int]]]
    base: nn.Module
    model: nn.Module
    checkpoints: list[dict[str, torch.Tensor]]  # fine-tuning checkpoints, the first is the base model
    rates: list[float]
    stats: dict[str, Any]


def finetune(setting: FactsSetting, base: nn.Module, train_examples: Sequence[dict[str, list[int]]],
             n_checkpoints: int = 0) -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[float]]:
    model = copy.deepcopy(base)
    ck, rates = train(model, train_examples, epochs=setting.finetune_epochs, lr=setting.finetune_lr,
                      seed=setting.seed + 1, n_checkpoints=n_checkpoints,
                      schedule=setting.checkpoint_schedule)
    return model, ck, rates


def trained(setting: FactsSetting, workdir: Path) -> Trained:
    """Build the corpus and train base and fine-tuned models, or load them from `workdir`."""
    corpus = setting.corpus()
    tok = WordTokenizer.fit(corpus.texts())
    train_ex = [train_example(tok, d.text) for d in corpus.train]
    query_ex = [query_example(tok, q) for q in corpus.queries]
    path = Path(workdir) / "facts-lm-models.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if saved["fingerprint"] == setting.fingerprint():
            base = make_model(len(tok), setting.hidden, setting.layers, intermediate=setting.intermediate,
                              arch=setting.arch)
            base.load_state_dict(saved["base"])
            model = copy.deepcopy(base)
            model.load_state_dict(saved["model"])
            base.eval()
            model.eval()
            return Trained(corpus, tok, train_ex, query_ex, base, model, saved["checkpoints"], saved["rates"],
                           saved["stats"])
    start = time.perf_counter()
    base = make_model(len(tok), setting.hidden, setting.layers, intermediate=setting.intermediate,
                      seed=setting.seed, arch=setting.arch)
    train(base, [train_example(tok, t) for t in corpus.pretrain], epochs=setting.pretrain_epochs,
          lr=setting.pretrain_lr, seed=setting.seed)
    t_pre = time.perf_counter() - start
    start = time.perf_counter()
    model, ck, rates = finetune(setting, base, train_ex, setting.n_checkpoints)
    t_ft = time.perf_counter() - start
    stats = {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
             "pretrain_s": round(t_pre, 1), "finetune_s": round(t_ft, 1),
             "base_accuracy": accuracy(base, query_ex), "accuracy": accuracy(model, query_ex),
             "base_mean_p": float(np.exp(answer_logprobs(base, query_ex)).mean()),
             "mean_p": float(np.exp(answer_logprobs(model, query_ex)).mean())}
    Path(workdir).mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": setting.fingerprint(), "base": base.state_dict(), "model": model.state_dict(),
                "checkpoints": ck, "rates": rates, "stats": stats}, tmp)
    tmp.replace(path)
    return Trained(corpus, tok, train_ex, query_ex, base, model, ck, rates, stats)


def leave_sources_out(setting: FactsSetting, t: Trained, n_queries: int = 15, seed: int = 0
                      ) -> dict[str, float]:
    """Fine-tune again without the sources of `n_queries` facts (and, as a control, without as many of the
    same entities' distractors): mean change of those queries' answer log-probability."""
    rng = random.Random(seed)
    picked = rng.sample(range(len(t.queries)), min(n_queries, len(t.queries)))
    sources = {i for q in picked for i in t.corpus.queries[q].sources}
    entities = {t.corpus.queries[q].entity for q in picked}
    distract = [i for i, d in enumerate(t.corpus.train) if d.kind == "distractor" and d.entity in entities]
    control = set(rng.sample(distract, min(len(sources), len(distract))))
    qs = [t.queries[q] for q in picked]
    others = [t.queries[q] for q in range(len(t.queries)) if q not in picked]
    full, full_other = answer_logprobs(t.model, qs), answer_logprobs(t.model, others)
    out: dict[str, float] = {"n_queries": len(picked), "n_removed": len(sources)}
    for name, removed in (("sources", sources), ("distractors", control)):
        kept = [ex for i, ex in enumerate(t.train) if i not in removed]
        model, _, _ = finetune(setting, t.base, kept)
        out[f"drop_without_{name}"] = float((full - answer_logprobs(model, qs)).mean())
        out[f"drop_others_without_{name}"] = float((full_other - answer_logprobs(model, others)).mean())
        out[f"accuracy_without_{name}"] = accuracy(model, qs)
    return out


# ---- methods -----------------------------------------------------------------------------------------------
def bm25_scores(corpus: FactsCorpus, with_answer: bool) -> np.ndarray:
    """BM25 (rank-bm25 Okapi) of each query's text against the fine-tuning documents."""
    from ..errors import require

    bm25 = require("rank_bm25", "bench")
    index = bm25.BM25Okapi([d.text.split() for d in corpus.train])
    return np.stack([index.get_scores((q.prompt + (" " + q.answer if with_answer else "")).split())
                     for q in corpus.queries])


#: methods this benchmark runs on full gradients (a language model's default is Kronecker features)
FULL_GRADIENT_METHODS = ("grad-dot", "grad-cos", "tracin", "ekfac")


def _attr(model: nn.Module, method: str, options: dict[str, Any], train: Sequence[Any]) -> Any:
    import sourcetrace as st

    from ..tasks import CausalLMTask

    full = {"features": "identity"} if method in FULL_GRADIENT_METHODS else {}  # as these figures were made
    a = st.Attributor(model, CausalLMTask(), method, workdir=None, progress=False,
                      **{"modules": attributed_modules(model), "batch_size": 32, **full, **options})
    return a.fit(list(train))


def _at(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.eval()
    return m


def method_scores(t: Trained, only: Sequence[str] | None = None, finetune_steps: int = 0,
                  steps_of_checkpoints: Sequence[int] | None = None
                  ) -> dict[str, tuple[np.ndarray, float, str]]:
    """Score every method: {label: (scores [n_query, n_train], seconds, note)}; `steps_of_checkpoints`:
    the fine-tuning step of each of `t.checkpoints` (evenly spaced over `finetune_steps` if not given)."""
    import sourcetrace as st

    from ..methods import dda

    results: dict[str, tuple[np.ndarray, float, str]] = {}
    avail = set(st.available_methods())

    def want(label: str) -> bool:
        return only is None or any(o in label for o in only)

    def timed(label: str, fn: Callable[[], np.ndarray], note: str = "") -> None:
        if not want(label):
            return
        start = time.perf_counter()
        s = fn()
        results[label] = (np.asarray(s, dtype=np.float64), time.perf_counter() - start, note)

    def plain(model: nn.Module, method: str, **options: Any) -> np.ndarray:
        return _attr(model, method, options, t.train).score(t.queries).matrix.double().numpy()

    timed("BM25 (prompt + answer word)", lambda: bm25_scores(t.corpus, True))
    timed("BM25 (prompt only)", lambda: bm25_scores(t.corpus, False))
    timed("grad-cos (fine-tuned)", lambda: plain(t.model, "grad-cos"))
    timed("grad-cos (base)", lambda: plain(t.base, "grad-cos"))
    timed("TracIn (fine-tuning checkpoints)", lambda: plain(
        t.model, "tracin", checkpoints=t.checkpoints[1:] + [t.model.state_dict()],
        learning_rates=t.rates[1:] + [t.rates[-1]]), "checkpoints after the base, and the final model")
    families: list[tuple[str, str, dict[str, Any]]] = [("EK-FAC", "ekfac", {})]
    if "trak" in avail:
        families.append(("TRAK", "trak", {"proj_dim": 1024}))
    if "source" in avail:
        n_ck = len(t.checkpoints)
        steps = (list(steps_of_checkpoints) if steps_of_checkpoints is not None
                 else [round(k * finetune_steps / n_ck) for k in range(n_ck)]) + [finetune_steps]
        try:
            timed("SOURCE (3 segments)", lambda: plain(
                t.model, "source", checkpoints=t.checkpoints + [t.model.state_dict()],
                learning_rates=t.rates + [t.rates[-1]], steps=steps),
                "fine-tuning checkpoints; SGD unrolling (training used AdamW)")
        except Exception as exc:  # a method still in progress must not stop the benchmark
            results["SOURCE (3 segments)"] = (np.zeros((len(t.queries), len(t.train))), 0.0, f"failed: {exc}")
    for name, method, options in families:
        if only is not None and not any(name in o or o in name for o in only):
            continue
        states = t.checkpoints + [t.model.state_dict()]
        start = time.perf_counter()
        attrs = [_attr(_at(t.model, s), method, options, t.train) for s in states]
        per = [a.score(t.queries) for a in attrs]
        fit_s = (time.perf_counter() - start) / len(states)  # one model's fit + score
        errors = dda.fitting_errors([_at(t.model, s) for s in states], st.CausalLMTask(), t.queries)
        for label, (fn, n_models, note) in _variants(name, per, attrs, errors, t.queries).items():
            def matrix(fn: Callable[[], Any] = fn) -> np.ndarray:
                return fn().matrix.double().numpy()

            before = time.perf_counter()
            timed(label, matrix, note)
            if label in results:
                results[label] = (results[label][0], fit_s * n_models + (time.perf_counter() - before), note)
    states = t.checkpoints + [t.model.state_dict()]
    timed(DDA_DEFAULT, lambda: plain(t.model, "ekfac", checkpoints=states, dda=True),
          "what a user gets: every checkpoint from the base on, fitting-error weights, no train-side "
          "normalisation")
    timed(DDA_TRAIN_REFERENCE, lambda: plain(t.model, "ekfac", checkpoints=states, dda=True,
                                             dda_reference=256),
          "columns normalised over 256 training examples as reference queries (fixed at fit)")
    if DDA_DEFAULT in results:
        default, seconds, _ = results[DDA_DEFAULT]
        timed(DDA_QUERY_REFERENCE, lambda: cross_normalised(default),
              "each half of the queries normalised over the other half, as `dda_reference=` those queries "
              "gives (tests/test_dda.py); time: the option's fit and score")
        if DDA_QUERY_REFERENCE in results:
            results[DDA_QUERY_REFERENCE] = (results[DDA_QUERY_REFERENCE][0], seconds,
                                            results[DDA_QUERY_REFERENCE][2])
    return results


def _variants(name: str, per: list[Any], attrs: list[Any], errors: torch.Tensor, queries: list[Any]
              ) -> dict[str, tuple[Callable[[], Any], int, str]]:
    """The DDA variants of one method: {label: (make scores, models needed, note)}; `per[0]` is the base."""
    from ..methods import dda

    ft, base = per[-1], per[0]
    n = len(per)
    return {
        f"{name} (fine-tuned)": (lambda: ft, 1, ""),
        f"{name} (base)": (lambda: base, 1, "scored at the base model"),
        f"{name} (first fine-tuning checkpoint)": (lambda: per[1], 1, ""),
        f"DDA[{name}] subtract: ft − base": (lambda: dda.subtract(ft, base), 2, ""),
        f"DDA[{name}] subtract standardized: z(ft) − z(base)": (
            lambda: dda.subtract(ft, base, standardize=True), 2, ""),
        f"DDA[{name}] project out base query gradient (at ft)": (
            lambda: dda.project_out_base(attrs[-1], attrs[0], queries), 2, ""),
        f"DDA[{name}] unit query gradients: ft − base (at ft)": (
            lambda: dda.project_out_base(attrs[-1], attrs[0], queries, mode="normalize"), 2, ""),
        f"DDA[{name}] checkpoints, equal weights": (lambda: dda.combine(per), n, "standardized"),
        f"DDA[{name}] checkpoints, fitting-error weights, raw": (
            lambda: dda.combine(per, errors, standardize=False), n, ""),
        f"DDA[{name}] checkpoints, fitting-error weights, standardized": (
            lambda: dda.combine(per, errors), n, ""),
        f"DDA[{name}] fitting-error weights, standardized, normalised over the scored queries": (
            lambda: dda.dda(per, errors), n, "depends on the batch: each column's scale is taken over the "
            "queries scored together"),
    }


#: The settings: (split, setting, methods). Every default was chosen on the tuning setting (corpus 0,
#: Llama); the reporting settings differ in the generated corpus (entities, facts, filler, order), the
#: initialisation, the data order and, for GPT-2, the architecture; corpus 1 runs on both architectures, so
#: a change of architecture is seen apart from a change of corpus. `methods`: label fragments of the rows
#: run (None: all). REPORTING_METHODS is the quick subset the tests run.
REPORTING_METHODS = ("BM25", "grad-cos", "TracIn", "EK-FAC (", "DDA[EK-FAC]")
SETTINGS: dict[str, tuple[str, FactsSetting, tuple[str, ...] | None]] = {
    "corpus 0, Llama": ("tuning", FactsSetting(), None),
    "corpus 1, Llama": ("reporting", FactsSetting(seed=1), None),
    "corpus 1, GPT-2": ("reporting", FactsSetting(seed=1, arch="gpt2"), None),
    "corpus 2, GPT-2": ("reporting", FactsSetting(seed=2, arch="gpt2"), None),
}
SCORING_VERSION = 1  # bump when method_scores or score_setting change what a cached setting holds
PER_QUERY = ("auc", "mrr", "entity_top1")  # kept per query in the json (for paired comparisons)
PRIMARY = "mrr"  # the metric the summary compares on
DDA_DEFAULT = "EK-FAC, dda=True (the Attributor default)"
DDA_TRAIN_REFERENCE = "EK-FAC, dda=True, dda_reference=256 training examples"
DDA_QUERY_REFERENCE = "EK-FAC, dda=True, dda_reference=the other half of the queries"


def cross_normalised(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """Scores of two seeded halves of the queries, each half's columns divided by their root-mean-square over
    the other half (a reference set of queries not scored with them)."""
    order = np.random.default_rng(seed).permutation(len(scores))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    out = np.empty_like(scores)
    for rows, reference in (halves, halves[::-1]):
        out[rows] = scores[rows] / np.sqrt((scores[reference] ** 2).mean(0)).clip(1e-300)
    return out


def defaults_chosen() -> str:
    """Which defaults were chosen on the tuning setting, with their values read from the code."""
    t = FactsSetting()
    return ("everything in this benchmark was developed on the tuning setting (corpus 0, Llama): the corpus "
            f"and training recipe ({t.n_sources} sources per fact, {t.finetune_epochs} fine-tuning epochs at "
            f"lr {t.finetune_lr:g}), DDA's checkpoint schedule ({t.checkpoint_schedule}: `checkpoint_steps`) "
            "and `dda=True`'s default composition (fitting-error weights, per-query standardization; no "
            "train-side normalisation unless `dda_reference` is given, because normalising over training "
            "examples lowered MRR on the tuning setting); EK-FAC's and TRAK's damping rules were chosen on "
            "digits-mlp's tuning split (benchmarks/digits-mlp.md). The reporting settings were not looked at "
            "when any of these was chosen.")


def score_setting(name: str, split: str, setting: FactsSetting, workdir: Path, *,
                  only: Sequence[str] | None = None, retrain_check: bool = True, answered_only: bool = True,
                  progress: bool = True) -> dict[str, Any]:
    """Train one setting (cached), score every method, and return its info and rows."""
    from ..evaluate import sourcing
    from .runner import load_average

    start, load = time.perf_counter(), load_average()
    t = trained(setting, Path(workdir))
    answered = [accuracy(t.model, [ex]) == 1.0 for ex in t.queries]  # the facts the fine-tuned model states
    keep = [i for i, ok in enumerate(answered) if ok] if answered_only else list(range(len(t.queries)))
    sources = [t.corpus.queries[i].sources for i in keep]
    entity_docs = [t.corpus.queries[i].entity_docs for i in keep]
    all_src = [q.sources for q in t.corpus.queries]
    all_ent = [q.entity_docs for q in t.corpus.queries]
    rows: list[dict[str, Any]] = []
    total_steps = setting.finetune_epochs * math.ceil(len(t.train) / 16)
    ck_steps = checkpoint_steps(total_steps, setting.n_checkpoints, setting.checkpoint_schedule)
    for label, (scores, seconds, note) in method_scores(t, only, total_steps, ck_steps).items():
        row: dict[str, Any] = {"split": split, "setting": name, "method": label, "time_s": round(seconds, 2),
                               "note": note}
        if note.startswith("failed"):
            rows.append(row)
            continue
        kept = scores[keep]
        per = {"auc": sourcing.sourcing_auc(kept, sources, per_query=True),
               **{f"recall@{k}": sourcing.recall_at_k(kept, sources, k, per_query=True) for k in (1, 5, 10)},
               "mrr": sourcing.mrr(kept, sources, per_query=True),
               "entity_top1": sourcing.entity_top1(kept, sources, entity_docs, per_query=True)}
        row.update({k: round(float(np.mean(v)), 4) for k, v in per.items()})
        row.update({f"{k}_ci": with_ci(per[k]) for k in PER_QUERY})
        row["per_query"] = {k: [round(float(x), 4) for x in per[k]] for k in PER_QUERY}
        every = sourcing.sourcing_report(scores, all_src, all_ent, ks=(1, 5, 10))
        row["all_queries"] = {k: round(v, 4) for k, v in every.items()}
        rows.append(row)
        if progress:
            print(f"{name:16s} {label:60s} " + " ".join(f"{k}={row[k]:.3f}" for k in per), flush=True)
    check = leave_sources_out(setting, t) if retrain_check else {}
    c = t.corpus
    kinds = {k: sum(d.kind == k for d in c.train) for k in ("source", "distractor", "filler")}
    info = {"corpus": f"generated with seed {setting.seed}: {len(c.train)} fine-tuning documents "
                      f"({kinds['source']} sources, {kinds['distractor']} distractors, {kinds['filler']} "
                      f"filler), {len(c.queries)} queries ({setting.n_sources} sources each), "
                      f"{len(c.pretrain)} pre-training documents",
            "model": f"{ARCH_NAMES[setting.arch]} config, {t.stats['parameters']} parameters, "
                     f"vocabulary {t.stats['vocab']} words, hidden {setting.hidden}, "
                     f"{setting.layers} layers; attributed through token embeddings, attention/MLP "
                     "projections and lm_head",
            "training": f"pre-train {t.stats['pretrain_s']} s, fine-tune {t.stats['finetune_s']} s "
                        f"({setting.finetune_epochs} epochs, AdamW lr {setting.finetune_lr}; "
                        f"{len(t.checkpoints)} fine-tuning checkpoints, "
                        f"{setting.checkpoint_schedule} schedule)",
            "answers": f"base model top-1 accuracy {t.stats['base_accuracy']:.3f} (mean p "
                       f"{t.stats['base_mean_p']:.3f}); fine-tuned {t.stats['accuracy']:.3f} "
                       f"(mean p {t.stats['mean_p']:.3f})",
            "queries scored": f"{len(keep)} of {len(t.queries)} "
                              + ("(those the fine-tuned model answers; every query in the json's all_queries)"
                                 if answered_only else "(all)"),
            "leave-sources-out": _leave_out_text(check) if check else "not run",
            "wall time of this setting": f"{time.perf_counter() - start:.0f} s (load average of the shared "
                                         f"two-core machine at its start: {load})",
            "setting": setting.fingerprint()}
    return {"name": name, "split": split, "info": info, "rows": rows, "leave_sources_out": check}


def _leave_out_text(c: dict[str, float]) -> str:
    return (f"fine-tuned again without the sources of {c['n_queries']} facts ({c['n_removed']} documents): "
            f"their answers' log-probability drops by {c['drop_without_sources']:.2f} nats (accuracy "
            f"{c['accuracy_without_sources']:.2f}), the other queries' by "
            f"{c['drop_others_without_sources']:.2f}; without as many of the same entities' distractors: "
            f"{c['drop_without_distractors']:.2f} (accuracy {c['accuracy_without_distractors']:.2f})")


def run(out_dir: Path = Path("benchmarks"), workdir: Path = Path("runs/bench/facts-lm"), *,
        settings: Sequence[str] | None = None, only: list[str] | None = None, retrain_check: bool = True,
        answered_only: bool = True, progress: bool = True) -> Path:
    """Score every setting (each cached in `workdir` for the same code) and write `facts-lm.md` / `.json`."""
    from .runner import code_fingerprint, versions

    torch.set_num_threads(1)
    code = code_fingerprint()
    results = []
    for name in settings or SETTINGS:
        split, setting, methods = SETTINGS[name]
        methods = tuple(only) if only else methods
        folder = Path(workdir) / name.replace(", ", "-").replace(" ", "-").lower()
        key = {"setting": setting.fingerprint(), "code": code, "scoring": SCORING_VERSION,
               "only": list(methods) if methods else None,
               "retrain_check": retrain_check, "answered_only": answered_only}
        cache = folder / "result.json"
        if cache.exists() and json.loads(cache.read_text()).get("key") == key:
            results.append(json.loads(cache.read_text())["result"])
            continue
        result = score_setting(name, split, setting, folder, only=methods, retrain_check=retrain_check,
                               answered_only=answered_only, progress=progress)
        from ..artifacts import atomic_write_json

        atomic_write_json(cache, {"key": key, "result": result})
        results.append(result)
    return write_facts(Path(out_dir), results, versions("torch", "transformers", "rank-bm25"))


def write_facts(out_dir: Path, results: list[dict[str, Any]], versions: dict[str, str]) -> Path:
    """facts-lm.md / .json from the scored settings: a summary across settings, then one table each."""
    from ..artifacts import atomic_write_bytes, atomic_write_json
    from .runner import markdown_table

    rows = [r for res in results for r in res["rows"]]
    info = {"tuning and reporting": defaults_chosen(),
            "settings": "; ".join(f"{res['name']} ({res['split']})" for res in results),
            "confidence intervals": "95 % percentile bootstrap over the scored queries (1000 resamples); "
                                    "differences are paired (the same queries)",
            "versions": versions}
    verdict = dda_verdict(results)
    atomic_write_json(out_dir / "facts-lm.json", {"benchmark": "facts-lm", "info": info, "rows": rows,
                                                  "settings": [{k: v for k, v in res.items() if k != "rows"}
                                                               for res in results], "dda_verdict": verdict})
    lines = ["# facts-lm: sourcing new facts in a fine-tuned LM", "",
             "Written by `sourcetrace bench facts-lm`; do not edit by hand.", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", f"## Summary: {PRIMARY.upper()} [95 % CI] in each setting", ""]
    names = [res["name"] for res in results]
    by_method: dict[str, dict[str, Any]] = {}
    for r in rows:
        by_method.setdefault(r["method"], {"method": r["method"]})[r["setting"]] = r.get(f"{PRIMARY}_ci")
    heads = [(n, f"{n} ({res['split']})") for n, res in zip(names, results)]
    lines += markdown_table(list(by_method.values()), [("method", "method"), *heads])
    lines += ["", *verdict]
    columns = [("method", "method"), ("auc_ci", "AUC [CI]"), ("recall@1", "R@1"), ("recall@5", "R@5"),
               ("recall@10", "R@10"), ("mrr_ci", "MRR [CI]"), ("entity_top1_ci", "entity top-1 [CI]"),
               ("time_s", "time (s)"), ("note", "note")]
    for res in results:
        lines += ["", f"## {res['name']} ({res['split']})", ""]
        lines += [f"- {k}: {v}" for k, v in res["info"].items()]
        lines += ["", *markdown_table(res["rows"], columns)]
    lines += ["", "AUC, recall@k and MRR rank each query's source documents among all fine-tuning "
              "documents; entity top-1: the top-scored among the documents naming the query's entity (the "
              "sources of its three facts and its distractors) is a source of the query's fact. Means over "
              "queries.",
              "Times: fit + score of every model a row needs, on one CPU thread (1 model for a single "
              "checkpoint; base and fine-tuned for subtraction/projection; every checkpoint for the "
              "combinations)."]
    path = out_dir / "facts-lm.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def dda_verdict(results: list[dict[str, Any]]) -> list[str]:
    """Sentences, computed from the rows, on whether the DDA default keeps its lead outside the tuning
    setting: against the best method outside DDA, and among the DDA compositions of the same method."""
    out: list[str] = []
    holds: list[bool] = []
    tally: dict[str, list[float]] = {}
    for res in results:
        rows = {r["method"]: r for r in res["rows"] if "per_query" in r}
        if DDA_DEFAULT not in rows:
            continue
        default = np.asarray(rows[DDA_DEFAULT]["per_query"][PRIMARY])
        outside = {m: r for m, r in rows.items() if not m.startswith("DDA[") and "dda=True" not in m}
        compositions = {m: r for m, r in rows.items() if m.startswith(("DDA[EK-FAC]", "EK-FAC, dda=True"))}
        for m, r in compositions.items():
            tally.setdefault(m, []).append(r[PRIMARY])
        best_out = max(outside, key=lambda m: outside[m][PRIMARY])
        diff = default - np.asarray(outside[best_out]["per_query"][PRIMARY])
        ranked = sorted(compositions, key=lambda m: -compositions[m][PRIMARY])
        rank = ranked.index(DDA_DEFAULT) + 1
        best_comp = ranked[0] if ranked[0] != DDA_DEFAULT else ranked[1]
        diff_c = default - np.asarray(compositions[best_comp]["per_query"][PRIMARY])
        out.append(f"- {res['name']} ({res['split']}): {DDA_DEFAULT} {PRIMARY.upper()} "
                   f"{float(default.mean()):.3f}; minus the best method outside DDA ({best_out}): "
                   f"{with_ci(diff)}; rank {rank} of {len(compositions)} EK-FAC DDA compositions "
                   f"(minus {'the next' if rank == 1 else 'the best'}, {best_comp}: {with_ci(diff_c)}).")
        if res["split"] == "reporting":
            holds.append(rank == 1 and float(diff.mean()) > 0)
    if holds:
        verdict = ("holds" if all(holds) else "does not hold")
        out.append(f"- Verdict: the DDA default {verdict} its lead on the reporting settings (first "
                   f"among the EK-FAC DDA compositions and above the best method outside DDA in "
                   f"{sum(holds)} of {len(holds)}).")
        mean = {m: float(np.mean(v)) for m, v in tally.items() if len(v) == len(results)}
        if mean:
            top = max(mean, key=lambda m: mean[m])
            out.append(f"- Across all {len(results)} settings the EK-FAC DDA composition with the "
                       f"highest mean {PRIMARY.upper()} is {top} ({mean[top]:.3f}; the default: "
                       f"{mean.get(DDA_DEFAULT, float('nan')):.3f}). Choosing by this uses the reporting "
                       "settings, so a figure for that choice needs a further, unseen corpus.")
    return out

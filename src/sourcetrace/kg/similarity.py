"""Knowledge-graph similarity between generated and training images, explained by the triples they share.

Four measures of a query image's triples Q against a training image's triples T:

- `count` (the published measure, Aivalis et al. 2025): the number of attribute values both carry, whatever
  the relation (a "plain" pattern matches a "plain" material);
- `relation`: the number of shared (relation, value) triples, |Q ∩ T|;
- `idf-jaccard`: Σ_{t ∈ Q∩T} w(t) / Σ_{t ∈ Q∪T} w(t), with w(t) = log((1 + N) / (1 + df(t))) + 1 over the
  N training images, so rare attributes count more and images with many attributes are not favoured;
- `relation-jaccard`: |Q ∩ T| / |Q ∪ T|, idf-jaccard with every weight 1 (relation-aware and normalised,
  no IDF: the ablation that separates the two).

A prompt's score is the sum over its generations (`aggregate="sum"`, as published) or their maximum. The
triples come from the store's SPARQL queries (`store.QUERIES`: triples, document-frequency); the scores are
`Scores` whose metadata holds, for each query's top training images, the shared triples and in how many of
the generations each appeared.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..scores import Scores
from .align import Triple
from .store import KGStore, StoreError, literal

MEASURES = ("count", "relation", "idf-jaccard", "relation-jaccard")
AGGREGATES = ("sum", "max")


def idf_weights(train: dict[str, frozenset[Triple]]) -> dict[Triple, float]:
    """w(t) = log((1 + N) / (1 + df)) + 1 for every triple of the training images."""
    n = len(train)
    df = Counter(t for triples in train.values() for t in triples)
    return {t: math.log((1 + n) / (1 + d)) + 1.0 for t, d in df.items()}


def similarity(
    query: Iterable[Triple],
    train: Iterable[Triple],
    measure: str,
    weights: dict[Triple, float] | None = None,
    n_train: int = 0,
) -> float:
    """One measure between two sets of triples (see the module docstring)."""
    q, t = set(query), set(train)
    if measure == "count":
        return float(len({x.value for x in q} & {x.value for x in t}))
    if measure == "relation":
        return float(len(q & t))
    if measure == "idf-jaccard":
        unseen = math.log(1 + n_train) + 1.0  # a triple no training image has: df = 0

        def w(x: Triple) -> float:
            return (weights or {}).get(x, unseen)

        union = sum(w(x) for x in q | t)
        return sum(w(x) for x in q & t) / union if union > 0 else 0.0
    if measure == "relation-jaccard":
        return len(q & t) / len(q | t) if q | t else 0.0
    raise StoreError(f"measure must be one of {', '.join(MEASURES)}; got {measure!r}")


def shared(query: Iterable[Triple], train: Iterable[Triple], measure: str) -> list[Triple]:
    """The triples that explain a score: relation-blind `count` shares values, the others share triples."""
    q, t = set(query), set(train)
    if measure == "count":
        values = {x.value for x in t}
        return sorted(x for x in q if x.value in values)
    return sorted(q & t)


def kg_scores(
    store: KGStore,
    *,
    measure: str = "idf-jaccard",
    by: str = "prompt",
    query_role: str = "generated",
    train_role: str = "train",
    aggregate: str = "sum",
    queries: Sequence[Any] | None = None,
    explain_k: int = 10,
) -> Scores:
    """Score every query (a prompt's generations, or one image with `by="image"`) against the training images.

    `explain_k`: the metadata keep the shared triples of each query's `explain_k` best training images.
    Ids come back as strings (the store keeps them as literals), training images in the store's order.
    """
    if measure not in MEASURES:
        raise StoreError(f"measure must be one of {', '.join(MEASURES)}; got {measure!r}")
    if aggregate not in AGGREGATES:
        raise StoreError(f"aggregate must be one of {', '.join(AGGREGATES)}; got {aggregate!r}")
    if by not in ("prompt", "image"):
        raise StoreError(f"by must be 'prompt' or 'image'; got {by!r}")
    train = {i: t for i, (_, t) in store.triples(train_role).items()}
    if not train:
        raise StoreError(f"the store holds no images with role {train_role!r}; add training images first")
    generated = store.triples(query_role)
    groups: dict[str, list[frozenset[Triple]]] = defaultdict(list)
    for image_id, (prompt, triples) in generated.items():
        if by == "prompt" and prompt is None:
            raise StoreError(
                f"image {image_id!r} (role {query_role!r}) has no prompt; add it with prompt=... "
                "or score by='image'"
            )
        groups[str(prompt) if by == "prompt" else image_id].append(triples)
    query_ids = [str(q) for q in queries] if queries is not None else list(groups)
    missing = [q for q in query_ids if q not in groups]
    if missing:
        raise StoreError(f"no {query_role!r} images for {by}s {missing[:5]}")
    weights = idf_weights(train) if measure == "idf-jaccard" else None
    train_ids = list(train)
    matrix = torch.zeros(len(query_ids), len(train_ids), dtype=torch.float64)
    explained: dict[str, dict[str, list[list[Any]]]] = {}
    for r, q in enumerate(query_ids):
        per_generation = torch.tensor(
            [[similarity(g, train[i], measure, weights, len(train)) for i in train_ids] for g in groups[q]],
            dtype=torch.float64,
        )
        matrix[r] = per_generation.sum(0) if aggregate == "sum" else per_generation.max(0).values
        top = torch.topk(matrix[r], min(explain_k, len(train_ids))).indices.tolist()
        explained[q] = {}
        for c in top:
            counts = Counter(t for g in groups[q] for t in shared(g, train[train_ids[c]], measure))
            explained[q][train_ids[c]] = [[t.relation, t.value, n] for t, n in sorted(counts.items())]
    meta = {
        "measure": measure,
        "aggregate": aggregate,
        "by": by,
        "ontology": store.ontology.name,
        "generations": {q: len(groups[q]) for q in query_ids},
        "shared": explained,
        "queries": ["triples", "document-frequency"] if measure == "idf-jaccard" else ["triples"],
    }
    return Scores(matrix, train_ids, query_ids, f"kg-{measure}", meta)


def shared_text(scores: Scores, query: Any, train_id: Any, sep: str = "\n") -> str:
    """The shared triples behind one score, one per line ('hasPattern striped (3/5 generations)')."""
    q = str(query)
    rows = scores.metadata.get("shared", {}).get(q, {}).get(str(train_id))
    if rows is None:
        return ""
    n = scores.metadata.get("generations", {}).get(q, 1)
    return sep.join(f"{rel} {val}" + (f" ({k}/{n} generations)" if n > 1 else "") for rel, val, k in rows)


def style_attribution(
    store: KGStore, transformed: Any, original: Any, *, role: str = "style", reference_role: str = "reference"
) -> Scores:
    """Which reference collections carry the triples a transformed image gained over its original.

    Both images are in the store under `role`; reference images under `reference_role` with a collection.
    The score of a collection is the number of (gained triple, reference image) matches in it; the
    metadata list the gained triples and, per collection, each matched triple with its count of images.
    """
    for image in (transformed, original):
        if not store.has(image, role):
            raise StoreError(f"no image {image!r} with role {role!r} in the store")
    params = {"transformed": transformed, "original": original, "query_role": role, "role": reference_role}
    gained = [Triple(str(r["relation"]), str(r["value"])) for r in store.run("gained", **params)]
    rows = store.run("gained-by-collection", **params)
    collections = sorted(
        {
            str(r["c"])
            for r in store.query(
                "PREFIX stkg: <urn:sourcetrace:kg:> SELECT DISTINCT ?c WHERE { "
                f"?i stkg:role {literal(reference_role)} ; "
                "stkg:collection ?c }"
            )
        }
    )
    if not collections:
        raise StoreError(f"no images with role {reference_role!r} and a collection in the store")
    matched: dict[str, list[list[Any]]] = {c: [] for c in collections}
    for r in rows:
        matched[str(r["collection"])].append([str(r["relation"]), str(r["value"]), int(r["n"])])
    matrix = torch.tensor(
        [[float(sum(n for _, _, n in matched[c])) for c in collections]], dtype=torch.float64
    )
    meta = {
        "gained": [[t.relation, t.value] for t in gained],
        "matched": matched,
        "original": str(original),
        "queries": ["gained", "gained-by-collection"],
    }
    return Scores(matrix, collections, [str(transformed)], "kg-style", meta)

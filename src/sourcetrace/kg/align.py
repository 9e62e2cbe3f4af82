"""Alignment: raw (relation, value) pairs from an extractor mapped onto an ontology's canonical names.

Relations match by canonical name or synonym after normalising case, camelCase and punctuation; values
match the relation's allowed labels or synonyms, then the closest one by `difflib` above `cutoff`. Whatever
does not match is counted in the report (`unknown_relations`, `unknown_values`, `empty`), never dropped
without a count.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from .ontology import Ontology, normalise


@dataclass(frozen=True, order=True)
class Triple:
    """One attribute of an image: (image, relation, value), the image implied by where the triple lives."""

    relation: str  # canonical relation name
    value: str  # canonical value label

    def __str__(self) -> str:
        return f"{self.relation} {self.value}"


@dataclass
class Alignment:
    """Aligned triples (sorted, without duplicates) and a count of everything that did not align."""

    triples: tuple[Triple, ...]
    unknown_relations: Counter = field(default_factory=Counter)  # raw relation -> count
    unknown_values: Counter = field(default_factory=Counter)  # (relation, raw value) -> count
    fuzzy: Counter = field(default_factory=Counter)  # (relation, raw value, matched value) -> count
    empty: int = 0  # pairs with an empty relation or value
    duplicates: int = 0

    @property
    def dropped(self) -> int:
        return sum(self.unknown_relations.values()) + sum(self.unknown_values.values()) + self.empty

    def merge(self, other: Alignment) -> Alignment:
        """Counts of two alignments together (the triples of both, for a summary over many images)."""
        return Alignment(
            tuple(sorted(set(self.triples) | set(other.triples))),
            self.unknown_relations + other.unknown_relations,
            self.unknown_values + other.unknown_values,
            self.fuzzy + other.fuzzy,
            self.empty + other.empty,
            self.duplicates + other.duplicates,
        )

    def summary(self) -> str:
        parts = [f"{len(self.triples)} triples"]
        if self.fuzzy:
            parts.append(f"{sum(self.fuzzy.values())} values matched fuzzily")
        if self.unknown_relations:
            top = ", ".join(f"{r!r}×{n}" for r, n in self.unknown_relations.most_common(5))
            parts.append(f"{sum(self.unknown_relations.values())} with unknown relations ({top})")
        if self.unknown_values:
            top = ", ".join(f"{r} {v!r}×{n}" for (r, v), n in self.unknown_values.most_common(5))
            parts.append(f"{sum(self.unknown_values.values())} with unknown values ({top})")
        if self.empty:
            parts.append(f"{self.empty} empty")
        return "; ".join(parts)


class Aligner:
    """Maps raw pairs onto `ontology`; `cutoff` is difflib's similarity ratio a fuzzy value match needs."""

    def __init__(self, ontology: Ontology, cutoff: float = 0.85):
        if not 0 < cutoff <= 1:
            raise ValueError(f"cutoff must be in (0, 1]; got {cutoff}")
        self.ontology, self.cutoff = ontology, cutoff
        self._relations: dict[str, str] = {}
        self._values: dict[str, dict[str, str]] = {}
        for rel in ontology.relations.values():
            for name in (rel.name, *rel.synonyms):
                self._relations[normalise(name)] = rel.name
            # a relation named with its "has" prefix dropped ("pattern" for hasPattern) is the same relation
            bare = normalise(rel.name)
            if bare.startswith("has "):
                self._relations.setdefault(bare[4:], rel.name)
            self._values[rel.name] = {
                normalise(s): v.label for v in rel.values for s in (v.label, *v.synonyms)
            }

    def relation(self, raw: str) -> str | None:
        return self._relations.get(normalise(raw))

    def value(self, relation: str, raw: str) -> tuple[str | None, bool]:
        """(canonical label or None, whether it was a fuzzy match)."""
        table = self._values[relation]
        key = normalise(raw)
        if key in table:
            return table[key], False
        close = difflib.get_close_matches(key, list(table), n=1, cutoff=self.cutoff)
        return (table[close[0]], True) if close else (None, False)

    def align(self, pairs: Iterable[tuple[str, str]]) -> Alignment:
        out = Alignment(())
        kept: set[Triple] = set()
        for raw_rel, raw_val in pairs:
            raw_rel, raw_val = str(raw_rel or "").strip(), str(raw_val or "").strip()
            if not normalise(raw_rel) or not normalise(raw_val):
                out.empty += 1
                continue
            rel = self.relation(raw_rel)
            if rel is None:
                out.unknown_relations[raw_rel] += 1
                continue
            val, fuzzy = self.value(rel, raw_val)
            if val is None:
                out.unknown_values[(rel, raw_val)] += 1
                continue
            if fuzzy:
                out.fuzzy[(rel, raw_val, val)] += 1
            t = Triple(rel, val)
            if t in kept:
                out.duplicates += 1
            kept.add(t)
        out.triples = tuple(sorted(kept))
        return out

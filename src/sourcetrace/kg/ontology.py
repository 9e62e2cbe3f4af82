"""Ontologies as data: the relations an extractor may use, the values each allows, their synonyms and domains.

An ontology is a Turtle (or any rdflib-readable) file in the `urn:sourcetrace:kg:` vocabulary:

    ex:hasPattern a stkg:Relation ; rdfs:label "hasPattern" ; rdfs:domain ex:Garment ;
        skos:altLabel "pattern", "print" ; stkg:allowedValue ex:striped, ex:plain .
    ex:striped rdfs:label "striped" ; skos:altLabel "stripes" .

Two ship with the package (`fashion`, after Fashionpedia's attribute families, and `art-style`); users pass
the path of their own. Values are shared across relations (the same IRI for "plain" pattern and "plain"
material), so a relation-blind comparison can tell them apart from a relation-aware one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import SourcetraceError, require

VOCAB = "urn:sourcetrace:kg:"
SHIPPED = {"fashion": "fashion.ttl", "art-style": "art_style.ttl"}


class OntologyError(SourcetraceError, ValueError):
    """An ontology that cannot be read or that lacks what extraction needs."""


def normalise(text: str) -> str:
    """Lower case, camelCase and punctuation split into single spaces: 'hasA-Line' -> 'has a line'."""
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(text))
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


@dataclass(frozen=True)
class Value:
    iri: str
    label: str
    synonyms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Relation:
    iri: str
    name: str  # the canonical name extractors must use, e.g. "hasPattern"
    values: tuple[Value, ...]
    synonyms: tuple[str, ...] = ()
    domain: str | None = None
    comment: str = ""

    def value_labels(self) -> list[str]:
        return [v.label for v in self.values]


@dataclass
class Ontology:
    """Relations (by canonical name), the subject they describe, and where it came from."""

    name: str
    iri: str
    subject: str
    relations: dict[str, Relation]
    source: str = ""
    comment: str = ""
    values: dict[str, Value] = field(default_factory=dict)  # by IRI

    def relation(self, name: str) -> Relation:
        try:
            return self.relations[name]
        except KeyError:
            raise OntologyError(
                f"ontology {self.name!r} has no relation {name!r}; it has {', '.join(self.relations)}"
            ) from None

    def value_iri(self, relation: str, label: str) -> str:
        for v in self.relation(relation).values:
            if v.label == label:
                return v.iri
        raise OntologyError(
            f"{relation} allows no value {label!r}; allowed: "
            f"{', '.join(self.relation(relation).value_labels())}"
        )

    def prompt(self, *, json_mode: bool = True) -> str:
        """The extraction prompt: one line per relation with its allowed values, and the answer format."""
        lines = [
            f"Describe the {self.subject} in this image as knowledge-graph triples.",
            "Use only these relations, each with one of its listed values; leave out a relation "
            "that does not apply:",
        ]
        lines += [f"- {r.name}: {', '.join(r.value_labels())}" for r in self.relations.values()]
        if json_mode:
            lines.append('Answer with JSON only: {"triples": [{"relation": "...", "value": "..."}, ...]}')
        else:
            lines.append(f"Answer with one numbered triple per line: 1. ({self.subject}, relation, value)")
        return "\n".join(lines)


def shipped_ontologies() -> list[str]:
    return sorted(SHIPPED)


def load_ontology(source: str | os.PathLike) -> Ontology:
    """A shipped ontology by name ('fashion', 'art-style') or the path of a Turtle / RDF file."""
    rdflib = require("rdflib", "kg")
    if isinstance(source, str) and source in SHIPPED:
        resource = resources.files(__package__).joinpath("ontologies").joinpath(SHIPPED[source])
        data, fmt, where = resource.read_text(encoding="utf-8"), "turtle", f"shipped ontology {source!r}"
    else:
        path = Path(source)
        if not path.is_file():
            raise OntologyError(
                f"no ontology {str(source)!r}: give a shipped name "
                f"({', '.join(shipped_ontologies())}) or the path of a Turtle file"
            )
        data, where = path.read_text(encoding="utf-8"), str(path)
        fmt = rdflib.util.guess_format(str(path)) or "turtle"
    graph = rdflib.Graph()
    try:
        graph.parse(data=data, format=fmt)
    except Exception as exc:  # rdflib raises many parser-specific types
        raise OntologyError(f"{where} is not valid {fmt}: {exc}") from exc
    return _from_graph(graph, where)


def _from_graph(graph, where: str) -> Ontology:
    from rdflib import RDF, RDFS, Namespace, URIRef
    from rdflib.namespace import SKOS

    st = Namespace(VOCAB)
    heads = list(graph.subjects(RDF.type, st.Ontology))
    if len(heads) != 1:
        raise OntologyError(
            f"{where} must declare exactly one `a stkg:Ontology` (found {len(heads)}); stkg is <{VOCAB}>"
        )
    head = heads[0]

    def label(node) -> str:
        found = graph.value(node, RDFS.label)
        if found is None:
            local = re.split(r"[#/:]", str(node))[-1]
            return local.replace("_", " ")
        return str(found)

    def alts(node) -> tuple[str, ...]:
        return tuple(sorted(str(a) for a in graph.objects(node, SKOS.altLabel)))

    values: dict[str, Value] = {}
    relations: dict[str, Relation] = {}
    for rel in sorted(graph.subjects(RDF.type, st.Relation), key=str):
        vals = []
        for v in sorted(graph.objects(rel, st.allowedValue), key=str):
            if not isinstance(v, URIRef):
                raise OntologyError(
                    f"{where}: {label(rel)} allows {v!r}; values must be IRIs with an rdfs:label"
                )
            values.setdefault(str(v), Value(str(v), label(v), alts(v)))
            vals.append(values[str(v)])
        if not vals:
            raise OntologyError(f"{where}: relation {label(rel)} lists no stkg:allowedValue")
        name = label(rel)
        if name in relations:
            raise OntologyError(f"{where}: two relations are labelled {name!r}")
        domain = graph.value(rel, RDFS.domain)
        relations[name] = Relation(
            str(rel),
            name,
            tuple(vals),
            alts(rel),
            str(domain) if domain else None,
            str(graph.value(rel, RDFS.comment) or ""),
        )
    if not relations:
        raise OntologyError(f"{where} declares no `a stkg:Relation`")
    _check_unambiguous(relations, values, where)
    return Ontology(
        label(head),
        str(head),
        str(graph.value(head, st.subject) or "image"),
        relations,
        where,
        str(graph.value(head, RDFS.comment) or ""),
        values,
    )


def _check_unambiguous(relations: dict[str, Relation], values: dict[str, Value], where: str) -> None:
    """A synonym may name one relation only, and one value only: otherwise alignment would have to guess."""
    seen: dict[str, str] = {}
    for r in relations.values():
        for s in (r.name, *r.synonyms):
            key = normalise(s)
            if seen.setdefault(key, r.name) != r.name:
                raise OntologyError(f"{where}: {s!r} names both {seen[key]} and {r.name}")
    seen = {}
    for v in values.values():
        for s in (v.label, *v.synonyms):
            key = normalise(s)
            if seen.setdefault(key, v.iri) != v.iri:
                raise OntologyError(f"{where}: {s!r} names two values ({seen[key]} and {v.iri})")

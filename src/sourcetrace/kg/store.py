"""The knowledge-graph store: one star graph per image in an embedded RDF store, read with SPARQL.

Each image is a node `urn:sourcetrace:image:<role>/<id>` with `stkg:id`, `stkg:role` ("train", "generated",
"reference", ...), optionally `stkg:prompt` (the prompt a generation came from) and `stkg:collection`
(a reference image's source, e.g. a film), and one edge per attribute: `<image> <relation IRI> <value IRI>`.
The ontology's relations and values are in the store too, so the graph explains itself when exported.

Backends: pyoxigraph (default; on disk when given a folder, transactional) or rdflib (in memory, for small
graphs). An image's triples are written in one transaction: an image is in the store completely or not at
all. Every query the similarity measures need is in `QUERIES`, runnable as is with `store.query(...)` or
any SPARQL 1.1 engine on an export.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..artifacts import atomic_write, check_manifest
from ..errors import SourcetraceError, require
from .align import Alignment, Triple
from .ontology import VOCAB, Ontology, OntologyError

RDF_TYPE = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type"
RDFS_LABEL = "http://www.w3.org/2000/01/rdf-schema#label"
IMAGE = "urn:sourcetrace:image:"
FORMATS = {
    "turtle": ("turtle", "TURTLE"),
    "json-ld": ("json-ld", "JSON_LD"),
    "n-triples": ("nt", "N_TRIPLES"),
}


class StoreError(SourcetraceError, ValueError):
    """A store operation that cannot be done as asked."""


_PREFIXES = f"""PREFIX stkg: <{VOCAB}>
PREFIX rdfs: <http://www.w3.org/2000/01/rdf-schema#>
"""

# The queries behind every measure; `$name` marks a parameter (a string literal), see `render_query`.
QUERIES: dict[str, str] = {
    # every attribute triple of the images with a role (optionally one prompt's generations)
    "triples": _PREFIXES
    + """SELECT ?id ?prompt ?relation ?value WHERE {
  ?image stkg:role $role ; stkg:id ?id ; ?r ?v .
  OPTIONAL { ?image stkg:prompt ?prompt }
  ?r a stkg:Relation ; rdfs:label ?relation .
  ?v rdfs:label ?value .
} ORDER BY ?id ?relation ?value""",
    # in how many training images each (relation, value) occurs, and how many training images there are
    "document-frequency": _PREFIXES
    + """SELECT ?relation ?value (COUNT(DISTINCT ?image) AS ?df) WHERE {
  ?image stkg:role $role ; ?r ?v .
  ?r a stkg:Relation ; rdfs:label ?relation .
  ?v rdfs:label ?value .
} GROUP BY ?relation ?value ORDER BY ?relation ?value""",
    "count-images": _PREFIXES + """SELECT (COUNT(DISTINCT ?image) AS ?n) WHERE { ?image stkg:role $role }""",
    # relation-aware: the triples one query image shares with each image of another role
    "shared-triples": _PREFIXES
    + """SELECT ?id ?relation ?value WHERE {
  ?query stkg:id $query ; stkg:role $query_role ; ?r ?v .
  ?r a stkg:Relation ; rdfs:label ?relation .
  ?v rdfs:label ?value .
  ?image stkg:role $role ; stkg:id ?id ; ?r ?v .
} ORDER BY ?id ?relation ?value""",
    # relation-blind (the published count): values the query image shares with each image, whatever relation
    "shared-values": _PREFIXES
    + """SELECT ?id (COUNT(DISTINCT ?v) AS ?shared) WHERE {
  ?query stkg:id $query ; stkg:role $query_role ; ?r1 ?v .
  ?r1 a stkg:Relation .
  ?image stkg:role $role ; stkg:id ?id ; ?r2 ?v .
  ?r2 a stkg:Relation .
} GROUP BY ?id ORDER BY DESC(?shared) ?id""",
    # style attribution: triples the transformed image has and its original lacks, found in each collection
    "gained-by-collection": _PREFIXES
    + """SELECT ?collection ?relation ?value (COUNT(DISTINCT ?image) AS ?n)
WHERE {
  ?transformed stkg:id $transformed ; stkg:role $query_role ; ?r ?v .
  ?r a stkg:Relation ; rdfs:label ?relation .
  ?v rdfs:label ?value .
  ?original stkg:id $original ; stkg:role $query_role .
  FILTER NOT EXISTS { ?original ?r ?v }
  ?image stkg:role $role ; stkg:collection ?collection ; ?r ?v .
} GROUP BY ?collection ?relation ?value ORDER BY ?collection ?relation ?value""",
    "gained": _PREFIXES
    + """SELECT ?relation ?value WHERE {
  ?transformed stkg:id $transformed ; stkg:role $query_role ; ?r ?v .
  ?r a stkg:Relation ; rdfs:label ?relation .
  ?v rdfs:label ?value .
  ?original stkg:id $original ; stkg:role $query_role .
  FILTER NOT EXISTS { ?original ?r ?v }
} ORDER BY ?relation ?value""",
}


def literal(text: Any) -> str:
    """A SPARQL string literal."""
    s = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{s}"'


def render_query(name: str, **params: Any) -> str:
    """`QUERIES[name]` with each `$param` replaced by a string literal (longest names first)."""
    if name not in QUERIES:
        raise StoreError(f"no query {name!r}; queries: {', '.join(QUERIES)}")
    text = QUERIES[name]
    for key in sorted(params, key=len, reverse=True):
        text = text.replace(f"${key}", literal(params[key]))
    if "$" in text:
        missing = sorted({w.split()[0].strip(";.}") for w in text.split("$")[1:]})
        raise StoreError(f"query {name!r} needs parameters {missing}")
    return text


def image_iri(image_id: Any, role: str) -> str:
    return f"{IMAGE}{quote(str(role), safe='')}/{quote(str(image_id), safe='')}"


class KGStore:
    """Star graphs of images under one ontology. `path`: a folder (kept on disk, pyoxigraph) or None."""

    def __init__(
        self,
        ontology: Ontology,
        path: str | os.PathLike | None = None,
        *,
        backend: str = "oxigraph",
        overwrite: bool = False,
    ):
        if backend not in ("oxigraph", "rdflib"):
            raise StoreError(f"backend must be 'oxigraph' or 'rdflib'; got {backend!r}")
        if path is not None and backend != "oxigraph":
            raise StoreError(
                "only the oxigraph backend keeps a store on disk; use backend='oxigraph' or "
                "export() the rdflib graph"
            )
        self.ontology, self.backend = ontology, backend
        self.path = Path(path) if path is not None else None
        if backend == "oxigraph":
            ox = require("pyoxigraph", "kg")
            if self.path is not None:
                check_manifest(
                    self.path,
                    {
                        "kind": "sourcetrace kg store",
                        "ontology": ontology.iri,
                        "relations": sorted(r.iri for r in ontology.relations.values()),
                    },
                    overwrite=overwrite,
                    what="kg store",
                )
                self._db = ox.Store(str(self.path / "oxigraph"))
            else:
                self._db = ox.Store()
        else:
            self._db = require("rdflib", "kg").Graph()
        if not self._ask(f"ASK {{ <{ontology.iri}> a <{VOCAB}Ontology> }}"):
            self._insert(self._ontology_triples())

    # ---- writing ---------------------------------------------------------------------------------------
    def _ontology_triples(self) -> list[tuple[str, str, Any]]:
        out: list[tuple[str, str, Any]] = [
            (self.ontology.iri, RDF_TYPE, Iri(f"{VOCAB}Ontology")),
            (self.ontology.iri, RDFS_LABEL, self.ontology.name),
        ]
        for rel in self.ontology.relations.values():
            out += [(rel.iri, RDF_TYPE, Iri(f"{VOCAB}Relation")), (rel.iri, RDFS_LABEL, rel.name)]
            out += [(rel.iri, f"{VOCAB}allowedValue", Iri(v.iri)) for v in rel.values]
        out += [(v.iri, RDFS_LABEL, v.label) for v in self.ontology.values.values()]
        return out

    def _image_triples(
        self, image_id: Any, triples: Iterable[Triple], role: str, prompt: Any, collection: Any
    ) -> list[tuple[str, str, Any]]:
        node = image_iri(image_id, role)
        out: list[tuple[str, str, Any]] = [
            (node, RDF_TYPE, Iri(f"{VOCAB}Image")),
            (node, f"{VOCAB}id", str(image_id)),
            (node, f"{VOCAB}role", role),
        ]
        if prompt is not None:
            out.append((node, f"{VOCAB}prompt", str(prompt)))
        if collection is not None:
            out.append((node, f"{VOCAB}collection", str(collection)))
        for t in triples:
            if not isinstance(t, Triple):
                raise StoreError(f"the store takes aligned Triple objects (see kg.Aligner); got {t!r}")
            try:
                value = self.ontology.value_iri(t.relation, t.value)
            except OntologyError as exc:
                raise StoreError(f"image {image_id!r}: {exc}") from None
            out.append((node, self.ontology.relation(t.relation).iri, Iri(value)))
        return out

    def add(
        self,
        image_id: Any,
        triples: Iterable[Triple],
        *,
        role: str = "train",
        prompt: Any = None,
        collection: Any = None,
    ) -> None:
        """Add one image's triples in one transaction; an image already in the store is refused."""
        self.add_many(
            [(image_id, triples)],
            role=role,
            prompts=None if prompt is None else [prompt],
            collections=None if collection is None else [collection],
        )

    def add_many(
        self,
        items: Sequence[tuple[Any, Iterable[Triple]]],
        *,
        role: str = "train",
        prompts: Sequence[Any] | None = None,
        collections: Sequence[Any] | None = None,
    ) -> None:
        """Add (image id, triples) pairs in one transaction: all of them or, on any error, none."""
        for name, extra in (("prompts", prompts), ("collections", collections)):
            if extra is not None and len(extra) != len(items):
                raise StoreError(f"{len(extra)} {name} for {len(items)} images")
        ids = [str(i) for i, _ in items]
        if len(set(ids)) != len(ids):
            raise StoreError(
                f"image ids repeat within the batch: {sorted({i for i in ids if ids.count(i) > 1})[:5]}"
            )
        present = [i for i in ids if self.has(i, role)]
        if present:
            raise StoreError(
                f"images {present[:5]} (role {role!r}) are already in the store; remove() them "
                "first or use other ids"
            )
        quads = []
        for n, (image_id, triples) in enumerate(items):
            quads += self._image_triples(
                image_id,
                triples,
                role,
                prompts[n] if prompts is not None else None,
                collections[n] if collections is not None else None,
            )
        self._insert(quads)

    def add_images(
        self,
        extractor: Any,
        images: Iterable[tuple[Any, Any]],
        *,
        role: str = "train",
        prompts: Sequence[Any] | None = None,
        collections: Sequence[Any] | None = None,
        progress: bool = True,
    ) -> Alignment:
        """Extract and add (image id, image) pairs, each image in its own transaction; resumable.

        Images already in the store are skipped, so a run stopped by an extraction error continues where it
        stopped. Returns the alignment counts over the images added now (unknown relations and values).
        """
        from tqdm.auto import tqdm

        items = list(images)
        for name, extra in (("prompts", prompts), ("collections", collections)):
            if extra is not None and len(extra) != len(items):
                raise StoreError(f"{len(extra)} {name} for {len(items)} images")
        if extractor.ontology.iri != self.ontology.iri:
            raise StoreError(
                f"the extractor uses ontology {extractor.ontology.name!r} but the store holds "
                f"{self.ontology.name!r}; use one ontology for both"
            )
        total = Alignment(())
        for n, (image_id, image) in enumerate(tqdm(items, desc="extracting triples", disable=not progress)):
            if self.has(image_id, role):
                continue
            found = extractor.extract(image, image_id)
            self.add(
                image_id,
                found.triples,
                role=role,
                prompt=prompts[n] if prompts is not None else None,
                collection=collections[n] if collections is not None else None,
            )
            total = total.merge(found)
        return total

    def remove(self, image_id: Any, role: str = "train") -> None:
        node = image_iri(image_id, role)
        self._update(f"DELETE WHERE {{ <{node}> ?p ?o }}")

    def has(self, image_id: Any, role: str = "train") -> bool:
        return self._ask(f"ASK {{ <{image_iri(image_id, role)}> <{VOCAB}role> ?r }}")

    # ---- reading ---------------------------------------------------------------------------------------
    def query(self, sparql: str) -> list[dict[str, Any]]:
        """Run a SPARQL SELECT; each row a dict variable -> value (str, int, float; None if unbound)."""
        if self.backend == "oxigraph":
            result = self._db.query(sparql)
            names = [v.value for v in result.variables]
            return [{n: _ox_value(row[n]) for n in names} for row in result]
        result = self._db.query(sparql)
        names = [str(v) for v in result.vars]
        return [{n: (None if row[n] is None else row[n].toPython()) for n in names} for row in result]

    def run(self, name: str, **params: Any) -> list[dict[str, Any]]:
        """One of `QUERIES` with its parameters."""
        return self.query(render_query(name, **params))

    def triples(self, role: str = "train") -> dict[str, tuple[Any, frozenset[Triple]]]:
        """{image id: (prompt or None, its triples)} of the images with `role` (also those without any)."""
        out: dict[str, tuple[Any, set[Triple]]] = {}
        for row in self.query(
            _PREFIXES + f"SELECT ?id ?prompt WHERE {{ ?i stkg:role {literal(role)} ; "
            "stkg:id ?id . OPTIONAL { ?i stkg:prompt ?prompt } }"
        ):
            out[str(row["id"])] = (row["prompt"], set())
        for row in self.run("triples", role=role):
            out[str(row["id"])][1].add(Triple(str(row["relation"]), str(row["value"])))
        return {k: (p, frozenset(s)) for k, (p, s) in sorted(out.items(), key=lambda kv: _id_key(kv[0]))}

    def __len__(self) -> int:
        rows = self.query(f"SELECT (COUNT(DISTINCT ?i) AS ?n) WHERE {{ ?i <{RDF_TYPE}> <{VOCAB}Image> }}")
        return int(rows[0]["n"])

    # ---- export ----------------------------------------------------------------------------------------
    def export(self, path: str | os.PathLike, format: str = "turtle") -> Path:
        """Write the whole graph as Turtle, JSON-LD or N-Triples (atomically)."""
        if format not in FORMATS:
            raise StoreError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
        if self.backend == "oxigraph":
            ox = require("pyoxigraph", "kg")
            fmt = getattr(ox.RdfFormat, FORMATS[format][1])
            return atomic_write(
                path, lambda tmp: self._db.dump(tmp, format=fmt, from_graph=ox.DefaultGraph())
            )
        return atomic_write(path, lambda tmp: self._db.serialize(destination=tmp, format=FORMATS[format][0]))

    # ---- backend primitives ----------------------------------------------------------------------------
    def _insert(self, triples: list[tuple[str, str, Any]]) -> None:
        if self.backend == "oxigraph":
            ox = require("pyoxigraph", "kg")

            def obj(o: Any):
                return ox.NamedNode(o) if _is_iri(o) else ox.Literal(str(o))

            self._db.extend(
                [ox.Quad(ox.NamedNode(s), ox.NamedNode(p), obj(o), ox.DefaultGraph()) for s, p, o in triples]
            )  # one transaction
        else:
            rdflib = require("rdflib", "kg")
            made = [
                (
                    rdflib.URIRef(s),
                    rdflib.URIRef(p),
                    rdflib.URIRef(o) if _is_iri(o) else rdflib.Literal(str(o)),
                )
                for s, p, o in triples
            ]  # built first, so a bad term leaves the graph untouched
            for t in made:
                self._db.add(t)

    def _update(self, sparql: str) -> None:
        self._db.update(sparql)

    def _ask(self, sparql: str) -> bool:
        result = self._db.query(sparql)
        return bool(result) if self.backend == "oxigraph" else bool(result.askAnswer)


class Iri(str):
    """An object that is an IRI (any other object is written as a string literal)."""


def _is_iri(o: Any) -> bool:
    return isinstance(o, Iri)


def _ox_value(term: Any) -> Any:
    if term is None:
        return None
    value = term.value
    datatype = getattr(getattr(term, "datatype", None), "value", "")
    if datatype.endswith("#integer"):
        return int(value)
    if datatype.endswith(("#double", "#decimal", "#float")):
        return float(value)
    return value


def _id_key(i: str) -> tuple[int, Any]:
    return (0, int(i)) if i.lstrip("-").isdigit() else (1, i)

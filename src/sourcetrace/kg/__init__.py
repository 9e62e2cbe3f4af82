"""Knowledge-graph attribution for generated images: ontology-constrained triples, a SPARQL store, similarity.

A vision-language model (or, for the project's procedural images, `SceneExtractor`) describes each image as
triples constrained by an ontology (`load_ontology`); `Aligner` maps them onto canonical relations and values
and counts what does not fit; `KGStore` keeps one star graph per image in an embedded RDF store; `kg_scores`
ranks training images by the triples they share with a prompt's generations, and `style_attribution` says
which reference collections carry the traits a stylised image gained.

Why a package of its own rather than `similarity/kg` (where DESIGN.md places it): the embedding-similarity
family is being built in `similarity/` at the same time, and knowledge-graph attribution is a separate family
of evidence with its own store, extractors and optional dependencies (`sourcetrace[kg]`: rdflib, pyoxigraph);
keeping it apart lets the two land independently. Both return `sourcetrace.Scores`.
"""

from .align import Aligner, Alignment, Triple
from .extract import ExtractionError, Extractor, SceneExtractor, VLMExtractor
from .ontology import Ontology, OntologyError, Relation, Value, load_ontology, shipped_ontologies
from .similarity import MEASURES, kg_scores, shared_text, similarity, style_attribution
from .store import QUERIES, KGStore, StoreError, render_query

__all__ = [
    "MEASURES",
    "QUERIES",
    "Aligner",
    "Alignment",
    "ExtractionError",
    "Extractor",
    "KGStore",
    "Ontology",
    "OntologyError",
    "Relation",
    "SceneExtractor",
    "StoreError",
    "Triple",
    "VLMExtractor",
    "Value",
    "kg_scores",
    "load_ontology",
    "render_query",
    "shared_text",
    "shipped_ontologies",
    "similarity",
    "style_attribution",
]

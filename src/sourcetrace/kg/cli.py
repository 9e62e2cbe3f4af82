# ruff: noqa: B008 - typer reads its options from argument defaults
"""`sourcetrace kg prompt | extract | score | export | queries`: KG attribution from the shell."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from ..errors import SourcetraceError

app = typer.Typer(help="Knowledge-graph attribution for generated images.", no_args_is_help=True)
_console = Console()
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ONTOLOGY = typer.Option("fashion", help="A shipped ontology (fashion, art-style) or a Turtle file.")
STORE = typer.Option(..., "--store", help="Folder of the knowledge-graph store (made on first use).")


def _fail(exc: Exception) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/] {exc}")
    raise typer.Exit(2)


@app.command()
def prompt(
    ontology: str = typer.Argument("fashion", help="A shipped ontology or a Turtle file."),
    numbered: bool = typer.Option(False, help="The numbered-triple prompt instead of JSON."),
) -> None:
    """Print the extraction prompt an ontology makes (what a VLM is asked)."""
    from .ontology import load_ontology

    try:
        print(load_ontology(ontology).prompt(json_mode=not numbered))
    except SourcetraceError as exc:
        _fail(exc)


@app.command()
def extract(
    images: Path = typer.Argument(..., help="An image file or a folder of PNG/JPEG/WebP images."),
    store: Path = STORE,
    ontology: str = ONTOLOGY,
    base_url: str = typer.Option(..., help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:11434/v1"),
    model: str = typer.Option(..., help="Model name the endpoint serves, e.g. llama3.2-vision."),
    role: str = typer.Option("train", help="train, generated, reference, ..."),
    prompt_text: str | None = typer.Option(None, "--prompt", help="The prompt of generated images."),
    collection: str | None = typer.Option(None, help="The source collection of reference images."),
    json_mode: str = typer.Option("auto", help="auto, on or off."),
    timeout: float = typer.Option(120.0),
    retries: int = typer.Option(2),
    cache: Path | None = typer.Option(None, help="Answer cache folder [default: STORE/vlm-cache]"),
) -> None:
    """Describe each image with a VLM and add its triples to the store (resumes where it stopped)."""
    from .extract import VLMExtractor
    from .ontology import load_ontology
    from .store import KGStore

    files = (
        sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if images.is_dir()
        else [images]
    )
    if not files:
        _fail(ValueError(f"no PNG, JPEG or WebP images under {images}"))
    modes: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}
    if json_mode not in modes:
        _fail(ValueError(f"--json-mode must be auto, on or off; got {json_mode!r}"))
    try:
        onto = load_ontology(ontology)
        kg = KGStore(onto, store)
        ex = VLMExtractor(
            onto,
            base_url,
            model,
            json_mode=modes[json_mode],
            timeout=timeout,
            retries=retries,
            cache_dir=cache or store / "vlm-cache",
        )
        ids = [str(p.relative_to(images)) if images.is_dir() else p.name for p in files]
        counts = kg.add_images(
            ex,
            list(zip(ids, files)),
            role=role,
            prompts=None if prompt_text is None else [prompt_text] * len(files),
            collections=None if collection is None else [collection] * len(files),
        )
    except SourcetraceError as exc:
        _fail(exc)
    _console.print(f"{len(files)} images in the store under role {role!r}; added now: {counts.summary()}")


@app.command()
def score(
    store: Path = STORE,
    ontology: str = ONTOLOGY,
    measure: str = typer.Option("idf-jaccard", help="count, relation, idf-jaccard or relation-jaccard."),
    by: str = typer.Option("prompt", help="prompt (a prompt's generations together) or image."),
    out: Path | None = typer.Option(None, help="Save the Scores here."),
    k: int = typer.Option(5, help="How many training images to show per query."),
) -> None:
    """Rank the training images for each prompt by the triples they share with its generations."""
    from .ontology import load_ontology
    from .similarity import kg_scores, shared_text
    from .store import KGStore

    try:
        scores = kg_scores(KGStore(load_ontology(ontology), store), measure=measure, by=by, explain_k=k)
    except SourcetraceError as exc:
        _fail(exc)
    for q in scores.query_ids:
        _console.print(f"[bold]{q}[/bold]")
        for a in scores.top(q, k):
            _console.print(f"  {a.score:8.3f}  {a.train_id}: {shared_text(scores, q, a.train_id, sep='; ')}")
    if out is not None:
        scores.save(out)
        _console.print(f"saved: {out}")


@app.command()
def export(
    store: Path = STORE,
    out: Path = typer.Argument(..., help="File to write."),
    ontology: str = ONTOLOGY,
    format: str = typer.Option("turtle", help="turtle, json-ld or n-triples."),
) -> None:
    """Write the whole graph as Turtle or JSON-LD."""
    from .ontology import load_ontology
    from .store import KGStore

    try:
        KGStore(load_ontology(ontology), store).export(out, format)
    except SourcetraceError as exc:
        _fail(exc)
    _console.print(f"written: {out}")


@app.command()
def queries() -> None:
    """Print the SPARQL queries behind the measures (`$name` marks a string parameter)."""
    from .store import QUERIES

    for name, text in QUERIES.items():
        print(f"# {name}\n{text}\n")

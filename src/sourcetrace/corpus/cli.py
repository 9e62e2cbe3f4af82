# ruff: noqa: B008 - typer reads its options from argument defaults
"""`sourcetrace corpus build | trace | mine`: the verbatim-tracing commands (mounted by the main CLI)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console

from ..errors import SourcetraceError

app = typer.Typer(
    help="Verbatim tracing: index a corpus, trace text into it, mine low-perplexity spans.",
    no_args_is_help=True,
)
_console = Console()


def _fail(exc: Exception) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/] {exc}")
    raise typer.Exit(2)


@app.command()
def build(
    source: Path = typer.Argument(..., help="JSONL / JSON / Parquet file or a folder of text files."),
    index: Path = typer.Option(..., "--index", "-o", help="Folder to write the index to."),
    tokenizer: str = typer.Option(
        "bytes",
        help="'bytes', 'word' (vocabulary from the corpus), a tokenizer.json "
        "or a local transformers tokenizer folder.",
    ),
    engine: str = typer.Option("auto", help="'auto', 'infini-gram' or 'portable'."),
    shard_tokens: int = typer.Option(1 << 30, help="Start a new shard past this many tokens."),
    text_field: str = typer.Option("text", help="Field holding the text in JSONL/Parquet records."),
    id_field: str = typer.Option("id", help="Field holding the document id."),
    skip_empty: bool = typer.Option(False, help="Skip documents with no text instead of failing."),
    overwrite: bool = typer.Option(False, help="Replace an index made from other data or settings."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Tokenize a corpus and build its suffix-array index."""
    from .index import CorpusIndex

    try:
        idx = CorpusIndex.build(
            source,
            tokenizer,
            index,
            engine=engine,
            shard_tokens=shard_tokens,
            text_field=text_field,
            id_field=id_field,
            skip_empty=skip_empty,
            overwrite=overwrite,
            progress=not as_json,
        )
    except SourcetraceError as exc:
        _fail(exc)
        return
    info = {
        "index": str(idx.path),
        "engine": idx.engine_name,
        "docs": idx.n_docs,
        "tokens": idx.n_tokens,
        "shards": idx.n_shards,
        "tokenizer": idx.manifest["tokenizer_name"],
    }
    if as_json:
        print(json.dumps(info))
    else:
        _console.print(
            f"[green]built[/] {info['index']}: {info['docs']} documents, {info['tokens']} tokens, "
            f"{info['shards']} shard(s), engine {info['engine']}, tokenizer {info['tokenizer']}"
        )


@app.command()
def trace(
    text: Optional[str] = typer.Argument(None, help="Text to trace (or use --file / stdin with '-')."),  # noqa: UP045
    index: Path = typer.Option(..., "--index", "-i", help="Index folder."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the text from a file."),  # noqa: UP045
    prompt: Optional[str] = typer.Option(None, help="The prompt, used to re-rank documents (BM25)."),  # noqa: UP045
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer, if the index does not store one."),  # noqa: UP045
    min_len: int = typer.Option(4, help="Minimum span length in tokens."),
    max_count: Optional[int] = typer.Option(None, help="Drop spans that occur more often than this."),  # noqa: UP045
    word_boundary: bool = typer.Option(True, help="Spans start and end on word boundaries."),
    rank_by: str = typer.Option("unigram", help="'unigram' (most unusual first) or 'length'."),
    density: float = typer.Option(0.05, help="Keep ceil(density * tokens) spans; 0 keeps all."),
    docs_per_span: int = typer.Option(10, help="Documents fetched per span."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write an HTML page of the trace."),  # noqa: UP045
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Trace a text into the corpus: maximal verbatim spans and the documents that hold them."""
    from .index import CorpusIndex

    if file is not None:
        text = file.read_text(encoding="utf-8")
    elif text in (None, "-"):
        text = sys.stdin.read()
    if not text:
        _fail(ValueError("nothing to trace; pass TEXT, --file or pipe text in"))
    try:
        with CorpusIndex.open(index, tokenizer) as idx:
            result = idx.trace(
                text,
                prompt=prompt,
                min_len=min_len,
                max_count=max_count,
                word_boundary=word_boundary,
                rank_by=rank_by,
                density=density or None,
                docs_per_span=docs_per_span,
            )
    except SourcetraceError as exc:
        _fail(exc)
        return
    if html_out is not None:
        from ..artifacts import atomic_write

        page = result.to_html()
        atomic_write(html_out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
    else:
        _console.print(result)
        if html_out is not None:
            _console.print(f"HTML page: {html_out}")


@app.command()
def mine(
    model: Path = typer.Option(..., help="A local Hugging Face causal LM folder."),
    prompts: Optional[Path] = typer.Option(None, help="File with one prompt per line (JSONL: 'prompt')."),  # noqa: UP045
    texts: Optional[Path] = typer.Option(None, help="File with one text per line to score instead."),  # noqa: UP045
    index: Optional[Path] = typer.Option(None, "--index", "-i", help="Index to trace spans into."),  # noqa: UP045
    tokenizer: Optional[str] = typer.Option(None, help="Model tokenizer (default: the model folder's)."),  # noqa: UP045
    window: int = typer.Option(6, help="Window length in tokens."),
    threshold: float = typer.Option(0.9, help="Every token of a window needs p >= threshold."),
    temperature: float = typer.Option(0.7),
    top_k: int = typer.Option(20),
    top_p: float = typer.Option(0.8),
    max_new_tokens: int = typer.Option(100),
    samples: int = typer.Option(1, help="Samples per prompt."),
    seed: int = typer.Option(0),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write an HTML report."),  # noqa: UP045
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Generate (or score texts), mine low-perplexity spans, and trace them into the corpus."""
    from ..errors import require
    from .index import CorpusIndex
    from .mining import mine_low_perplexity

    if (prompts is None) == (texts is None):
        _fail(ValueError("pass exactly one of --prompts or --texts"))
    try:
        transformers = require("transformers", "llm")
        lm = transformers.AutoModelForCausalLM.from_pretrained(str(model), local_files_only=True)
        lm.eval()
        tok = tokenizer or str(model)
        from .tokenizers import as_tokenizer

        mtok = as_tokenizer(tok)
        source = prompts or texts
        assert source is not None  # exactly one of them was checked above
        items = _read_lines(source, "prompt" if prompts else "text")
        idx = CorpusIndex.open(index) if index is not None else None
        report = mine_low_perplexity(
            lm,
            mtok,
            prompts=items if prompts else None,
            texts=items if texts else None,
            index=idx,
            window=window,
            threshold=threshold,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            samples_per_prompt=samples,
            seed=seed,
            progress=not as_json,
        )
    except SourcetraceError as exc:
        _fail(exc)
        return
    if html_out is not None:
        from ..artifacts import atomic_write

        page = report.to_html()
        atomic_write(html_out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    if as_json:
        print(json.dumps(report.to_dict(), default=str))
    else:
        _console.print(report)


def _read_lines(path: Path, key: str) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            item = json.loads(line)
            out.append(item[key] if isinstance(item, dict) else str(item))
        else:
            out.append(line)
    return out

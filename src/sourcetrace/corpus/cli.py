# ruff: noqa: B008 - typer reads its options from argument defaults
"""`sourcetrace corpus build | trace | mine`: the verbatim-tracing commands (mounted by the main CLI).

Every error a user can cause is one line on stderr that names the command line's own flags, with exit
code 2; progress bars show only on a terminal and are erased when an error ends them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from ..errors import SourcetraceError

TOKENIZER_OPTION = (
    "'bytes', 'word' (a vocabulary made from the corpus), a Hugging Face tokenizer.json file, or a "
    "local Hugging Face tokenizer folder (AutoTokenizer)."
)


class _OneLineErrors(TyperGroup):
    """Bad flags and values (click's usage errors) answered by one line, like every other error here."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # typer bundles its own click, so its usage errors are known by their class names
            names = {c.__name__ for c in type(exc).__mro__}
            if "UsageError" not in names or "NoArgsIsHelpError" in names:
                raise
            typer.echo(f"error: {exc.format_message()} (see --help)", err=True)  # type: ignore[attr-defined]
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_OneLineErrors,
    help="Verbatim tracing: index a corpus, trace text into it, mine low-perplexity spans.",
    no_args_is_help=True,
)
_console = Console(soft_wrap=True)
_ARG = re.compile(r"\b([a-z_][a-z0-9_]*)=('[^']*'|\"[^\"]*\"|[^\s,;)]+)")


def _fail(ctx: typer.Context, exc: Exception | str) -> NoReturn:
    typer.echo(f"error: {as_flags(str(exc), ctx)}", err=True)
    raise typer.Exit(2)


def as_flags(message: str, ctx: typer.Context) -> str:
    """Write the Python arguments a message names (`overwrite=True`) as flags (`--overwrite`)."""
    options = {
        p.name: p for p in ctx.command.params if getattr(p, "opts", None) and p.opts[0].startswith("-")
    }

    def flag(m: re.Match[str]) -> str:
        opt = options.get(m.group(1))
        if opt is None:
            return m.group(0)
        name, value = max(opt.opts, key=len), m.group(2).strip("'\"")
        if value == "None":
            return f"no {name}"
        if getattr(opt, "is_flag", False) or opt.secondary_opts:
            if value == "True":
                return name
            if value == "False":
                return opt.secondary_opts[0] if opt.secondary_opts else f"no {name}"
        return f"{name} {value}"

    return _ARG.sub(flag, message)


def _show_progress(as_json: bool) -> bool:
    return not as_json and sys.stderr.isatty()


def _write_html(path: Path, page: str) -> None:
    from ..artifacts import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


@app.command()
def build(
    ctx: typer.Context,
    source: Path = typer.Argument(
        ..., exists=True, help="A JSONL / JSON / Parquet / text file, or a folder of files."
    ),
    index: Path = typer.Option(..., "--index", "-o", help="Folder to write the index to."),
    tokenizer: str = typer.Option("bytes", help=TOKENIZER_OPTION),
    glob: Optional[list[str]] = typer.Option(  # noqa: UP045
        None,
        help="In a folder, index only the files matching this pattern (e.g. '*.py'; repeat for more). "
        "Default: every file that is UTF-8 text, whatever its extension; .jsonl/.json/.parquet files are "
        "read as records. Hidden files are left out.",
    ),
    engine: str = typer.Option("auto", help="'auto', 'infini-gram' or 'portable'."),
    shard_tokens: int = typer.Option(1 << 30, help="Start a new shard past this many tokens."),
    token_dtype: Optional[str] = typer.Option(  # noqa: UP045
        None, help="Token width: 'u8', 'u16' or 'u32' (default: the narrowest the tokenizer fits)."
    ),
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
            token_dtype=token_dtype,
            text_field=text_field,
            id_field=id_field,
            glob=glob or None,
            skip_empty=skip_empty,
            overwrite=overwrite,
            progress=_show_progress(as_json),
        )
    except (SourcetraceError, OSError) as exc:
        _fail(ctx, exc)
    info = {
        "index": str(idx.path),
        "engine": idx.engine_name,
        "docs": idx.n_docs,
        "tokens": idx.n_tokens,
        "shards": idx.n_shards,
        "tokenizer": idx.manifest["tokenizer_name"],
        "skipped": idx.manifest.get("skipped", {}),
    }
    idx.close()
    if as_json:
        print(json.dumps(info))
        return
    _console.print(
        f"[green]built[/] {info['index']}: {info['docs']} documents, {info['tokens']} tokens, "
        f"{info['shards']} shard(s), engine {info['engine']}, tokenizer {info['tokenizer']}"
    )
    if info["skipped"]:
        why = ", ".join(f"{n} {reason}" for reason, n in info["skipped"].items())
        _console.print(f"skipped: {why}", highlight=False)


@app.command()
def trace(
    ctx: typer.Context,
    text: Optional[str] = typer.Argument(None, help="Text to trace (or use --file / stdin with '-')."),  # noqa: UP045
    index: Path = typer.Option(..., "--index", "-i", help="Index folder."),
    file: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--file", "-f", exists=True, dir_okay=False, help="Read the text from a file."
    ),
    prompt: Optional[str] = typer.Option(None, help="The prompt, used to re-rank documents (BM25)."),  # noqa: UP045
    tokenizer: Optional[str] = typer.Option(  # noqa: UP045
        None, help="The index's tokenizer, only if the index does not store it: " + TOKENIZER_OPTION
    ),
    min_len: int = typer.Option(4, help="Minimum span length in words, whatever the tokenizer."),
    max_count: Optional[int] = typer.Option(None, help="Drop spans that occur more often than this."),  # noqa: UP045
    word_boundary: bool = typer.Option(True, help="Spans start and end with whole words."),
    rank_by: str = typer.Option("unigram", help="'unigram' (most unusual first) or 'length'."),
    density: float = typer.Option(
        0.05, help="Keep ceil(density * tokens) spans, density in (0, 1]; 0 keeps all."
    ),
    docs_per_span: int = typer.Option(10, help="Documents fetched per span."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write an HTML page of the trace."),  # noqa: UP045
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Trace a text into the corpus: maximal verbatim spans and the documents that hold them."""
    from .index import CorpusIndex, check_span_options

    try:
        check_span_options(
            min_len=min_len,
            max_count=max_count,
            rank_by=rank_by,
            density=density or None,
            docs_per_span=docs_per_span,
        )
        if file is not None:
            text = file.read_text(encoding="utf-8")
        elif text in (None, "-"):
            text = sys.stdin.read()
        if not text:
            _fail(ctx, "nothing to trace; pass TEXT, --file or pipe text in")
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
        if html_out is not None:
            _write_html(html_out, result.to_html())
    except (SourcetraceError, OSError, UnicodeDecodeError) as exc:
        _fail(ctx, exc)
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
    else:
        _console.print(result)
        if html_out is not None:
            _console.print(f"HTML page: {html_out}")


@app.command()
def mine(
    ctx: typer.Context,
    model: Path = typer.Option(
        ..., exists=True, file_okay=False, help="A local Hugging Face causal LM folder (from_pretrained)."
    ),
    prompts: Optional[Path] = typer.Option(  # noqa: UP045
        None, exists=True, dir_okay=False, help="File with one prompt per line (JSONL: 'prompt')."
    ),
    texts: Optional[Path] = typer.Option(  # noqa: UP045
        None,
        exists=True,
        dir_okay=False,
        help="File with one text per line to score instead (JSONL: 'text').",
    ),
    index: Optional[Path] = typer.Option(None, "--index", "-i", help="Index to trace spans into."),  # noqa: UP045
    tokenizer: Optional[str] = typer.Option(  # noqa: UP045
        None,
        help="The model's tokenizer (default: the model folder's): a Hugging Face tokenizer.json file or "
        "tokenizer folder, or an index folder whose tokenizer the model uses.",
    ),
    window: int = typer.Option(6, help="Window length in the model's tokens; matches need this many words."),
    threshold: float = typer.Option(0.9, help="Every token of a window needs p >= threshold."),
    temperature: float = typer.Option(0.7, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(20, help="Sample among the k most likely tokens; 0 turns it off."),
    top_p: float = typer.Option(0.8, help="Nucleus sampling: the smallest set of tokens reaching p."),
    max_new_tokens: int = typer.Option(100, help="Tokens generated per sample."),
    samples_per_prompt: int = typer.Option(1, "--samples", help="Samples per prompt."),
    batch_size: int = typer.Option(64, help="Prompts generated together (with the model's cache)."),
    seed: int = typer.Option(0, help="Sample r of prompt i uses seed + 1000 * i + r."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write an HTML report."),  # noqa: UP045
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Generate (or score texts), mine low-perplexity spans, and trace them into the corpus."""
    from ..errors import require
    from .index import CorpusIndex
    from .mining import check_mining_options, mine_low_perplexity
    from .tokenizers import as_tokenizer

    if (prompts is None) == (texts is None):
        _fail(ctx, "pass exactly one of --prompts or --texts")
    options: dict[str, Any] = {
        "window": window,
        "threshold": threshold,
        "temperature": temperature,
        "top_k": top_k or None,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "samples_per_prompt": samples_per_prompt,
        "batch_size": batch_size,
    }
    idx = None
    try:
        check_mining_options(**options)
        source = prompts or texts
        assert source is not None  # exactly one of them was checked above
        items = _read_lines(source, "prompt" if prompts else "text")
        idx = CorpusIndex.open(index) if index is not None else None
        if tokenizer is None and not any(
            (model / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")
        ):
            _fail(ctx, f"the model folder {model} holds no tokenizer; pass --tokenizer")
        mtok = as_tokenizer(tokenizer or str(model))
        transformers = require("transformers", "llm")
        transformers.utils.logging.disable_progress_bar()
        try:
            lm = transformers.AutoModelForCausalLM.from_pretrained(str(model), local_files_only=True)
        except Exception as exc:  # missing weights, an unknown architecture, ...
            _fail(ctx, f"cannot load a causal LM from --model {model} ({type(exc).__name__}: {exc})")
        lm.eval()
        report = mine_low_perplexity(
            lm,
            mtok,
            prompts=items if prompts else None,
            texts=items if texts else None,
            index=idx,
            seed=seed,
            progress=_show_progress(as_json),
            **options,
        )
        if html_out is not None:
            _write_html(html_out, report.to_html())
    except (SourcetraceError, OSError, UnicodeDecodeError) as exc:
        _fail(ctx, exc)
    finally:
        if idx is not None:
            idx.close()
    if as_json:
        print(json.dumps(report.to_dict(), default=str))
    else:
        _console.print(report)


def _read_lines(path: Path, key: str) -> list[str]:
    from ..errors import CorpusError

    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{n + 1} is not valid JSON ({exc.msg})") from exc
            if isinstance(item, dict) and key not in item:
                raise CorpusError(f"{path}:{n + 1} has no {key!r} field")
            out.append(item[key] if isinstance(item, dict) else str(item))
        else:
            out.append(line)
    if not out:
        raise CorpusError(f"{path} holds no {key}s")
    return out

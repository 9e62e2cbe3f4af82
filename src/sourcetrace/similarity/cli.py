# ruff: noqa: B008 - typer reads its options from argument defaults
"""`sourcetrace similarity build | query`: index a folder of recordings, attribute a recording to it."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from ..errors import SourcetraceError

app = typer.Typer(help="Similarity attribution: index training audio by embeddings, match a recording to it.",
                  no_args_is_help=True)
_console = Console()


def _fail(exc: Exception) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


@app.command()
def build(audio_dir: Path = typer.Argument(..., help="a folder of audio files (recursive) or one file"),
          out: Path = typer.Option(..., "--out", "-o", help="folder to write the index to"),
          embedder: str = typer.Option("chroma", help="logmel, mfcc, chroma, chroma2dftm, contrastive "
                                                      "(trained on the folder), clap or mert"),
          model: Path = typer.Option(None, help="clap / mert: the local folder holding the pretrained model"),
          sample_rate: int = typer.Option(16000, help="sample rate of the files (DSP, contrastive)"),
          resample: bool = typer.Option(False, help="resample files at other rates instead of refusing them"),
          clip_seconds: float = typer.Option(3.0, help="clip window length in seconds"),
          hop_seconds: float = typer.Option(1.5, help="a new clip starts every this many seconds"),
          kind: str = typer.Option("auto", help="FAISS index: auto (exact up to 200k clips, IVF past it), "
                                                "flat, ivf or hnsw"),
          overwrite: bool = typer.Option(False, help="replace an existing index folder")) -> None:
    """Cut every recording into clips, embed them and write a similarity index."""
    from .audio import build_audio_index
    from .clips import ClipWindows
    from .embedders import make_embedder

    try:
        if embedder in ("clap", "mert"):
            if model is None:
                raise SourcetraceError(f"--embedder {embedder} needs --model FOLDER (a local model)")
            emb = make_embedder(embedder, folder=str(model))
        else:
            emb = make_embedder(embedder, sample_rate=sample_rate)
        index = build_audio_index(audio_dir, out, emb, windows=ClipWindows(clip_seconds, hop_seconds),
                                  resample=resample, kind=kind, overwrite=overwrite)
    except (SourcetraceError, FileNotFoundError) as exc:
        _fail(exc)
    _console.print(f"indexed {len(index)} clips of {len(index.tracks())} tracks into {out} "
                   f"({index.manifest['faiss']['kind']})")


@app.command()
def query(file: Path = typer.Argument(..., help="the recording to attribute"),
          index: Path = typer.Option(..., "--index", "-i", help="an index made by `similarity build`"),
          k: int = typer.Option(5, "-k", "--k", help="how many training tracks to show"),
          how: str = typer.Option("max", help="per-track score: max (best clip pair) or mean (all pairs)"),
          resample: bool = typer.Option(False, help="resample the recording to the index's rate"),
          report: Path = typer.Option(None, help="HTML report path [default: FILE's name + .html in the "
                                                 "current folder]")) -> None:
    """The training tracks most similar to FILE, with the matched offsets, and a report that plays them."""
    from .audio import query_audio, write_audio_report
    from .index import SimilarityIndex

    try:
        idx = SimilarityIndex(index)
        result = query_audio(file, idx, k=k, how=how, resample=resample)
        path = write_audio_report(result, idx, report or Path(f"{file.stem}.similarity.html"))
    except (SourcetraceError, FileNotFoundError) as exc:
        _fail(exc)
    for rank, m in enumerate(result.matches, 1):
        _console.print(f"{rank:>2}. {m.score:.3f}  {m.track} at {m.train_offset:.1f} s  "
                       f"(query at {m.query_offset:.1f} s)", highlight=False)
    _console.print(f"report written: {path}")

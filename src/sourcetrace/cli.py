"""The `sourcetrace` command: demo, bench, info (and the corpus and serve commands when present)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from .corpus.cli import app as corpus_app
from .errors import SourcetraceError
from .kg.cli import app as kg_app
from .similarity.cli import app as similarity_app

app = typer.Typer(help="Trace what a model produces back to the training data that caused it.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
console = Console()
app.add_typer(corpus_app, name="corpus",
              help="Verbatim tracing: index a corpus, trace text into it, mine spans.")
app.add_typer(similarity_app, name="similarity",
              help="Similarity attribution: index audio, match a recording.")
app.add_typer(kg_app, name="kg", help="Knowledge-graph attribution for generated images.")


def fail(message: object, hint: str = "", code: int = 1) -> NoReturn:
    """A user error: one line saying what went wrong, one saying what to do, a non-zero exit code."""
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors(hint: str = "") -> Iterator[None]:
    """Report the errors a user can cause (bad options, missing files) as `fail` does, not as a traceback."""
    try:
        yield
    except (SourcetraceError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError) as exc:
        fail(exc, hint)


def output_folder(path: Path, option: str = "--out") -> Path:
    """Refuse an output folder that is an existing file."""
    if path.exists() and not path.is_dir():
        fail(f"{option} {path} is a file", f"give {option} a folder (it is created if missing)")
    return path


@app.command()
def demo(name: str = typer.Argument("digits", help="which demo: digits (default) or one listed by "
                                                    "`sourcetrace info`"),
         out: Path = typer.Option(None, help="folder for the report and artifacts "
                                             "[default: sourcetrace-demo, or sourcetrace-demo-NAME]"),
         queries: int = typer.Option(3, help="digits: how many test predictions to explain"),
         k: int = typer.Option(3, help="digits: proponents and opponents shown per query")) -> None:
    """Run a demo on an embedded default. digits: train a small MLP on scikit-learn's digits, attribute a
    few test predictions by replaying its training, write a report and a view (`sourcetrace serve OUT`)."""
    from .demos import DEMOS, demo_names, load_demo

    if name != "digits" and name not in DEMOS:
        fail(f"unknown demo {name!r}", f"available: {', '.join(demo_names())}", code=2)
    out = output_folder(out or Path("sourcetrace-demo" if name == "digits" else f"sourcetrace-demo-{name}"))
    report: Path | None
    with user_errors("see `sourcetrace demo --help`"):
        if name == "digits":
            from .demos.digits import run

            report = run(out, queries=queries, k=k, console=console)
        else:
            report = load_demo(name)(out)
    if report is not None:
        console.print(f"report written: open [bold]{Path(report).resolve()}[/bold] in a browser")
    if (out / "view.json").exists():
        console.print(f"or serve it: [bold]sourcetrace serve {out}[/bold]")


@app.command()
def bench(name: str = typer.Argument(..., help="benchmark name; see `sourcetrace info`"),
          out: Path = typer.Option(Path("benchmarks"), help="where the .md and .json go"),
          workdir: Path = typer.Option(Path("runs/bench"), help="cache of trained models and ground truth"),
          only: list[str] = typer.Option(None, help="run only these methods or libraries")) -> None:
    """Run a benchmark and write benchmarks/NAME.md and .json."""
    from .bench import BENCHMARKS, run_benchmark

    if name not in BENCHMARKS:
        fail(f"unknown benchmark {name!r}", f"available: {', '.join(sorted(BENCHMARKS))}", code=2)
    output_folder(out)
    output_folder(workdir, "--workdir")
    with user_errors("see `sourcetrace bench --help`; a changed setting needs a new --workdir"):
        path = run_benchmark(name, out, workdir / name, only)
    console.print(f"written: {path}")


@app.command()
def serve(workdir: Path = typer.Argument(..., help="a folder written by sourcetrace.views.save_view (or by "
                                                   "`sourcetrace demo`)"),
          host: str = typer.Option("127.0.0.1", help="interface to bind; the default serves this machine "
                                                     "only"),
          port: int = typer.Option(8765, help="TCP port")) -> None:
    """Open the attribution views of WORKDIR in a local web app (select tokens to attribute them).

    WORKDIR is what `sourcetrace.views.save_view(workdir, scores, ..., backend=...)` writes; `sourcetrace
    demo` writes one too. The API is described at http://HOST:PORT/docs.
    """
    from .views.server import port_free, run_server
    from .views.session import VIEW_FILE

    if not workdir.exists():
        fail(f"no folder {workdir}", "run `sourcetrace demo` first (it writes sourcetrace-demo/), or give a "
                                     "folder written by sourcetrace.views.save_view")
    if not workdir.is_dir():
        fail(f"{workdir} is a file, not a folder", "give the folder that holds view.json")
    if not (workdir / VIEW_FILE).exists():
        found = " (it has a report.html: open that in a browser, or re-run what wrote it)" \
            if (workdir / "report.html").exists() else ""
        fail(f"{workdir} holds no view ({VIEW_FILE} is missing){found}",
             "write one with sourcetrace.views.save_view(folder, scores, ...), or run `sourcetrace demo`")
    if not 1 <= port <= 65535:
        fail(f"--port {port} is not a TCP port", "give --port between 1 and 65535")
    if not port_free(host, port):
        fail(f"cannot listen on {host}:{port} (in use, or not an address of this machine)",
             "pass another --port (or --host)")
    with user_errors("see `sourcetrace serve --help`"):
        run_server(workdir, host, port)


@app.command()
def whatif(folder: Path = typer.Argument(..., help="a folder holding a saved insights.Setting"),
           action: str = typer.Option("remove", help="remove, relabel, reweight or acquire"),
           rows: str = typer.Option(None, help="rows to act on, e.g. 3,17,40 (pool rows for acquire)"),
           group: str = typer.Option(None, help="or a group of rows, COLUMN=VALUE, e.g. source=batch-P"),
           label: int = typer.Option(None, help="relabel: the new label (default: the model's prediction)"),
           weight: float = typer.Option(0.0, help="reweight: the new weight"),
           slice_: str = typer.Option(None, "--slice", help="the behaviour's queries, COLUMN=VALUE"),
           errors: bool = typer.Option(False, help="only the misclassified queries of the slice"),
           metric: str = typer.Option("margin", help="margin, loss or accuracy"),
           verify: bool = typer.Option(False, help="retrain with the action applied and show the result"),
           example: bool = typer.Option(False, help="first save the planted example in FOLDER")) -> None:
    """Predict what an action on the training data does to a behaviour; --verify retrains to check."""
    from .insights.command import effect_table, make_example, run_whatif

    with user_errors("see `sourcetrace whatif --help`; `--example` saves a planted setting to try"):
        if example:
            make_example(folder)
            console.print(f"saved the planted tabular example in {folder} (groups: source, label, subclass)")
        e = run_whatif(folder, action=action, rows=rows, group=group, label=label, weight=weight,
                       slice_=slice_, errors_only=errors, metric=metric, verify=verify)
    console.print(effect_table(e))


@app.command()
def info() -> None:
    """Methods, benchmarks and optional extras found."""
    import importlib.util

    import sourcetrace as st

    from .bench import BENCHMARKS

    console.print(f"sourcetrace {st.__version__}")
    console.print("methods: " + ", ".join(st.available_methods()))
    console.print("benchmarks: " + ", ".join(sorted(BENCHMARKS)))
    from .demos import demo_names

    console.print("demos: " + ", ".join(demo_names()))
    extras = {"llm": ["transformers", "peft"], "corpus": ["infini_gram", "pydivsufsort"], "index": ["faiss"],
              "audio": ["librosa", "soundfile"], "kg": ["rdflib"],
              "views": ["jinja2", "anywidget", "fastapi", "uvicorn"],
              "bench": ["sklearn", "kronfluence", "captum", "trak", "dattri"]}
    table = Table("extra", "package", "found")
    for extra, modules in extras.items():
        for module in modules:
            found = importlib.util.find_spec(module) is not None
            table.add_row(extra, module, "[green]yes[/green]" if found else "[dim]no[/dim]")
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

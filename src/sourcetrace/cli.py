"""The `sourcetrace` command: demo, bench, info (and the corpus and serve commands when present)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .corpus.cli import app as corpus_app
from .kg.cli import app as kg_app
from .views.server import serve

app = typer.Typer(help="Trace what a model produces back to the training data that caused it.",
                  no_args_is_help=True, add_completion=False)
console = Console()
app.command("serve")(serve)  # fastapi and uvicorn load when the command runs
app.add_typer(corpus_app, name="corpus",
              help="Verbatim tracing: index a corpus, trace text into it, mine spans.")
app.add_typer(kg_app, name="kg", help="Knowledge-graph attribution for generated images.")

SHADES = " ░▒▓█"


def digit_art(image) -> str:
    """An 8×8 digit (grey levels 0–16) drawn with block characters."""
    return "\n".join("".join(SHADES[min(4, int(v) * 5 // 17)] for v in row) for row in image)


@app.command()
def demo(name: str = typer.Argument("digits", help="which demo: digits (default) or one listed by "
                                                    "`sourcetrace info`"),
         out: Path = typer.Option(None, help="folder for the report and artifacts "
                                             "[default: sourcetrace-demo, or sourcetrace-demo-NAME]"),
         queries: int = typer.Option(3, help="digits: how many test predictions to explain"),
         k: int = typer.Option(3, help="digits: proponents and opponents shown per query")) -> None:
    """Run a demo on an embedded default. digits: train a small MLP on scikit-learn's digits, attribute a
    few test predictions by replaying its training, write a report."""
    from .demos import DEMOS, demo_names, load_demo

    if name != "digits":
        if name not in DEMOS:
            console.print(f"[red]unknown demo {name!r}[/red]; available: {', '.join(demo_names())}")
            raise typer.Exit(2)
        report = load_demo(name)(out or Path(f"sourcetrace-demo-{name}"))
        if report is not None:
            console.print(f"report written: open [bold]{Path(report).resolve()}[/bold] in a browser")
        return
    out = out or Path("sourcetrace-demo")
    import sourcetrace as st

    from .bench.replay_bench import ReplaySetting

    setting = ReplaySetting(n_query=max(queries, 1))
    with console.status("training a digits MLP (1000 images, 30 epochs of SGD), recording its trajectory"):
        model = setting.run(recorder_dir=out / "trajectory")
    accuracy = float((model(setting.x_query).argmax(1) == setting.y_query).float().mean())
    console.print(f"trained: query accuracy {accuracy:.0%}; attributing by replaying the recorded steps "
                  "(the exact derivative of each query's margin in each training example's weight)")
    attr = st.Attributor(model, st.ClassificationTask(), "replay", workdir=out / "workdir",
                         trajectory=out / "trajectory", overwrite=True)
    scores = attr.fit(setting.train).score((setting.x_query[:queries], setting.y_query[:queries]))
    predicted = model(setting.x_query[:queries]).argmax(1)
    for q in range(queries):
        table = Table(title=f"query {q}: a {int(setting.y_query[q])}, predicted {int(predicted[q])}; "
                            "proponents +, opponents −", show_lines=True)
        table.add_column("query", no_wrap=True)
        for sign in ("+", "−"):
            for j in range(k):
                table.add_column(f"{sign}{j + 1}", no_wrap=True)
        cells = [digit_art(setting.images[setting.n_train + q])]
        for item in scores.top(q, k) + scores.bottom(q, k):
            label = int(setting.y_train[item.index])
            cells.append(f"{digit_art(setting.images[item.index])}\n#{item.train_id}\nlabel {label}\n"
                         f"{item.score:+.3g}")
        table.add_row(*cells)
        console.print(table)
        drop = float(scores.removal_effect([a.train_id for a in scores.top(q, k)])[q])
        console.print(f"without those {k} proponents the margin would change by {drop:+.3g} (first-order "
                      f"prediction; the margin is now {float(setting.measure_fn(model)[q]):.3g})")
    scores.save(out / "scores")
    report = _report(scores, setting, out)
    if report is not None:
        console.print(f"report written: open [bold]{report.resolve()}[/bold] in a browser")


def _report(scores, setting, out: Path) -> Path | None:
    try:
        from .views import write_report
    except ImportError:
        return None
    n = setting.n_train
    train_items = [{"image": setting.images[i].tolist(), "label": str(int(setting.y_train[i]))}
                   for i in range(n)]
    query_items = [{"image": setting.images[n + q].tolist(), "label": str(int(setting.y_query[q]))}
                   for q in range(scores.shape[0])]
    return write_report(scores, out / "report.html", train_items=train_items, query_items=query_items,
                        title="sourcetrace demo: digits MLP, exact replay of its training",
                        groups=[item["label"] for item in train_items])


@app.command()
def bench(name: str = typer.Argument(..., help="benchmark name; see `sourcetrace info`"),
          out: Path = typer.Option(Path("benchmarks"), help="where the .md and .json go"),
          workdir: Path = typer.Option(Path("runs/bench"), help="cache of trained models and ground truth"),
          only: list[str] = typer.Option(None, help="run only these methods or libraries")) -> None:
    """Run a benchmark and write benchmarks/NAME.md and .json."""
    from .bench import BENCHMARKS

    if name not in BENCHMARKS:
        console.print(f"[red]unknown benchmark {name!r}[/red]; available: {', '.join(sorted(BENCHMARKS))}")
        raise typer.Exit(2)
    kwargs = {"only": only} if only else {}
    path = BENCHMARKS[name](out, workdir=workdir / name, **kwargs)
    console.print(f"written: {path}")


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

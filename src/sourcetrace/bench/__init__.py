"""Benchmarks: `sourcetrace bench NAME` writes figures to benchmarks/NAME.md and .json."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from ..errors import InvalidOptionError

# name -> "module:function" (relative to this package, or absolute after "sourcetrace."); a function takes
# the output folder and, where it declares them, `workdir` (its cache) and `only` (methods to run).
BENCHMARKS: dict[str, str] = {
    "corpus-trace": "sourcetrace.corpus.bench:run_benchmark",
    "diffusion-digits": "diffusion_digits:run",
    "diffusion-digits-validity": "diffusion_digits:run_validity",
    "digits-mlp": "digits_mlp:run",
    "ekfac-scaling": "ekfac_scaling:scaling_benchmark",
    "facts-lm": "facts_lm:run",
    "kg-attribution": "kg_attribution:run",
    "kg-attribution-overlap": "kg_attribution:run_overlap",
    "lm-speed": "lm_speed:run",
    "llm-trial": "llm_trial:run",
    "music-attribution": "music_attribution:run",
    "practitioner-tasks": "practitioner_tasks:run",
    "replay": "replay_bench:run",
    "scaling": "scaling:run",
    "source": "source_bench:run",
}


def run_benchmark(name: str, out_dir: Path, workdir: Path, only: list[str] | None = None) -> Path:
    """Run benchmark `name`; the path of the markdown file it wrote."""
    module, function = BENCHMARKS[name].split(":")
    module = module if module.startswith("sourcetrace.") else f"{__name__}.{module}"
    run = getattr(importlib.import_module(module), function)
    accepted = inspect.signature(run).parameters
    kwargs: dict[str, object] = {}
    if "workdir" in accepted:
        kwargs["workdir"] = workdir
    if only:
        if "only" not in accepted:
            raise InvalidOptionError(f"benchmark {name!r} has no --only; it always runs every method")
        kwargs["only"] = only
    result = run(out_dir, **kwargs)
    return result if isinstance(result, Path) else Path(out_dir) / f"{name}.md"

"""Benchmarks: `sourcetrace bench NAME` writes figures to benchmarks/NAME.md and .json."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _digits_mlp(out_dir: Path, **kw: object) -> Path:
    from .digits_mlp import run

    return run(out_dir, **kw)  # type: ignore[arg-type]


def _ekfac_scaling(out_dir: Path, **kw: object) -> Path:
    from .ekfac_scaling import scaling_benchmark

    scaling_benchmark(out_dir)
    return out_dir / "ekfac-scaling.md"


def _source(out_dir: Path, **kw: object) -> Path:
    from .source_bench import run

    kw.pop("only", None)
    return run(out_dir, **kw)  # type: ignore[arg-type]


def _corpus_trace(out_dir: Path, **kw: object) -> Path:
    from ..corpus.bench import run_benchmark

    run_benchmark(out_dir)
    return out_dir / "corpus-trace.md"


def _facts_lm(out_dir: Path, **kw: object) -> Path:
    from .facts_lm import run

    return run(out_dir, **kw)  # type: ignore[arg-type]


def _replay(out_dir: Path, **kw: object) -> Path:
    from .replay_bench import run

    kw.pop("only", None)
    return run(out_dir, **kw)  # type: ignore[arg-type]


def _lm_speed(out_dir: Path, **kw: object) -> Path:
    from .lm_speed import run

    kw.pop("only", None)
    return run(out_dir, **kw)  # type: ignore[arg-type]


BENCHMARKS: dict[str, Callable[..., Path]] = {"replay": _replay, "facts-lm": _facts_lm,
                                              "corpus-trace": _corpus_trace, "digits-mlp": _digits_mlp,
                                              "ekfac-scaling": _ekfac_scaling, "source": _source,
                                              "lm-speed": _lm_speed}

"""Benchmark runner: each method runs in a fresh process, timed and measured, anchors beside it."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import platform
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import atomic_write_bytes, atomic_write_json


@dataclass
class Measured:
    """What one run of a method produced, and what it cost."""

    scores: np.ndarray
    wall_s: float
    peak_mb: float  # peak resident memory of the process during the run, above its level before it


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _child(job: Callable[[], np.ndarray], imports: tuple[str, ...]) -> Measured:
    import importlib

    for name in imports:  # import costs are not the method's
        importlib.import_module(name)
    import torch

    torch.set_num_threads(1)  # the same for every library: small models, and a machine others share
    fresh = _reset_peak()  # the imports' transient peak is not the method's
    before = _rss_mb()
    start = time.perf_counter()
    scores = job()
    wall = time.perf_counter() - start
    peak = _peak_mb() if fresh else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    return Measured(np.asarray(scores, dtype=np.float64), wall, max(0.0, peak - before))


def _reset_peak() -> bool:
    """Reset the process's peak resident set (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _peak_mb() > 0
    except OSError:
        return False


def _peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(job: Callable[[], np.ndarray], imports: tuple[str, ...] = ()) -> Measured:
    """Run `job` (a picklable callable) in a fresh process, after importing `imports` untimed."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_child, job, ("torch", "numpy", "sourcetrace", *imports)).result()


def load_average() -> str:
    """The machine's 1-, 5- and 15-minute load averages, for the record of a benchmark's conditions."""
    import os

    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def versions(*packages: str) -> dict[str, str]:
    found = {"python": platform.python_version(), "machine": f"{platform.machine()} {mp.cpu_count()} cores"}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def write_results(out_dir: Path, name: str, title: str, rows: list[dict[str, Any]], info: dict[str, Any],
                  columns: list[tuple[str, str]], notes: list[str], *, section: str | None = None,
                  headings: dict[str, str] | None = None, summary: list[str] | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write `name.json` and a `name.md` table (never edited by hand).

    `section`: a row key (e.g. "split") whose values split the table into sections, in order of first
    appearance, each under `headings[value]`; `summary`: lines (computed from `rows`) after the info;
    `extra`: further raw measurements for the json only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / f"{name}.json",
                      {"benchmark": name, "info": info, "rows": rows, **(extra or {})})
    lines = [f"# {title}", "", f"Written by `sourcetrace bench {name}`; do not edit by hand.", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    if summary:
        lines += ["", *summary]
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get(section) if section else None, []).append(row)
    for key, group in groups.items():
        if section:
            lines += ["", f"## {(headings or {}).get(key, key)}"]
        lines += ["", *markdown_table(group, columns)]
    lines += [""] + notes
    path = out_dir / f"{name}.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    """A markdown table of `rows`: (key, heading) per column; missing values shown as –."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |" for row in rows]


def bootstrap_ci(values: Any, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one per query), resampled with replacement;
    for a paired comparison pass the per-query differences."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_bootstrap, v.size))].mean(1)
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def with_ci(values: Any, seed: int = 0) -> str:
    """`mean [low, high]` of per-query values, 3 decimals."""
    low, high = bootstrap_ci(values, seed=seed)
    return f"{float(np.mean(values)):.3f} [{low:.3f}, {high:.3f}]"


def code_fingerprint() -> str:
    """A hash of sourcetrace's source files outside bench/: cached benchmark results are reused only for the
    same library code (a benchmark versions its own scoring code itself)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.py") if "bench" not in p.relative_to(root).parts[:1]):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)

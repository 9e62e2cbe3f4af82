"""EK-FAC memory and time against the number of training examples (`sourcetrace bench ekfac-scaling`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _scaling_child(n_train: int, batch_size: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Fit EK-FAC on `n_train` generated examples; peak-memory growth (ru_maxrss) and time of the fit."""
    import resource

    from ..curvature import CurvatureContext, build_curvature
    from ..data import Examples
    from ..grads import GradientCapture
    from ..tasks import ClassificationTask

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=gen) * 2
    y = torch.randint(0, 10, (n_train,), generator=gen)
    x = centers[y] + torch.randn(n_train, 64, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    task = ClassificationTask()
    ctx = CurvatureContext(model=model, task=task, capture=GradientCapture(model), train=Examples((x, y)),
                           batch_size=batch_size, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times, walls = [], []
    for _ in range(repeats):  # CPU time of this one-thread process: other processes do not inflate it
        start, wall = time.process_time(), time.perf_counter()
        build_curvature("ekfac").fit(ctx)
        times.append(time.process_time() - start)
        walls.append(time.perf_counter() - wall)
    seconds = min(times)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n_train": n_train, "fit_seconds": seconds, "wall_seconds": min(walls),
            "peak_growth_mib": (after - before) / 1024,
            "peak_rss_mib": after / 1024, "parameters": sum(p.numel() for p in model.parameters())}


def scaling_benchmark(out_dir: str | Path = "benchmarks", sizes: tuple[int, ...] = (1000, 5000, 20000)
                      ) -> dict[str, Any]:
    """EK-FAC fit memory and time for each training-set size, each in a fresh process; writes
    `ekfac-scaling.md` and `.json` into `out_dir`. Memory must stay flat and time grow linearly."""
    import platform
    import subprocess
    import sys

    rows = []
    for n in sizes:
        code = ("import json; from sourcetrace.bench.ekfac_scaling import _scaling_child; "
                f"print(json.dumps(_scaling_child({int(n)})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for prev, r in zip([None, *rows[:-1]], rows):  # the slope between sizes: constant when time is linear
        r["marginal_seconds_per_1k"] = (None if prev is None else
                                        1000 * (r["fit_seconds"] - prev["fit_seconds"])
                                        / (r["n_train"] - prev["n_train"]))
        r["time_ratio"] = r["fit_seconds"] / base["fit_seconds"]
        r["size_ratio"] = r["n_train"] / base["n_train"]
        r["seconds_per_1k"] = 1000 * r["fit_seconds"] / r["n_train"]
    result = {"benchmark": "ekfac-scaling", "rows": rows, "torch": torch.__version__,
              "machine": platform.machine(), "threads": 1,
              "model": "MLP 64-256-256-10 (85k parameters), 10-class Gaussian clusters, true Fisher, "
                       "batch 64, CPU seconds of the best of 3 fits"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..artifacts import atomic_write_bytes, atomic_write_json

    atomic_write_json(out / "ekfac-scaling.json", result)
    lines = ["# EK-FAC scaling: memory and time against the number of training examples", "",
             f"{result['model']}; each size fitted in a fresh process on one CPU thread (torch "
             f"{result['torch']}). Peak growth = ru_maxrss after the fit minus before it: what the fit "
             "added to the process's peak memory. Nothing here is tuned: the sizes are the only setting. "
             "Written by `sourcetrace.bench.ekfac_scaling.scaling_benchmark`.",
             "", "| examples | fit CPU time (s) | s per 1k examples | marginal s per 1k | time ratio | "
             "peak growth (MiB) |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        slope = r["marginal_seconds_per_1k"]
        lines.append(f"| {r['n_train']} | {r['fit_seconds']:.2f} | {r['seconds_per_1k']:.3f} | "
                     f"{'–' if slope is None else f'{slope:.3f}'} | "
                     f"{r['time_ratio']:.1f}× for {r['size_ratio']:.0f}× data | {r['peak_growth_mib']:.1f} |")
    atomic_write_bytes(out / "ekfac-scaling.md", ("\n".join(lines) + "\n").encode())
    return result

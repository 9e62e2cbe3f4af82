"""Scale: fit time and peak memory from 10^3 to 10^6 training examples, top-10 query latency with exact
streaming and with FAISS (and FAISS's recall@10), and 1 against 2 processes (`sourcetrace bench scaling`).

The model is a small MLP (32-64-10, 2.8k parameters) on generated 10-class data, grad-dot on randomly
projected gradients (proj_dim 64) stored in float16. The data are generated per example from its index, so
they take no memory; each size runs in a fresh process (so ru_maxrss is that size's own peak).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..grads.index import IVF_THRESHOLD

SIZES = (1_000, 10_000, 100_000, 1_000_000)
DIM, CLASSES, PROJ, BATCH, BLOCK = 32, 10, 64, 1024, 4096
BASE_N = 10_000  # time and memory per example are compared from this size up
LINEAR_SPREAD = 1.25  # time counts as linear when the CPU time per example varies less than this factor
FLAT_SHARE = 0.1  # memory counts as flat when the fit's peak grows by less than this share of the store
RECALL_TARGET = 0.9  # IVF-PQ's search settings are tuned to reach this recall@10 on the tuning queries
N_QUERY = 20  # reporting queries: fresh examples (another seed), never used to choose anything
OPTIONS = {"features": "random", "proj_dim": PROJ, "store_dtype": "float16", "batch_size": BATCH}


class GeneratedData(torch.utils.data.Dataset):
    """Example i = (x, y): y = i mod 10 shuffled by a seeded hash, x = its class centre + noise; computed
    from i in blocks of BLOCK examples (one block cached), so a million examples cost no memory."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1234)) * 2
        self._block: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = i // BLOCK
        if self._block is None or self._block[0] != b:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            y = torch.randint(0, CLASSES, (BLOCK,), generator=gen)
            self._block = (b, self.centres[y] + torch.randn(BLOCK, DIM, generator=gen), y)
        _, x, y = self._block
        return x[i % BLOCK], y[i % BLOCK]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def _size_child(n: int, workdir: str, faiss_queries: bool = True) -> dict[str, Any]:
    """One size in this (fresh) process: fit, exact and FAISS top-10 queries, peak memory."""
    import resource

    import sourcetrace as st
    from sourcetrace.grads.index import index_attributor

    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    model, task = make_model(), st.ClassificationTask()
    train, queries = GeneratedData(n, seed=0), GeneratedData(N_QUERY, seed=1)
    query_list = [queries[i] for i in range(N_QUERY)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    attr = st.Attributor(model, task, "grad-dot", Path(workdir) / f"n{n}", progress=False, overwrite=True,
                         **OPTIONS)
    cpu, wall = time.process_time(), time.perf_counter()
    attr.fit(train)
    fit_cpu, fit_wall = time.process_time() - cpu, time.perf_counter() - wall
    after_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row: dict[str, Any] = {"n_train": n, "fit_cpu_s": fit_cpu, "fit_wall_s": fit_wall,
                           "rss_before_mib": before, "peak_rss_fit_mib": after_fit,
                           "store_mib": cast(Any, attr.method).stores[0].nbytes / 2**20}

    def timed(fn: Any, repeats: int = 3) -> tuple[Any, float]:
        best, out = math.inf, None
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return out, best

    exact, row["exact_top10_1q_s"] = timed(lambda: attr.score(query_list[:1], top_k=10))
    exact, row["exact_top10_20q_s"] = timed(lambda: attr.score(query_list, top_k=10), repeats=1)
    row["peak_rss_score_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if faiss_queries:
        for kind in ("flat", "ivfflat", "ivfpq") if n >= 10_000 else ("flat",):
            start = time.perf_counter()
            index = index_attributor(attr, kind=kind, progress=False, folder=Path(workdir) / f"n{n}-{kind}")
            row[f"{kind}_build_s"] = time.perf_counter() - start
            got, row[f"{kind}_top10_1q_s"] = timed(lambda index=index: index.score(query_list[:1], k=10))
            got, _ = timed(lambda index=index: index.score(query_list, k=10), repeats=1)
            assert got.top_indices is not None and exact.top_indices is not None
            pairs = zip(got.top_indices.tolist(), exact.top_indices.tolist())
            row[f"{kind}_recall10"] = sum(len(set(a) & set(b)) for a, b in pairs) / exact.top_indices.numel()
            if kind == "ivfpq":
                row["ivfpq_nlist"], row["ivfpq_nprobe"] = index.index.nlist, index.index.nprobe
                row.update(_tune_ivfpq(attr, index, query_list, exact, timed))
            del index, got  # one index in memory at a time
            row[f"{kind}_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _recall(got: Any, exact: Any) -> float:
    pairs = zip(got.top_indices.tolist(), exact.top_indices.tolist())
    return sum(len(set(a) & set(b)) for a, b in pairs) / exact.top_indices.numel()


def _tune_ivfpq(attr: Any, index: Any, query_list: list[Any], exact: Any, timed: Any) -> dict[str, Any]:
    """Choose IVF-PQ's search settings (nprobe, candidates rescored) on the tuning queries (seed 2): the
    fastest with tuning recall@10 ≥ RECALL_TARGET, else the best recall; then report on the reporting
    queries (seed 1) with it."""
    tuning = [GeneratedData(N_QUERY, seed=2)[i] for i in range(N_QUERY)]
    exact_tuning = attr.score(tuning, top_k=10)
    nlist, grid = index.index.nlist, []
    for nprobe in sorted({max(1, nlist // d) for d in (16, 8, 4, 2)}):
        for rerank in (10, 40):
            index.index.index.nprobe, index.index.rerank = nprobe, rerank
            got, seconds = timed(lambda: index.score(tuning, k=10), repeats=1)
            grid.append({"nprobe": nprobe, "rerank": rerank, "tuning_recall10": _recall(got, exact_tuning),
                         "tuning_s_per_query": seconds / N_QUERY})
    good = [g for g in grid if g["tuning_recall10"] >= RECALL_TARGET]
    best = (min(good, key=lambda g: g["tuning_s_per_query"]) if good
            else max(grid, key=lambda g: g["tuning_recall10"]))
    index.index.index.nprobe, index.index.rerank = best["nprobe"], best["rerank"]
    got, seconds = timed(lambda: index.score(query_list[:1], k=10))
    every, _ = timed(lambda: index.score(query_list, k=10), repeats=1)
    return {"ivfpq_tuning": grid, "ivfpq_tuned_nprobe": best["nprobe"], "ivfpq_tuned_rerank": best["rerank"],
            "ivfpq_tuned_top10_1q_s": seconds, "ivfpq_tuned_recall10": _recall(every, exact)}


def _rank(rank: int, world: int, port: int, n: int, workdir: str, out: str) -> None:
    """One rank of the speed-up run: fit on its slice, timed between barriers."""
    import sourcetrace as st

    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)
    attr = st.Attributor(make_model(), st.ClassificationTask(), "grad-dot", Path(workdir) / f"w{world}",
                         progress=False, overwrite=True, **OPTIONS)
    if world > 1:
        torch.distributed.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    attr.fit(GeneratedData(n))
    top = attr.score([GeneratedData(N_QUERY, seed=1)[i] for i in range(N_QUERY)], top_k=10)
    if world > 1:
        torch.distributed.barrier()
    took = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "top_indices": top.top_indices.tolist() if top.top_indices is not None else None}
    if rank == 0:
        Path(out).write_text(json.dumps(took))
    if world > 1:
        torch.distributed.destroy_process_group()


def _speedup(n: int, workdir: Path) -> dict[str, Any]:
    import socket

    out: dict[str, Any] = {"n_train": n}
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        path = workdir / f"speedup-{world}.json"
        code = (f"import torch, sourcetrace.bench.scaling as b; torch.multiprocessing.spawn(b._rank, "
                f"args=({world}, {port}, {n}, {str(workdir)!r}, {str(path)!r}), nprocs={world})")
        subprocess.run([sys.executable, "-c", code], check=True, env=_env())
        out[f"p{world}"] = json.loads(path.read_text())
    out["same_top10"] = out["p1"]["top_indices"] == out["p2"]["top_indices"]
    for world in (1, 2):
        out[f"p{world}"].pop("top_indices")
    out["speedup"] = out["p1"]["wall_s"] / out["p2"]["wall_s"]
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(out_dir: Path = Path("benchmarks"), workdir: Path = Path("runs/bench/scaling"),
        sizes: tuple[int, ...] = SIZES, speedup_n: int = 100_000) -> Path:
    """Every size in a fresh process, then the 1-vs-2-process fit; writes scaling.md and .json."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        code = ("import json; from sourcetrace.bench.scaling import _size_child; "
                f"print('ROW', json.dumps(_size_child({int(n)}, {str(workdir)!r})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
        if done.returncode:
            raise RuntimeError(f"size {n} failed:\n{done.stderr[-3000:]}")
        line = next(x for x in done.stdout.splitlines() if x.startswith("ROW "))
        rows.append(json.loads(line[4:]))
    speed = _speedup(speedup_n, workdir) if speedup_n else None
    result = {"benchmark": "scaling", "rows": rows, "speedup": speed, "torch": torch.__version__,
              "machine": platform.machine(), "cpus": os.cpu_count(), "threads": 1,
              "model": "MLP 32-64-10 (2,762 parameters), generated 10-class data, grad-dot on gradients "
                       f"randomly projected to {PROJ} dimensions, float16 store, batch {BATCH}",
              "split": "the sizes, proj_dim and IVF-PQ's build (nlist=√n, one byte per 8 dimensions) were "
                       f"fixed before the run; IVF-PQ's search settings are reported twice: at the library "
                       f"defaults (nprobe=nlist/16, 10×k candidates rescored) and at the setting chosen per "
                       f"size on {N_QUERY} tuning queries (generated, seed 2) as the fastest reaching "
                       f"recall@10 {RECALL_TARGET} there; every reported figure is measured on {N_QUERY} "
                       "other reporting queries (generated, seed 1)"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..artifacts import atomic_write_bytes, atomic_write_json

    atomic_write_json(out / "scaling.json", result)
    atomic_write_bytes(out / "scaling.md", render(result).encode())
    return out / "scaling.md"


def render(result: dict[str, Any]) -> str:
    """The markdown page; every figure and comparison in it is computed from `result`."""
    rows = result["rows"]
    first, last = rows[0], rows[-1]
    lines = ["# Scaling: fit, memory, top-10 queries, processes", "",
             f"{result['model']}. Each size runs in a fresh process on one thread ({result['cpus']} CPUs "
             f"on a machine shared with other jobs, torch {result['torch']}). Fit CPU time is this process's "
             "CPU seconds (other jobs do not inflate it); latencies are wall seconds, best of 3 for one "
             "query. Peak RSS is ru_maxrss (MiB); it includes Python, torch and FAISS.", "",
             f"Tuning and reporting: {result['split']}.", "",
             "## Fit time and peak memory", "",
             "| examples | fit CPU s | fit wall s | CPU µs per example | store MiB | RSS before fit | "
             "peak RSS after fit | after exact queries | after flat index | after IVF-Flat | "
             "after IVF-PQ |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peaks = " | ".join(f"{r[k]:.0f}" if k in r else "–" for k in
                           ("peak_rss_score_mib", "flat_peak_rss_mib", "ivfflat_peak_rss_mib",
                            "ivfpq_peak_rss_mib"))
        lines.append(f"| {r['n_train']:,} | {r['fit_cpu_s']:.1f} | {r['fit_wall_s']:.1f} | "
                     f"{1e6 * r['fit_cpu_s'] / r['n_train']:.1f} | {r['store_mib']:.1f} | "
                     f"{r['rss_before_mib']:.0f} | {r['peak_rss_fit_mib']:.0f} | {peaks} |")
    per = [r["fit_cpu_s"] / r["n_train"] for r in rows]
    big = [p for r, p in zip(rows, per) if r["n_train"] >= BASE_N] or per
    spread = max(big) / min(big)
    ratio = last["n_train"] / first["n_train"]
    # memory from the same base as time: below it a store shard and the batches are not yet full-size
    base = next((r for r in rows if r["n_train"] >= BASE_N), first)
    growth = last["peak_rss_fit_mib"] - base["peak_rss_fit_mib"]
    stored = last["store_mib"] - base["store_mib"]
    flat = (f"flat (under {FLAT_SHARE} × the store's growth)" if growth < FLAT_SHARE * stored
            else f"not flat (at least {FLAT_SHARE} × the store's growth)")
    lines += ["", f"Time: CPU seconds per example vary by a factor {spread:.2f} across the sizes from "
              f"{BASE_N:,} up ({'' if spread <= LINEAR_SPREAD else 'not '}linear within a factor "
              f"{LINEAR_SPREAD}); from "
              f"{first['n_train']:,} to {last['n_train']:,} examples ({ratio:,.0f}× the data) the fit took "
              f"{last['fit_cpu_s'] / first['fit_cpu_s']:.0f}× the CPU time.",
              f"Memory: from {base['n_train']:,} to {last['n_train']:,} examples "
              f"({last['n_train'] / base['n_train']:,.0f}× the data) the peak RSS of the fit grew by "
              f"{growth:.1f} MiB, "
              f"{1024 * 1024 * growth / max(1, last['n_train'] - base['n_train']):.1f} bytes per added "
              f"example, while the store on disk grew by {stored:.0f} MiB: "
              f"{flat}. The rows and their squared norms stay on disk and are mapped one shard at a time; "
              "ids that are positions are kept as a range. The peak columns after the fit are running "
              "maxima (ru_maxrss) after each step; one index is in memory at a time. A flat or IVF-Flat "
              "index holds every row as float32 in RAM (4 × dim bytes a row), IVF-PQ one byte per 8 "
              "dimensions; FAISS also keeps an 8-byte id per row.", "",
              "## Top-10 queries: exact streaming against FAISS", "",
              "| examples | exact 1 query s | exact 20 queries s | FAISS flat build s | flat 1 query s | "
              "flat recall@10 | IVF-Flat build s | IVF-Flat 1 query s | IVF-Flat recall@10 | "
              "IVF-PQ build s | IVF-PQ 1 query s | IVF-PQ recall@10 | tuned nprobe, rerank | "
              "tuned 1 query s | tuned recall@10 |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def f(key: str, fmt: str = ".3f", r: dict[str, Any] = r) -> str:
            return format(r[key], fmt) if key in r else "–"

        lines.append(f"| {r['n_train']:,} | {f('exact_top10_1q_s')} | {f('exact_top10_20q_s')} | "
                     f"{f('flat_build_s', '.2f')} | {f('flat_top10_1q_s')} | {f('flat_recall10', '.3f')} | "
                     f"{f('ivfflat_build_s', '.2f')} | {f('ivfflat_top10_1q_s')} | "
                     f"{f('ivfflat_recall10', '.3f')} | "
                     f"{f('ivfpq_build_s', '.2f')} | {f('ivfpq_top10_1q_s')} | "
                     f"{f('ivfpq_recall10', '.3f')} | "
                     + (f"{r['ivfpq_tuned_nprobe']}, {r['ivfpq_tuned_rerank']} | "
                        if "ivfpq_tuned_nprobe" in r else "– | ")
                     + f"{f('ivfpq_tuned_top10_1q_s')} | {f('ivfpq_tuned_recall10', '.3f')} |")
    if "ivfpq_recall10" in last:
        lines += ["", f"At {last['n_train']:,} examples one top-10 query took "
                  f"{last['exact_top10_1q_s']:.3f} s by exact streaming, {last['flat_top10_1q_s']:.3f} s "
                  "with the flat FAISS index "
                  f"(recall@10 {last['flat_recall10']:.3f}) and {last['ivfpq_top10_1q_s']:.3f} s with IVF-PQ "
                  f"at its defaults (nlist {last['ivfpq_nlist']}, nprobe {last['ivfpq_nprobe']}; recall@10 "
                  f"{last['ivfpq_recall10']:.3f} against exact). With the search setting chosen on the "
                  f"tuning queries (nprobe {last['ivfpq_tuned_nprobe']}, "
                  f"{last['ivfpq_tuned_rerank']}×k candidates "
                  f"rescored) one query took {last['ivfpq_tuned_top10_1q_s']:.3f} s at recall@10 "
                  f"{last['ivfpq_tuned_recall10']:.3f} on the reporting queries. IVF-Flat (the default from "
                  f"{IVF_THRESHOLD:,} rows; nprobe = nlist / 16, nothing tuned) took "
                  f"{last['ivfflat_top10_1q_s']:.3f} s at recall@10 {last['ivfflat_recall10']:.3f}, "
                  f"{last['flat_top10_1q_s'] / last['ivfflat_top10_1q_s']:.2f}× faster than flat. Each "
                  "latency "
                  "includes the "
                  "query's own "
                  "gradient. Flat recall below 1 can only come from float32 ties against the exact float "
                  "scores."]
    s = result.get("speedup")
    if s:
        lines += ["", "## One process against two (gloo, this machine)", "",
                  f"Fit and score of {s['n_train']:,} examples (20 top-10 queries): one process "
                  f"{s['p1']['wall_s']:.1f} s wall, two processes {s['p2']['wall_s']:.1f} s wall, a "
                  f"speed-up of {s['speedup']:.2f}×; rank 0 used {s['p1']['cpu_s']:.1f} and "
                  f"{s['p2']['cpu_s']:.1f} CPU s. The two runs' top-10 are "
                  f"{'identical' if s['same_top10'] else 'NOT identical'}. The "
                  f"machine has {result['cpus']} cores shared with other jobs, so the speed-up is a lower "
                  "bound of what two free cores give."]
    lines += ["", "NCCL (GPU) is untested here: no GPU was available to this run.", "",
              "Written by `sourcetrace bench scaling` (`sourcetrace.bench.scaling`)."]
    return "\n".join(lines) + "\n"

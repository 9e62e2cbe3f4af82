"""Benchmark figures are measured, not typed: README figures are in the committed benchmark json, and the
generators write no hand-typed result into the prose of benchmarks/*.md."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from sourcetrace.bench import replay_bench

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?!\.\d)")  # not part of an address
# what a measured figure looks like in prose: 2+ decimals, an approximation or bound, a time in ms, a percent
MEASURED = re.compile(r"\b\d+\.\d{2,}\b|[~≈≥≤]\s*\d|\d\s?ms\b|\d+(\.\d+)? ?%")
CONFIDENCE = re.compile(r"95 % (CI|bootstrap|percentile)")  # the confidence level: a parameter


def _numbers(obj: object, out: set[str]) -> set[str]:
    """Every number in a json value, as printed with 1 to 3 decimals or 3 significant digits; numbers
    inside strings as written."""
    if isinstance(obj, dict):
        for v in obj.values():
            _numbers(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _numbers(v, out)
    elif isinstance(obj, str):
        out.update(m.lstrip("+-") for m in NUMBER.findall(obj))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        for fmt in (".1f", ".2f", ".3f", ".3g", "+.1f", "+.3f"):
            out.add(format(obj, fmt).lstrip("+-"))  # README figures are compared without their sign
    return out


def _blocks(text: str) -> list[str]:
    """Paragraphs and list items of a markdown text, code blocks left out."""
    blocks: list[str] = []
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)  # inline code: option values, not figures
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("- ", "* ", "#", "|")) or not blocks:
            blocks.append(line)
        else:
            blocks[-1] += " " + line.strip()
    return blocks


def test_readme_figures_are_in_the_committed_benchmark_files():
    readme = (ROOT / "README.md").read_text()
    checked = 0
    for block in _blocks(readme):
        names = set(re.findall(r"benchmarks/([a-z0-9-]+)\.(?:md|json)", block))
        if not names:
            assert not NUMBER.findall(block), f"README figures without their benchmark file: {block}"
            continue
        known: set[str] = set()
        for name in names:
            path = ROOT / "benchmarks" / f"{name}.json"
            assert path.exists(), f"README cites benchmarks/{name}, which has no json"
            _numbers(json.loads(path.read_text()), known)
        for figure in NUMBER.findall(block):
            checked += 1
            assert figure.lstrip("+-") in known, f"README figure {figure} is in no cited benchmark: {block}"
    assert checked >= 5  # the README does quote benchmark figures


def _prose_constants(path: Path) -> list[tuple[int, str]]:
    """String literals (f-string text included, docstrings excluded) of a module."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}
    specs = {id(part) for node in ast.walk(tree) if isinstance(node, ast.FormattedValue) and node.format_spec
             for part in ast.walk(node.format_spec)}  # f"{x:.1%}": a format, not a figure
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docs | specs]


def test_generators_type_no_measured_figure():
    found = []
    for path in sorted((ROOT / "src" / "sourcetrace" / "bench").glob("*.py")):
        for line, text in _prose_constants(path):
            if MEASURED.search(CONFIDENCE.sub("", text)):
                found.append(f"{path.name}:{line}: {text[:80]!r}")
    assert not found, "hand-typed figures in benchmark prose:\n" + "\n".join(found)


def test_the_scan_would_catch_the_old_sentences():
    for old in ("replay ≥ 0.985 under SGD", "checkpoints are only ~17 ms of training apart", "+2 to +7 %"):
        assert MEASURED.search(old)


def _row(setting: str, method: str, small: float, scale: float, r2: float, split: str = "tuning") -> dict:
    return {"split": split, "setting": setting, "method": method, "lds_random_mean": small - 0.1,
            "lds_recorded_mean": small,
            "lds_small_mean": small, "scale_small": scale, "scale_half": scale + 0.2, "r2_small": r2,
            "r2_half": r2 - 0.1}


@pytest.mark.parametrize("shift", [0.0, 0.013])
def test_replay_findings_follow_the_rows(shift):
    rows = [_row("digits-mlp", "replay", 0.9 + shift, 1.0 + shift, 0.99),
            _row("digits-mlp", "grad-dot", 0.5, 0.001, 0.2),
            _row("adamw", "replay", 0.7, 1.3, 0.8), _row("adamw", "source", 0.8 + shift, 0.002, 0.5),
            _row("adamw", "replay", 0.6 + shift, 1.1, 0.7, split="reporting")]
    text = "\n".join(replay_bench.findings(rows))
    assert ("Reporting split, best at predicting the recorded run with 5 % of the data weighted 0: adamw: "
            f"replay ({0.6 + shift:.3f})") in text
    assert f"digits-mlp: replay ({0.9 + shift:.3f})" in text and f"adamw: source ({0.8 + shift:.3f})" in text
    assert f"removal scale {1.0 + shift:.3g} with 5 % out (R² ≥ 0.99)" in text
    assert "under AdamW (1 setting): LDS with 5 % out 0.700, removal scale 1.3" in text

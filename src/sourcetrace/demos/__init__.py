"""What `sourcetrace demo NAME` runs: each demo builds its small model and data and writes a report.

A demo is a function `(out: Path) -> Path | None` (the report it wrote), registered in DEMOS by name.
The digits demo (`digits.py`, the default) takes more options and is called by the CLI directly; the
others are imported only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

# name -> "module:function", relative to this package
DEMOS: dict[str, str] = {
    "diffusion": "diffusion:run",
    "kg": "kg:run",
    "llm": "llm:run",
    "music": "music:run",
}


def demo_names() -> list[str]:
    return ["digits", *sorted(DEMOS)]


def load_demo(name: str) -> Callable[[Path], Path | None]:
    module, function = DEMOS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)

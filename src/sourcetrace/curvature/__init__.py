"""Curvature approximations used as preconditioners by influence functions."""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import InvalidOptionError
from .base import CURVATURES, Curvature, CurvatureContext, register_curvature


def build_curvature(name: str, **options: Any) -> Curvature:
    """The curvature called `name` (explicit, cg, lissa, arnoldi, kfac, ekfac, diagonal)."""
    _load_builtins()
    if name not in CURVATURES:
        close = difflib.get_close_matches(name, CURVATURES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidOptionError(f"no curvature {name!r}{hint}; available: {', '.join(sorted(CURVATURES))}")
    try:
        return CURVATURES[name](**options)
    except TypeError as exc:
        raise InvalidOptionError(f"curvature {name!r}: {exc}") from exc


def _load_builtins() -> None:
    """Import every module of this package once: each registers its curvatures."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["CURVATURES", "Curvature", "CurvatureContext", "build_curvature", "register_curvature"]

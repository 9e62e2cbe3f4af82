"""Preconditioners: fitted on the training stream at a checkpoint, applied to feature rows."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import InvalidOptionError, did_you_mean
from .base import CURVATURES, CurvatureContext, Preconditioner, register_curvature


def build_curvature(name: str, features: str = "identity", **options: Any) -> Preconditioner:
    """The preconditioner called `name` for features of kind `features`; unknown names, unknown options and
    pairings it does not support are errors (raised before any pass over the data)."""
    _load_builtins()
    if name not in CURVATURES:
        raise InvalidOptionError(f"no curvature {name!r}{did_you_mean(name, CURVATURES)}; available: "
                                 f"{', '.join(sorted(CURVATURES))}")
    cls = CURVATURES[name]
    if features not in cls.FEATURES:  # type: ignore[attr-defined]
        raise InvalidOptionError(f"curvature {name!r} does not work on features={features!r}; it takes "
                                 f"features {', '.join(map(repr, cls.FEATURES))}")  # type: ignore[attr-defined]
    accepted = _accepted(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InvalidOptionError(f"curvature {name!r} has no option {unknown[0]!r}"
                                 f"{did_you_mean(unknown[0], accepted)}; its options are: "
                                 f"{', '.join(sorted(accepted)) or 'none'}")
    return cls(**options)


def _accepted(cls: Any) -> set[str]:
    """Keyword arguments of the class's constructor, following **kwargs up the class chain."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params
                  if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return names


def _load_builtins() -> None:
    """Import every module of this package once: each registers its curvatures."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["CURVATURES", "CurvatureContext", "Preconditioner", "build_curvature", "register_curvature"]

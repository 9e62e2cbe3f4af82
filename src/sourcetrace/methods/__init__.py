"""The method registry: a name ("grad-dot", "trak", ...) is a class plus a composition of parts.

`register("trak", GradientMethod, features="random", curvature="gauss-newton", combination="ensemble")`
makes `method="trak"` those defaults; options named in `fixed` cannot be changed under that name
(`method="kfac", curvature="ekfac"` is refused: use `method="influence"`), the others compose freely
(`method="trak", curvature="cg"`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidOptionError, UnknownMethodError, did_you_mean
from .base import Context, Method


@dataclass(frozen=True)
class Entry:
    cls: type[Method]
    defaults: dict[str, Any] = field(default_factory=dict)
    fixed: tuple[str, ...] = ()


REGISTRY: dict[str, Entry] = {}
GRAMS = ("gauss-newton", "covariance")  # one damping scale: a composition's factor carries over


def register(name: str, cls: type[Method], fixed: tuple[str, ...] = (), **defaults: Any) -> None:
    """Make `method=name` build `cls` with these default options (those in `fixed` cannot be overridden)."""
    REGISTRY[name] = Entry(cls, defaults, fixed)


def available_methods() -> list[str]:
    """Names accepted by `Attributor(method=...)`."""
    _load_builtins()
    return sorted(REGISTRY)


def build(name: str, options: dict[str, Any]) -> Method:
    """The method called `name`, with its options validated (before any pass over data)."""
    _load_builtins()
    if name not in REGISTRY:
        hint = did_you_mean(name, REGISTRY, "; did you mean {!r}?") or "."
        raise UnknownMethodError(f"unknown method {name!r}{hint} Available: {', '.join(available_methods())}")
    entry = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(entry.cls.Options)}
    unknown = sorted(set(options) - fields)
    if unknown:
        hint = did_you_mean(unknown[0], fields)
        raise InvalidOptionError(f"method {name!r} has no option {', '.join(map(repr, unknown))}{hint}; "
                                 f"its options are: {', '.join(sorted(fields))}")
    for key in entry.fixed:
        if key in options and options[key] != entry.defaults[key]:
            raise InvalidOptionError(f"method {name!r} is {key}={entry.defaults[key]!r}; to choose "
                                     f"{key}={options[key]!r} use method='influence' (or another method "
                                     "that leaves it open)")
    defaults = dict(entry.defaults)
    chosen = options.get("curvature", defaults.get("curvature"))
    if chosen != defaults.get("curvature") and {chosen, defaults.get("curvature")} - set(GRAMS):
        defaults.pop("damping_factor", None)  # a composition's damping factor is for its own curvature
    method = entry.cls(name, entry.cls.Options(**{**defaults, **options}))
    check = getattr(method, "check_given", None)
    if check is not None:
        check(set(options))
    return method


def _load_builtins() -> None:
    """Import every module of this package once: each registers its methods."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "parts"):
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["Context", "Entry", "Method", "REGISTRY", "available_methods", "build", "register"]

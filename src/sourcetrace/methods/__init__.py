"""The method registry: names ("grad-dot", "tracin", ...) mapped to the classes that build them."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from ..errors import InvalidOptionError, UnknownMethodError
from .base import Context, Method

REGISTRY: dict[str, type[Method]] = {}


def register(*names: str):
    """Class decorator: make a Method available under these names."""

    def wrap(cls: type[Method]) -> type[Method]:
        for name in names:
            REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    """Names accepted by `Attributor(method=...)`."""
    _load_builtins()
    return sorted(REGISTRY)


def build(name: str, options: dict[str, Any]) -> Method:
    """The method called `name`, with its options validated."""
    _load_builtins()
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise UnknownMethodError(f"unknown method {name!r}{hint} Available: {', '.join(available_methods())}")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise InvalidOptionError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
                                 f"its options are: {', '.join(sorted(fields))}")
    return cls(name, cls.Options(**options))


def _load_builtins() -> None:
    """Import every module of this package once: each registers its methods."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["Context", "Method", "REGISTRY", "available_methods", "build", "register"]

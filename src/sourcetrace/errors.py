"""Errors a user can cause. Each message says what went wrong and what to do next."""

from __future__ import annotations

from collections.abc import Iterable


class SourcetraceError(Exception):
    """Base class of every error sourcetrace raises on purpose."""


class EmptyDataError(SourcetraceError, ValueError):
    """A dataset, corpus or query set with nothing in it."""


class ShapeError(SourcetraceError, ValueError):
    """Inputs whose shapes do not fit the model, the task or each other."""


class NonFiniteError(SourcetraceError, FloatingPointError):
    """A loss, measurement or gradient that is NaN or infinite."""


class UnsupportedModuleError(SourcetraceError, TypeError):
    """A module with parameters that no gradient capture handles."""


class UnknownMethodError(SourcetraceError, KeyError):
    """A method name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidOptionError(SourcetraceError, ValueError):
    """A method option that does not exist or has a value it cannot take."""


class MissingExtraError(SourcetraceError, ImportError):
    """An optional dependency that is not installed."""


class WorkdirMismatchError(SourcetraceError):
    """A workdir made for another method, other arguments, another model or other data."""


class ScoresError(SourcetraceError, ValueError):
    """An operation that these scores cannot answer."""


class CorpusError(SourcetraceError, ValueError):
    """A corpus or index that cannot be built or traced."""


def require(module: str, extra: str):
    """Import an optional dependency or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module} is needed for this; install it with `pip install 'sourcetrace[{extra}]'`"
        ) from exc


def did_you_mean(word: str, choices: Iterable[str], template: str = " (did you mean {!r}?)") -> str:
    """A suggestion of the closest of `choices` to a mistyped `word`, formatted by `template` ("" if none)."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return template.format(close[0]) if close else ""

"""Atomic writes and manifests: every artifact sourcetrace leaves on disk goes through here.

A file is written under a temporary name in the same folder and renamed into place, so a run killed
mid-way never leaves a half-written artifact behind. A manifest (JSON) records what made a folder of
artifacts; reusing the folder for something else is refused, never silently accepted.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import WorkdirMismatchError

MANIFEST = "manifest.json"
_SERIAL = itertools.count()


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside `path`: renamed to `path` when the block completes, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.{next(_SERIAL)}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)`, make it durable and rename the result to `path` once it is complete."""
    path = Path(path)
    with _replacing(path) as tmp:
        write(str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """`atomic_write` for data already in memory: one exclusive create, write, fsync and rename."""
    path = Path(path)
    with _replacing(path) as tmp, open(tmp, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def check_manifest(folder: str | os.PathLike, expected: dict[str, Any], *, overwrite: bool = False,
                   what: str = "workdir") -> bool:
    """Make `folder` hold artifacts described by `expected`.

    Returns True when the folder already holds a manifest equal to `expected` (its artifacts may be
    reused or resumed), False when the folder is new (the manifest is written now). A folder made for
    anything else raises `WorkdirMismatchError`, unless `overwrite` is set, which empties it first, or the
    folder holds no artifact yet (nothing would be reused).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    expected = json.loads(json.dumps(expected, sort_keys=True, default=str))
    if path.exists():
        found = read_json(path)
        if found == expected:
            return True
        # a folder holding nothing but manifests (a run that failed before computing anything) is replaced
        if not overwrite and _holds_artifacts(folder):
            details = "; ".join(_differences(found, expected)[:4])
            raise WorkdirMismatchError(
                f"{what} {folder} was made with other settings ({details}); "
                "use a new workdir or pass overwrite=True to replace it"
            )
        _empty(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, expected)
    return False


def _differences(found: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: was A, now B` for each differing entry; nested dicts (method options) name the inner key."""
    out = []
    for k in sorted(set(found) | set(expected)):
        a, b = found.get(k), expected.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}: was {a!r}, now {b!r}")
    return out


def _holds_artifacts(folder: Path) -> bool:
    """Whether anything but manifests (and temporary files of a killed write) lies under `folder`."""
    return any(p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp") for p in folder.rglob("*"))


def _empty(folder: Path) -> None:
    import shutil

    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def save_tensors(path: str | os.PathLike, tensors: dict[str, Any], key: Any) -> None:
    """Write tensors (safetensors, atomically) with the JSON `key` of what they were computed from."""
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"key": json.dumps(key, sort_keys=True, default=str)}
    atomic_write(path, lambda tmp: save_file(data, tmp, metadata=meta))


def load_tensors(path: str | os.PathLike | None, key: Any) -> dict[str, Any] | None:
    """The tensors saved at `path` for this `key`; None when absent or computed from something else."""
    if path is None or not Path(path).exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        if fh.metadata().get("key") != json.dumps(key, sort_keys=True, default=str):
            return None
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)

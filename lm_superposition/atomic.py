"""Write a file or a folder so that it is either complete or absent, never half-written.

Everything a run leaves on disk (tables, plots, manifest, checkpoints, SAEs) goes through
here: it is written under a temporary name beside its destination and renamed into place,
so a run killed at any moment leaves each file as it was before or as it is after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL_MARKERS = (".partial-", ".old-")


def is_partial(name: str) -> bool:
    """True for the name of a temporary this module makes (a hidden name with .partial- or .old-):
    what a run killed mid-write leaves beside its files, never part of a result."""
    return name.startswith(".") and any(marker in name for marker in PARTIAL_MARKERS)


def _commit(temporary: Path, final: Path) -> None:
    """The one rename that makes a write visible (tests inject faults here)."""
    os.replace(temporary, final)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        yield temporary
        _commit(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(text)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces the folder `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield temporary
        if not path.exists():
            _commit(temporary, path)
            return
        # A rename cannot replace a folder: the old copy is moved aside, and back if the commit fails.
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        try:
            _commit(temporary, path)
        except BaseException:
            os.replace(old / path.name, path)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)

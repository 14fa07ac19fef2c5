"""Where a command writes what a user names (``export.py``'s target, ``neighbors.py --out``):
checked before the work, each mistake one line naming the path and the fix."""

from __future__ import annotations

import tempfile
from pathlib import Path

from latentmap.errors import ConfigError


def unwritable(folder: Path) -> str | None:
    """Make ``folder`` (and its parents) and write a file in it: why that failed, or None. A probe,
    not ``os.access``, which says yes to root and on ``/proc``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".latentmap-probe-"):
            pass
    except OSError as error:
        return str(error.strerror or error)
    return None


def cannot_make(folder: Path) -> str | None:
    """Why ``folder`` could not be made and written here, or None, making nothing: the nearest part
    of its path that exists must be a folder a file can be written in (a probe file, made and
    removed at once). For a check before any work, which must leave nothing behind when the run is
    then refused for another reason."""
    import os

    path = Path(os.path.abspath(os.path.expanduser(str(folder))))  # '..' resolved as the system will
    existing = None
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            return f"{existing} is not a folder"
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".latentmap-probe-"):
            pass
    except OSError as error:  # a parent this user may not search, or write in
        return f"{existing} is not writable: {error.strerror or error}" if existing else error.strerror or str(error)
    return None


def _writable_folder(folder: Path, target: Path) -> None:
    """Make ``folder`` (and its parents) and check that a file can be written in it."""
    for above in (folder, *folder.parents):
        if above.exists() and not above.is_dir():
            raise ConfigError(f"target {target}: {above} is a file, not a folder: choose another place")
    if (why := unwritable(folder)) is not None:
        raise ConfigError(f"target {target}: nothing can be written in {folder} ({why}): choose a writable place")


def file_target(path: Path, suffixes: tuple[str, ...], what: str) -> Path:
    """``path`` as a file to write: not a folder, one of ``suffixes`` (``what`` names the format),
    its folder made and writable."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"target {path} is a folder: name the file to write, e.g. {path / ('out' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        raise ConfigError(f"target {path}: {what} is written as {' or '.join(suffixes)}: name the file so, "
                          f"e.g. {path.with_suffix(suffixes[0])}")
    _writable_folder(path.parent, path)
    return path


def folder_target(path: Path, what: str) -> Path:
    """``path`` as a folder to write into (``what`` writes it): not a file, made and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"target {path} is a file: {what} writes a folder; name one")
    _writable_folder(path, path)
    return path

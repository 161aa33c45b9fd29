"""A folder for what is slow to rebuild from a model file, so that loading it again takes a moment.

``GLLM_CACHE_DIR`` names the folder (default ``$XDG_CACHE_HOME/gllm``, else ``~/.cache/gllm``); set it
to an empty string to cache nothing. Entries are named by a key of the model file's path, inode, size and
change times, so a changed file never meets a stale entry. A cache that cannot be written is
skipped: loading works the same, only slower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    """The cache folder, or None when caching is off."""
    configured = os.environ.get("GLLM_CACHE_DIR")
    if configured is not None:
        return Path(configured).expanduser() if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gllm"


def file_key(path: Path) -> str:
    """Names one version of one file: its resolved path, inode, size and change times."""
    stat = path.stat()
    text = f"{path.resolve()}\0{stat.st_ino}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_json(name: str) -> Any | None:
    """A cached JSON value, or None when there is none or it cannot be read."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def write_json(name: str, value: Any) -> None:
    """Store a JSON value whole or not at all (written beside, then renamed)."""
    text = json.dumps(value)
    _store(name, lambda tmp: (tmp / "value").write_text(text), file_in_tmp="value")


def folder_entry(name: str) -> Path | None:
    """A cached folder, or None when there is none."""
    folder = cache_dir()
    path = None if folder is None else folder / name
    return path if path is not None and path.is_dir() else None


def write_folder(name: str, fill: Callable[[Path], Any]) -> None:
    """Create a cached folder with ``fill(folder)``; it appears only once complete."""
    _store(name, fill)


def _store(name: str, fill: Callable[[Path], Any], file_in_tmp: str | None = None) -> None:
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
        try:
            fill(tmp)
            if file_in_tmp is None and (folder / name).is_dir():  # a damaged entry being replaced
                shutil.rmtree(folder / name)
            os.replace(tmp / file_in_tmp if file_in_tmp else tmp, folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # read-only home, full disk, a racing writer: load without the cache
        log.debug("not cached: %s (%s)", name, exc)

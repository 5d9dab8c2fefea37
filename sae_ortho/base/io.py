"""Atomic writes and checksums: the one place outputs reach the disk.

Every output is written under a unique temporary name beside its final path (same filesystem) and
renamed into place, so neither DVC nor a reader ever sees a half-written file or directory, and two
processes writing the same output (two experiments, two ranks) never share a temporary name. An
interrupted write leaves at most a hidden `.<name>.<pid>.<random>.tmp` sibling, which .dvcignore
and .gitignore skip and the next write of that path removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temp_sibling(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_temps(path: Path) -> None:
    """Temporaries of this path left by writers that died (never one still alive: the pid is in the name)."""
    for stale in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        pid = stale.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextmanager
def atomic_dir(directory: Path | str) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on success it replaces `directory` (the old one is
    removed just before the rename, so a reader sees the old directory, nothing, or the new one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    tmp = temp_sibling(directory)
    tmp.mkdir()
    try:
        yield tmp
        if directory.exists():
            _remove(directory)
        os.replace(tmp, directory)
    finally:
        _remove(tmp)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)

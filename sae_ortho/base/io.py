"""Atomic writes and checksums: the one place outputs reach the disk and the place they are checked.

Every output is written under a unique temporary name beside its final path (same filesystem) and
renamed into place, so neither DVC nor a reader ever sees a half-written file or directory, and two
processes writing the same output (two experiments, two ranks) never share a temporary name. An
interrupted write leaves at most a hidden `.<name>.<pid>.<random>.tmp` sibling, which .dvcignore
and .gitignore skip and the next write of that path removes.

Checksums: an artefact a later stage or a resumed run reads (shards and their index, the LLM-side caches,
SAE files, checkpoints, snapshots, pair logs) is written with its sha256 in a `SHA256SUMS` file of its
directory (`sha256sum -c SHA256SUMS` reads it too) and read through `verified(path)`, which hashes it on
its first read in each process. A file that fails, or that nothing records, stops the process with one line
naming it and the fix, before any work is done on it: a flipped byte must never train or score silently.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sae_ortho.base.faults import fault_point

TMP_SUFFIX = ".tmp"
DIGESTS = "SHA256SUMS"
_verified: dict[Path, tuple[int, int]] = {}  # resolved path -> (size, mtime_ns) when its hash matched
_verify_cost = {"files": 0, "bytes": 0, "seconds": 0.0}


class CorruptFile(SystemExit):
    """A file that fails its recorded sha256, or that nothing records. A SystemExit carrying one line, so that
    every stage exits non-zero with that line and no traceback, without a handler of its own."""


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


def remove_stale_temps_under(root: Path) -> int:
    """Every temporary under `root` whose writer died (`.<name>.<pid>.<random>.tmp`); how many."""
    removed = 0
    for stale in list(root.rglob(f".*{TMP_SUFFIX}")):
        parts = stale.name[1:].split(".")
        pid = parts[-3] if len(parts) >= 4 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and stale.exists():
            _remove(stale)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def disk_errno(err: BaseException) -> int | None:
    """The errno of a disk error: an OSError's, or one a library wrapped in its own exception (safetensors:
    SafetensorError "... No space left on device (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno if err.errno in DISK_ERRNOS else None
    text = str(err)
    return next((c for c in DISK_ERRNOS if f"(os error {c})" in text or f"[Errno {c}]" in text), None)


@contextmanager
def _disk_errors_name(path: Path) -> Iterator[None]:
    """A disk error raised while writing `path` as an OSError that names it."""
    try:
        yield
    except Exception as err:
        code = disk_errno(err)
        if code is None or (isinstance(err, OSError) and err.filename):
            raise
        raise OSError(code, os.strerror(code), str(path)) from err


@contextmanager
def atomic_file(path: Path | str, digest: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` in one rename. With `digest`, its
    sha256 goes into the directory's SHA256SUMS: beside the old one before the rename and alone after it,
    so a kill between the two leaves a file that verifies whichever version it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = temp_sibling(path)
    try:
        with _disk_errors_name(path):
            yield tmp
        if not digest:
            fault_point("rename")
            os.replace(tmp, path)
            return
        new = sha256_file(tmp)
        # Under the directory's lock: two processes writing the same name take turns here, so a reader
        # always finds the file's digest listed (both digests between the rename and the second record).
        with _directory_lock(path.parent):
            _record(path, new, keep_old=True)
            fault_point("rename")
            os.replace(tmp, path)
            _record(path, new, keep_old=False)
    finally:
        _remove(tmp)


@contextmanager
def atomic_dir(directory: Path | str, digests: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on success it replaces `directory` (the old one is
    removed just before the rename, so a reader sees the old directory, nothing, or the new one). With
    `digests`, every file in it is listed in its SHA256SUMS before the rename."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    tmp = temp_sibling(directory)
    tmp.mkdir()
    try:
        with _disk_errors_name(directory):
            yield tmp
        if digests:
            write_digests(tmp)
        fault_point("rename")
        for _ in range(100):  # another writer of the same name may land between the removal and the rename
            if directory.exists():
                _remove(directory)
            try:
                os.replace(tmp, directory)
                break
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        else:
            raise OSError(errno.EEXIST, f"{directory} kept being rewritten by another process")
    finally:
        _remove(tmp)


def write_digests(directory: Path) -> None:
    """SHA256SUMS of every file under `directory` (hidden names skipped), paths relative to it."""
    names = sorted(
        str(f.relative_to(directory))
        for f in directory.rglob("*")
        if f.is_file()
        and f.name != DIGESTS
        and not any(part.startswith(".") for part in f.relative_to(directory).parts)
    )
    atomic_write_text(directory / DIGESTS, "".join(f"{sha256_file(directory / n)}  {n}\n" for n in names))


def _read_digests(sums: Path) -> list[tuple[str, str]]:
    if not sums.exists():
        return []
    return [tuple(line.split("  ", 1)) for line in sums.read_text().splitlines() if "  " in line]  # type: ignore[misc]


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    lock = os.open(directory, os.O_RDONLY)  # flock on the directory itself: no lock file left in an output
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _record(path: Path, digest: str, keep_old: bool) -> None:
    """Set `path`'s entry in its directory's SHA256SUMS (the caller holds the directory's lock)."""
    sums = path.parent / DIGESTS
    rows = _read_digests(sums)
    kept = [(d, n) for d, n in rows if n != path.name or (keep_old and d != digest)]
    atomic_write_text(sums, "".join(f"{d}  {n}\n" for d, n in [*kept, (digest, path.name)]))


def _fix(path: Path) -> str:
    return f"restore it with `dvc checkout --force {path}` where DVC tracks it, or rerun the stage that writes it"


def recorded(path: Path | str) -> tuple[Path, set[str]] | None:
    """The SHA256SUMS (in the file's directory or up to five above) that lists `path`, and its digests."""
    path = Path(path)
    for sums_dir in [path.parent, *list(path.parent.parents)[:5]]:
        name = str(path.relative_to(sums_dir))
        digests = {d for d, n in _read_digests(sums_dir / DIGESTS) if n == name}
        if digests:
            return sums_dir / DIGESTS, digests
    return None


def verified(path: Path | str, expected: str | None = None, fix: str | None = None) -> Path:
    """`path`, once its sha256 matches `expected` or its SHA256SUMS entry; checked on the first read in this
    process (and again if the file changes size or mtime). `fix` replaces the default advice."""
    path = Path(path)
    fix = fix or _fix(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise CorruptFile(f"error: {path} is missing: {fix}") from None
    key, seen = path.resolve(), (stat.st_size, stat.st_mtime_ns)
    if _verified.get(key) == seen:
        return path
    start = time.perf_counter()
    for _ in range(3):  # a writer may replace the file while it is hashed: hash again when it moved
        found = ("the manifest", {expected}) if expected is not None else recorded(path)
        if found is None:
            raise CorruptFile(f"error: {path}: no sha256 recorded for it (no {DIGESTS} lists it): {fix}")
        if sha256_file(path) in found[1]:
            break
        now = path.stat()
        if (now.st_size, now.st_mtime_ns, now.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino):
            raise CorruptFile(
                f"error: {path}: sha256 does not match {found[0]} (corrupt, truncated or modified): {fix}"
            )
        stat, seen = now, (now.st_size, now.st_mtime_ns)
    else:
        raise CorruptFile(f"error: {path} kept changing while it was verified: {fix}")
    _verified[key] = seen
    _verify_cost["files"] += 1
    _verify_cost["bytes"] += stat.st_size
    _verify_cost["seconds"] += time.perf_counter() - start
    return path


def verified_dir(directory: Path | str) -> Path:
    """`directory`, once every file its SHA256SUMS lists verifies (a missing SHA256SUMS fails too)."""
    directory = Path(directory)
    listed = _read_digests(directory / DIGESTS)
    if not listed:
        raise CorruptFile(f"error: {directory}: no {DIGESTS} in it: {_fix(directory)}")
    for _, name in listed:
        verified(directory / name)
    return directory


def _log_verify_cost() -> None:
    """With SAE_ORTHO_VERIFY_LOG set (the reliability suite), append what this process spent verifying."""
    if (log := os.environ.get("SAE_ORTHO_VERIFY_LOG")) and _verify_cost["files"]:
        with open(log, "a") as fh:
            fh.write(json.dumps({"argv": sys.argv, "pid": os.getpid(), **_verify_cost}) + "\n")


atexit.register(_log_verify_cost)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)

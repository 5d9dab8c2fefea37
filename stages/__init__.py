"""One thin entry per DVC stage (`python -m stages.<name>`).

Importing the package installs one hook for every stage: an OSError that says the disk is full, the file
too large or the output read-only or forbidden ends the stage with one line naming the path and what to do,
not a traceback (the atomic writes have already removed their temporaries, so nothing half-written stays).
"""

from __future__ import annotations

import errno
import sys

_DISK_ERRORS = {
    errno.ENOSPC: "the disk is full: free space and rerun the stage",
    errno.EDQUOT: "the disk quota is exceeded: free space and rerun the stage",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit and rerun",
    errno.EROFS: "the filesystem is read-only: make the output directory writable and rerun",
    errno.EACCES: "permission denied: make the output directory writable and rerun",
    errno.EPERM: "operation not permitted: make the output directory writable and rerun",
}


def _one_line_disk_errors(kind, value, tb) -> None:
    if isinstance(value, OSError) and value.errno in _DISK_ERRORS:
        where = value.filename or "an output"
        print(f"error: {where}: {value.strerror}; {_DISK_ERRORS[value.errno]}", file=sys.stderr)
        return
    _previous(kind, value, tb)


_previous = sys.excepthook
sys.excepthook = _one_line_disk_errors

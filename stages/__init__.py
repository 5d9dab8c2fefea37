"""One thin entry per DVC stage (`python -m stages.<name>`).

Importing the package installs one hook for every stage: an OSError that says the disk is full, the file
too large or the output read-only or forbidden ends the stage with one line naming the path and what to do,
not a traceback (the atomic writes have already removed their temporaries, so nothing half-written stays).
It also removes the temporaries that killed writers left behind, and arms the reliability suite's timed fault.
"""

from __future__ import annotations

import errno
import os
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
    from sae_ortho.base.io import disk_errno

    code = disk_errno(value)
    if code is None:
        _previous(kind, value, tb)
        return
    _close_progress_bars()
    where = (value.filename if isinstance(value, OSError) else None) or "an output"
    print(f"error: {where}: {os.strerror(code)}; {_DISK_ERRORS[code]}", file=sys.stderr)


def _close_progress_bars() -> None:
    """Open tqdm bars would redraw themselves after the error line when the process exits: close them first,
    so that the error is the last line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(tqdm, "tqdm", None) and tqdm.tqdm._instances or []):
        bar.close()


def _sweep_stale_temps() -> None:
    """Temporaries that killed writers left under the pipeline's output folders (hidden names DVC ignores;
    a stage restored from DVC's run cache never runs the code that would remove them): removed at the start
    of every stage, never one of a live process."""
    from pathlib import Path

    from sae_ortho.base.io import remove_stale_temps_under

    for top in ("data", "models", "metrics"):
        if Path(top).is_dir():
            remove_stale_temps_under(Path(top))


def _arm_fault_timer() -> None:
    """The reliability suite's `SAE_ORTHO_FAULT=after:<secs>` (a no-op otherwise): armed here, at the start
    of the stage's own process, which thereby owns the fault (sae_ortho/base/faults.py)."""
    from sae_ortho.base.faults import arm_timer

    arm_timer()


_previous = sys.excepthook
sys.excepthook = _one_line_disk_errors
_sweep_stale_temps()
_arm_fault_timer()

"""Fault injection for the reliability suite (`make reliability`, bench/reliability.py): a process kills
itself with SIGKILL, as the OOM killer or a power cut would, at a chosen point or after a chosen time.

SAE_ORTHO_FAULT=<point>:<n>   the n-th call of fault_point(<point>) in this process (e.g. `rename:3`: just
                              before the third atomic rename of an output, io.py)
SAE_ORTHO_FAULT=after:<secs>  <secs> after the stage starts (stages/__init__.py: a random point of its run)
SAE_ORTHO_FAULT_TRACE=<file>  every fault_point call is appended there with the process id, so a clean
                              run tells the suite how many points of each kind a stage passes

Only the first process of a stage that imports the package acts on them (it writes its pid to
SAE_ORTHO_FAULT_OWNER, which its workers and ranks inherit): a fault kills the stage's own process, and its
workers die with it (dist.die_with_parent), as they would under the OOM killer.

Unset (every normal run), fault_point is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import threading

_hits: dict[str, int] = {}


def _owner() -> bool:
    return os.environ.setdefault("SAE_ORTHO_FAULT_OWNER", str(os.getpid())) == str(os.getpid())


def fault_point(name: str) -> None:
    spec, trace = os.environ.get("SAE_ORTHO_FAULT"), os.environ.get("SAE_ORTHO_FAULT_TRACE")
    if (not spec and not trace) or not _owner():
        return
    _hits[name] = _hits.get(name, 0) + 1
    if trace:
        with open(trace, "a") as fh:
            fh.write(f"{name} {os.getpid()}\n")
    if spec:
        point, _, nth = spec.rpartition(":")
        if point == name and int(nth) == _hits[name]:
            os.kill(os.getpid(), signal.SIGKILL)


def arm_timer() -> None:
    """Start the `after:<secs>` timer in the process that owns the fault (called as a stage starts)."""
    spec, trace = os.environ.get("SAE_ORTHO_FAULT"), os.environ.get("SAE_ORTHO_FAULT_TRACE")
    if (not spec and not trace) or not _owner():
        return
    point, _, secs = (spec or "").rpartition(":")
    if point == "after":
        timer = threading.Timer(float(secs), os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()

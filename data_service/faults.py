"""Crash points for testing that a killed writer loses nothing.

`POPSCALE_FAULT=<point>:<n>` makes the process SIGKILL itself the n-th time it reaches
`point(<point>)` (e.g. `staged:2` kills after the second session is fully staged but before it
is moved in). Tests use it to kill an ingest at an exact step instead of racing a timer.
Unset, `point` is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("POPSCALE_FAULT", "")
_name, _, _n = _spec.partition(":")
_target = int(_n) if _n.isdigit() else 1
_count = 0


def point(name: str) -> None:
    global _count
    if not _spec or name != _name:
        return
    _count += 1
    if _count >= _target:
        os.kill(os.getpid(), signal.SIGKILL)

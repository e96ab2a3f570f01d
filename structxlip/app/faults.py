"""Crash points of the training application: SIGKILL this process at a named point of training, chosen by an
environment variable (the resume tests use them; the libraries and the data engine do not import this module).

``STRUCTXLIP_KILL_AT=<point>@<step>`` (for example ``metrics_write@5``) kills the process the moment training reaches
``<point>`` of global step ``<step>``; points without a step (``export``) are named alone. Unset, as it always is
outside tests, every call is one dictionary lookup. Tests use it to interrupt a run at an exact boundary of a step,
whatever the machine's load, instead of killing it from outside at a moment picked by polling.

Points, in the order a step reaches them:
``step``             the optimiser step is taken (weights changed in memory), nothing logged or saved yet
``metrics_write``    half of the step's metrics line is written (a torn last line, as a kill mid-write leaves)
``checkpoint_write`` the checkpoint's temporary file is complete, not yet renamed onto its name
``after_checkpoint`` the step's checkpoint is in place
``export``           the exported model's staging folder is complete, not yet swapped in (no step)

(A data stage's worker that dies is tested with a stage plugin that exits on a named image: tests/plugins/crash_on.py.)
"""

from __future__ import annotations

import os
import signal

ENV = "STRUCTXLIP_KILL_AT"
POINTS = ("step", "metrics_write", "checkpoint_write", "after_checkpoint", "export")


def kill_requested(point: str, step: int | None = None) -> bool:
    """Return True when ``STRUCTXLIP_KILL_AT`` names this point (and step)."""
    target = os.environ.get(ENV)
    return bool(target) and target == (point if step is None else f"{point}@{step}")


def kill_now() -> None:
    """SIGKILL this process: no cleanup handler, ``finally`` block or buffered write runs, as in a real kill."""
    os.kill(os.getpid(), signal.SIGKILL)


def kill_point(point: str, step: int | None = None) -> None:
    """SIGKILL this process when ``STRUCTXLIP_KILL_AT`` names this point (and step); otherwise do nothing."""
    if kill_requested(point, step):
        kill_now()

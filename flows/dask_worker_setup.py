"""Preloaded by the worker processes of the LocalCluster a run starts for ``runtime.runner: dask`` (no address).

They are in the run's process group, so a Ctrl-C in the terminal reaches them too: each then logged its cancelled
tasks and a traceback under the run's one line, while the run (``flows.interrupts``) ends them anyway. Like the
engine's own workers, they leave the signals that reach the group (Ctrl-C, Ctrl-\\, a hang-up, ``kill -SIG -PGID``)
to the run.
"""

from __future__ import annotations

import threading

from pipelines.engine.preload import leave_signals_to_the_run


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask's preload hook
    if threading.current_thread() is threading.main_thread():
        leave_signals_to_the_run()

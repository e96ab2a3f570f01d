"""Imported once by the engine's forkserver, before it forks any worker (``workers.prestart``): the heavy modules the
run's CPU stages import (``Stage.worker_imports``: torch, transformers, spaCy). Every worker forked after it starts
with them already imported, its pages shared with the others, instead of paying the import itself (3-4 CPU-s and
~200 MB each for the captions stage's torch and transformers).

What to import comes from the forkserver's environment (set by ``workers.prestart`` for the moment it starts):
``IMPORTS`` in order, with ``BLOCKS`` made unimportable meanwhile (modules no stage of the run uses that a library
would import only because they are installed: spaCy's thinc imports torch). A module that fails to import is left
out: the worker that needs it imports it again and reports the error where it belongs, in its stage.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys

IMPORTS = "STRUCTXLIP_FORKSERVER_IMPORTS"
# What a terminal sends its whole process group: Ctrl-C, Ctrl-\ and a hang-up (the terminal closed). The run handles
# each (``flows.interrupts``); the processes it started leave them to it.
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
BLOCKS = "STRUCTXLIP_FORKSERVER_BLOCKS"


def preload(imports: list[str], blocks: list[str]) -> None:
    """Import ``imports`` (failures ignored) with ``blocks`` unimportable meanwhile; they are importable again after."""
    blocked = [name for name in blocks if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # importing it raises ImportError, as if it were not installed
    try:
        for name in imports:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the worker's own import reports it, in the stage that needs it
                pass
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    # Out of every later collection: a worker's collector would otherwise write to each of these objects' headers,
    # copying the pages it shares with the forkserver and the other workers.
    gc.freeze()


def leave_terminal_signals_to_the_run() -> None:
    """In a process the run started (an engine worker, their forkserver, a LocalCluster's Dask worker): ignore the
    ``TERMINAL_SIGNALS`` (a Ctrl-C or Ctrl-\\ reaches the terminal's whole process group; a closed terminal hangs it
    all up). The run handles them and ends its processes itself (``flows.interrupts``); interrupted here, they would
    print tracebacks under its one line, or die with their chunks before the run marks them Cancelled."""
    for signum in TERMINAL_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _names(variable: str) -> list[str]:
    return [name for name in os.environ.get(variable, "").split(",") if name]


if os.environ.get(IMPORTS):  # set only for the forkserver's start (workers.prestart): never in the run's own process
    # Ctrl-C reaches every process of the terminal's group: it is the run's to handle (it stops the workers and exits),
    # and this process ends with the run. Interrupted here, the imports would print a traceback over the run's message.
    leave_terminal_signals_to_the_run()
    preload(_names(IMPORTS), _names(BLOCKS))

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
BLOCKS = "STRUCTXLIP_FORKSERVER_BLOCKS"


def _ending_signals() -> tuple[int, ...]:
    """Every signal that ends a process nothing handles it in (its default action terminates, with or without a core
    dump), less SIGKILL (uncatchable), those a process's own fault raises (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT,
    SIGTRAP, SIGSYS: a bug, faulthandler's to report) and SIGPIPE and SIGXFSZ, which Python ignores (a write then fails
    with an error the run reports). The platform's real-time signals included."""
    names = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF",
             "SIGXCPU", "SIGIO", "SIGPWR", "SIGSTKFLT", "SIGEMT", "SIGLOST")
    found = [int(getattr(signal, name)) for name in names if hasattr(signal, name)]
    if hasattr(signal, "SIGRTMIN"):
        found += range(int(signal.SIGRTMIN), int(signal.SIGRTMAX) + 1)
    return tuple(dict.fromkeys(found))


# Signals the run ends on (``flows.interrupts``), each with exit status 128 + its number: Ctrl-C (SIGINT), SIGTERM,
# Ctrl-\ (SIGQUIT), a closed terminal (SIGHUP), and any other signal that would end it unhandled (SIGUSR1, SIGALRM,
# SIGXCPU at the CPU-time limit, ...). One it was started ignoring (``nohup``, a background job) stays ignored.
ENDING_SIGNALS = _ending_signals()
# Those the processes the run started (engine workers, their forkserver, the resource tracker, a LocalCluster's Dask
# workers, torchrun) ignore: a terminal sends Ctrl-C, Ctrl-\ and a hang-up to its whole process group, and ``kill
# -SIG -PGID`` any of them, but the run handles them and ends its processes itself. SIGTERM is not among them: it is
# what a process pool and Dask use to stop a worker.
LEFT_TO_THE_RUN = tuple(signum for signum in ENDING_SIGNALS if signum != signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``SIGUSR1``; ``SIGRTMIN+3`` for a real-time signal without a name of its own."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - int(signal.SIGRTMIN)}" if hasattr(signal, "SIGRTMIN") else f"signal {signum}"


def preload(imports: list[str], blocks: list[str]) -> None:
    """Import ``imports`` (failures ignored) with ``blocks`` unimportable meanwhile; they are importable again after.
    The file pages each import touched are released after it (``release_file_pages``): the forkserver's memory peaks
    at its largest import's, not at their sum (torch ~630 MB, all of the captions stage's ~900)."""
    blocked = [name for name in blocks if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # importing it raises ImportError, as if it were not installed
    try:
        for name in imports:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the worker's own import reports it, in the stage that needs it
                pass
            release_file_pages()
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    # Out of every later collection: a worker's collector would otherwise write to each of these objects' headers,
    # copying the pages it shares with the forkserver and the other workers.
    gc.freeze()


MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def release_file_pages() -> int:
    """Unmap from this process's page tables every resident page of a file mapping that it cannot have changed (the
    mapping is not writable and holds no page of its own: ``Anonymous`` 0 in ``/proc/self/smaps``); return the KiB
    released. The pages stay in the page cache: a later access maps them again from there. Linux only (0 elsewhere).

    For the forkserver, after each import: loading torch touches ~240 MB of the CUDA libraries it links (cuBLAS,
    cuDNN, ...) and more of torch's own, which no CPU worker ever reads. They counted in the forkserver's memory (PSS
    634 -> ~200 MB for the captions stage's); a worker forked from it maps only the pages it reads (``fork`` copies no
    page-table entry of a file mapping without private pages)."""
    import ctypes

    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mappings, current = [], None
    for line in lines:
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # "start-end perms offset dev inode [path]"
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            current = {"start": start, "end": end, "file": path.startswith("/") and "w" not in fields[1]}
            mappings.append(current)
        elif current is not None and fields and fields[0] in ("Rss:", "Anonymous:"):
            current[fields[0]] = int(fields[1])
    released = 0
    for mapping in mappings:
        if mapping["file"] and mapping.get("Anonymous:") == 0 and mapping.get("Rss:", 0) > 0:
            if madvise(mapping["start"], mapping["end"] - mapping["start"], MADV_DONTNEED) == 0:
                released += mapping["Rss:"]
    return released


def leave_signals_to_the_run() -> None:
    """In a process the run started (an engine worker, their forkserver, a LocalCluster's Dask worker, torchrun): ignore
    ``LEFT_TO_THE_RUN`` (what reaches the run's whole process group). The run handles them and ends its processes
    itself (``flows.interrupts``); interrupted here, they would print tracebacks under its one line, or die with their
    chunks before the run marks them Cancelled."""
    for signum in LEFT_TO_THE_RUN:
        signal.signal(signum, signal.SIG_IGN)


def exit_with_parent(parent: int | None = None) -> None:
    """End this process (``os._exit(1)``) as soon as ``parent`` (this process's parent now, by default) is gone: it
    is then re-parented. For a process the run started outside a process pool (its API server, torchrun and its
    ranks), so that nothing outlives a run killed outright (SIGKILL, the out-of-memory killer)."""
    import threading
    import time

    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _names(variable: str) -> list[str]:
    return [name for name in os.environ.get(variable, "").split(",") if name]


if IMPORTS in os.environ:  # set only for the forkserver's start (workers._start_forkserver), never in the run's process
    # A signal to the run's group (Ctrl-C) reaches every process in it: it is the run's to handle (it stops the workers
    # and exits), and this process ends with the run. Interrupted here, the imports would print a traceback over the
    # run's message.
    leave_signals_to_the_run()
    preload(_names(IMPORTS), _names(BLOCKS))

"""The engine's worker processes: the one layer of data parallelism on a machine.

CPU data stages (``Stage.on_cpu``) compute their chunks here, ``workers`` processes at a time; the caller (a Prefect
task thread, or ``run_inline``) only waits and records the part. Each worker runs torch and OpenCV on its share of
the cores (``usable cores // workers``, at least 1), so processes x threads never exceeds the machine: with 2 torch
threads in each of 2 processes on 2 cores the tiny CLIP ran 30-100x slower. Workers live for one stage
(its models load once per worker, kept by ``pipelines.engine.stages.shared``): the next stage's first chunk replaces
them, so memory never adds up the stages' imports and models (2,000+ MB of tree PSS on 1,000 images when the filter's
workers still held the captions stage's torch, transformers and CLIP).

Workers start from a ``forkserver``: a clean process with the engine imported, never a fork of a process that already
runs threads (Prefect, torch). Each stage's workers come from a forkserver of their own kind, one per distinct
(``Stage.worker_imports``, ``Stage.worker_skips``): it imported the heavy modules the stage's workers use (the captions
stage's torch and transformers, the filter's spaCy) once, with what the stage skips kept out (spaCy's thinc would
import torch only because it is installed), so every worker forked from it starts with them, its pages shared, and
holds nothing it never uses (ingest's workers no torch, the filter's no transformers). A run starts every forkserver
its CPU stages need as it starts (``prestart``): they import in the background, the later stages' while the earlier
stages compute, so no stage waits for an import it could have had done already (the ingest stage waited ~5 s for
the captions stage's torch, transformers and spaCy when one forkserver imported them all). A forkserver no later stage
of the run uses is stopped when a stage starts its workers.

A worker that dies (a decoder crash, the OOM killer) breaks the pool, and with it every chunk in flight, guilty or not:
each of those chunks is computed again in a worker of its own (``alone``), where only its own items can kill it; if
that worker dies too, its items are retried one by one, each alone, and an item whose own worker dies becomes a failed
row. No item is blamed for a death another chunk caused.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import multiprocessing
import os
import signal
import sys
import threading
from concurrent import futures
from multiprocessing import context as mp_context, forkserver, popen_forkserver

from pipelines.engine import preload

_TRACKER_QUIET = "ignore::UserWarning:multiprocessing.resource_tracker"
_lock = threading.Lock()
_pool: futures.ProcessPoolExecutor | None = None
_owner: tuple[str | None, int] | None = None  # (stage, workers) of _pool
_private: set[futures.ProcessPoolExecutor] = set()
_stopped = False  # set by ``stop_starting``: the run is ending, no process may start any more
_ENGINE = "pipelines.engine.execute"  # what every worker runs; each forkserver imports it before any fork
Kind = tuple[tuple[str, ...], tuple[str, ...]]  # a forkserver's (imports, blocks): what its workers start with
_servers: dict[Kind, forkserver.ForkServer] = {}  # the forkservers this process started, by kind
_upcoming: list[Kind] = []  # the kinds the run's CPU stages use, in stage order, from the next stage on (prestart)
# GPU kernel compilers, never used by a worker (workers compute CPU stages only), which a library imports whenever
# they are installed: transformers' torch._dynamo imports triton (~75 MB and 0.3 s per process).
GPU_ONLY = ("triton",)


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_worker(workers: int) -> int:
    """Intra-op threads of each of ``workers`` processes: the usable cores shared out, at least one."""
    return max(1, usable_cpus() // max(1, workers))


def _exit_with_parent() -> None:
    """End this worker as soon as the process that owns the pool is gone (a SIGKILLed run): a worker waits on its
    task queue, whose write end it holds itself, so it would otherwise wait forever, holding its models' memory and
    the run's stdout/stderr pipes (a caller reading them to EOF would hang)."""
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(threads: int, environ: dict[str, str], skips: tuple[str, ...]) -> None:
    preload.leave_signals_to_the_run()
    _exit_with_parent()
    for name in skips:
        if name not in sys.modules:  # one the forkserver imported for another stage is there already: nothing to save
            sys.modules[name] = None  # importing it raises ImportError, as if it were not installed
    # The forkserver was started once, with the environment of that moment: workers take the pool creator's now.
    os.environ.clear()
    os.environ.update(environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)  # read by torch/numpy when they are first imported in this worker
    import cv2

    cv2.setNumThreads(threads)
    _keep_freed_memory()
    torch = sys.modules.get("torch")
    if torch is not None:  # imported by the forkserver (prestart), before OMP_NUM_THREADS said anything
        torch.set_num_threads(threads)


# glibc's mallopt parameters (malloc.h) and the values a worker sets: arrays up to 32 MiB come from the heap, and up
# to 64 MiB of freed memory stays there for the next item's arrays.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD, _TRIM_THRESHOLD = 32 << 20, 64 << 20


def _keep_freed_memory() -> bool:
    """Make glibc keep a worker's freed image-sized arrays for reuse; return whether it could (glibc only).

    By default glibc gives each freed block of more than 128 KiB - a decoded image, its crops, a stage's
    intermediate arrays - back to the kernel, and the next item's arrays fault their pages in again: page faults were
    ~3% of the regions stage's CPU time. Kept, they are reused; a worker holds at most 64 MiB more.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator's defaults
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


class Stopping(RuntimeError):
    """The run is ending (``stop_starting``): no worker process, nor their forkserver, starts any more."""


def stop_starting() -> None:
    """Refuse, from now on, to start any worker process or forkserver in this process (``Stopping``): call it first
    when the run is ending (an interrupt), before its workers are killed. A chunk whose workers were killed is retried
    in a new process of its own (``alone``); during the clean-up that new process (or a new forkserver, the old one
    killed) would start importing the run's libraries, only to be killed or to print a traceback of the terminal's
    next Ctrl-C. The chunk is left unfinished instead (its task ends Cancelled), and nothing of it is recorded."""
    global _stopped
    with _lock:
        _stopped = True


def _refuse_if_stopping() -> None:
    if _stopped:
        raise Stopping("the run is stopping: no new worker processes")


def kind(imports: tuple[str, ...] = (), skips: tuple[str, ...] = ()) -> Kind:
    """The forkserver a stage's workers come from: its ``imports`` preloaded, its ``skips`` (and ``GPU_ONLY``) kept
    out."""
    return tuple(imports), tuple(dict.fromkeys(GPU_ONLY + tuple(skips)))


def prestart(kinds: list[Kind]) -> bool:
    """Start, now, the forkserver of each of ``kinds`` (``kind()`` of the run's CPU stages, in stage order) that is not
    running yet; each imports its modules in the background. Call it as a run starts. Return whether one started.
    Until the stages are done, a forkserver of these kinds is kept for the stage that uses it next."""
    with _lock:
        if _stopped or not kinds:
            return False
        _upcoming[:] = kinds
        missing = [wanted for wanted in dict.fromkeys(kinds) if wanted not in _servers]
        for wanted in missing:
            _server(wanted)
    return bool(missing)


def _launch(wanted: Kind) -> forkserver.ForkServer:
    """Start a forkserver preloading ``wanted``'s imports with its blocks kept out (the caller holds ``_lock``); the
    launch returns at once, the forkserver imports in the background."""
    imports, blocks = wanted
    quiet_tracker()
    server = forkserver.ForkServer()
    server.set_forkserver_preload([preload.__name__, _ENGINE])
    saved = {name: os.environ.get(name) for name in (preload.IMPORTS, preload.BLOCKS)}
    # The engine last among the imports: its pages too are released once all are imported (preload.preload)
    os.environ[preload.IMPORTS], os.environ[preload.BLOCKS] = ",".join((*imports, _ENGINE)), ",".join(blocks)
    try:  # the forkserver takes this process's environment as it starts, not later
        with signals_left_to_the_run():
            server.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return server


def _server(wanted: Kind) -> forkserver.ForkServer:
    """The running forkserver of kind ``wanted``, started now if there is none (the caller holds ``_lock``)."""
    _refuse_if_stopping()
    server = _servers.get(wanted)
    if server is None:
        server = _servers[wanted] = _launch(wanted)
    return server


def _retire(current: Kind) -> None:
    """As a stage of kind ``current`` starts its workers (the caller holds ``_lock``, the previous stage's workers are
    gone): stop every other forkserver no later stage of the run uses (``_upcoming``), so none holds its imports'
    memory longer than needed. It exits once every process it forked has ended."""
    if current in _upcoming:
        del _upcoming[:_upcoming.index(current) + 1]
    for stale in [known for known in _servers if known != current and known not in _upcoming]:
        server = _servers.pop(stale)
        with contextlib.suppress(OSError, ChildProcessError):  # one that died already
            server._stop()


class _ServerPopen(popen_forkserver.Popen):
    """``popen_forkserver.Popen`` (CPython 3.8-3.13) asking the forkserver of the process's kind instead of the module's
    single one: this ``_launch`` is CPython's with that one difference."""

    def _launch(self, process_obj):
        from multiprocessing import reduction, spawn, util

        prep_data = spawn.get_preparation_data(process_obj._name)
        buf = io.BytesIO()
        mp_context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            mp_context.set_spawning_popen(None)
        # Retired only after every pool of its kind was shut down; the module's plain forkserver otherwise (no preload).
        server = _servers.get(process_obj.forkserver_kind) or forkserver._forkserver
        self.sentinel, w = server.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _ServerProcess(mp_context.ForkServerProcess):
    forkserver_kind: Kind = ((), ())

    @staticmethod
    def _Popen(process_obj):
        return _ServerPopen(process_obj)


class _ServerContext(mp_context.ForkServerContext):
    """The forkserver start method, with the forkserver of one kind."""

    def __init__(self, wanted: Kind) -> None:
        self.kind = wanted

    def Process(self, *args, **kwargs):  # noqa: N802 - multiprocessing's name
        process = _ServerProcess(*args, **kwargs)
        process.forkserver_kind = self.kind
        return process


@contextlib.contextmanager
def signals_left_to_the_run():
    """Start processes (the forkserver, the resource tracker) ignoring ``preload.LEFT_TO_THE_RUN``, as exec keeps an
    ignored signal: Ctrl-\\, a closed terminal or ``kill -USR1 -PGID`` reach the run's whole process group, and the run
    (``flows.interrupts``) ends them itself. A resource tracker killed first would be started again by the run's
    clean-up and print a traceback per name. (Only the main thread can set a handler: elsewhere the started process
    takes this one's dispositions.) Keep the block short: this process ignores them meanwhile, all but Ctrl-C, which
    both processes ignore by themselves."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ignored = [signum for signum in preload.LEFT_TO_THE_RUN if signum != signal.SIGINT]
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in ignored}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def quiet_tracker() -> None:
    """An aborted run (Ctrl-C, a lost API) exits without closing the pool's queues: the resource tracker (started with
    the forkserver, with this process's warning options) then unlinks their semaphores, as it should, but would also
    warn about each on stderr."""
    if _TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_QUIET)


def start_tracker() -> None:
    """Start multiprocessing's resource tracker now, quiet and ignoring ``preload.LEFT_TO_THE_RUN``, before processes
    that would start it from another thread, with this process's dispositions (a LocalCluster's workers)."""
    from multiprocessing import resource_tracker

    quiet_tracker()
    with signals_left_to_the_run():
        resource_tracker.ensure_running()


def pool(workers: int, stage: str | None = None, skips: tuple[str, ...] = (),
         imports: tuple[str, ...] = ()) -> futures.ProcessPoolExecutor:
    """Return the worker pool of ``stage``: ``workers`` processes, started by its first chunk and reused for the others.
    A chunk of another stage (or another size) replaces it with fresh workers, so a stage's workers hold only what it
    imports and loads: the filter's spaCy workers never carry the captions stage's CLIP, transformers and tokenizer.
    ``skips``: modules the stage's workers must not import (``Stage.worker_skips``); ``imports``: the heavy ones they
    do (``Stage.worker_imports``), which the forkserver they are forked from preloaded."""
    global _pool, _owner
    with _lock:
        _refuse_if_stopping()
        if _pool is not None and _owner == (stage, workers):
            return _pool
        previous, _pool, _owner = _pool, None, None
        if previous is not None:
            previous.shutdown(wait=True)  # its workers end once what they were given is done
        wanted = kind(imports, skips)
        _retire(wanted)
        _pool, _owner = _executor(wanted, workers, threads_per_worker(workers)), (stage, workers)
        return _pool


def _executor(wanted: Kind, workers: int, threads: int) -> futures.ProcessPoolExecutor:
    """Workers forked from the forkserver of kind ``wanted`` (started now if none runs; the caller holds ``_lock``)."""
    quiet_tracker()
    _server(wanted)
    return futures.ProcessPoolExecutor(workers, mp_context=_ServerContext(wanted), initializer=_init_worker,
                                       initargs=(threads, dict(os.environ), wanted[1]))


@contextlib.contextmanager
def alone(workers: int, skips: tuple[str, ...] = (), imports: tuple[str, ...] = ()):
    """A one-process executor that only the caller uses, with the threads of one of ``workers`` workers (and their
    ``skips`` and ``imports``): a death in it was caused by what the caller submitted. Stopped on exit; ``abort``
    kills it too."""
    with _lock:
        _refuse_if_stopping()
        executor = _executor(kind(imports, skips), 1, threads_per_worker(workers))
        _private.add(executor)
    try:
        yield executor
    finally:
        with _lock:
            _private.discard(executor)
        executor.shutdown(wait=True, cancel_futures=True)


def discard(broken: futures.ProcessPoolExecutor) -> None:
    """Forget a broken pool (a worker died): the next ``pool()`` starts fresh workers."""
    global _pool
    with _lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


@atexit.register
def shutdown() -> None:
    """Stop the worker processes; also at interpreter exit (a pool the interpreter's teardown collects would print an
    'Exception ignored' traceback)."""
    global _pool
    with _lock:
        current, _pool = _pool, None
    if current is not None:
        current.shutdown(wait=True, cancel_futures=True)


def abort() -> None:
    """Stop the workers now, before the process ends with ``os._exit`` (the CLI's lost-server exit): kill them and
    release the pool's queues, so nothing keeps running and no semaphore is reported leaked at exit."""
    global _pool
    with _lock:
        executors = [e for e in (_pool, *_private) if e is not None]
        _pool = None
        _private.clear()
    for executor in executors:
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError):
                process.kill()
    for executor in executors:
        closer = threading.Thread(target=executor.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True)
        closer.start()
        closer.join(timeout=5.0)
    del executors
    gc.collect()  # the queues' semaphores are released by their finalizers

"""Task runners of the stage flows: a thread pool in this process (local) or a Dask cluster (prefect-dask)."""

from __future__ import annotations

import contextlib

from prefect.task_runners import ThreadPoolTaskRunner


def default_runner(workers: int = 0) -> ThreadPoolTaskRunner:
    """Thread pool for the local runner. Its threads only dispatch: a CPU chunk is computed in one of the engine's
    ``workers`` processes (``pipelines.engine.workers``), so there is one thread per worker (0 = one per usable core)."""
    from pipelines.engine.stages import usable_cpus

    return ThreadPoolTaskRunner(max_workers=max(2, workers or usable_cpus()))


def on_threads() -> bool:
    """True when tasks run on threads of this process (a library may then start its own process pool; Dask workers
    are daemonic processes and cannot, and there the Dask workers are the parallelism anyway)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context is None or isinstance(getattr(context, "task_runner", None), ThreadPoolTaskRunner)


def make_runner(runner: str, dask_address: str | None, workers: int = 0):
    """Return the task runner of a stage flow: a thread pool dispatching to ``workers`` engine processes, or Dask on
    ``dask_address`` (a running scheduler)."""
    if runner == "local":
        return default_runner(workers)
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    raise ValueError(f"expected runner 'local' or 'dask', got {runner!r}")


@contextlib.contextmanager
def dask_scheduler(address: str | None, workers: int):
    """Yield the address of a Dask scheduler: ``address`` itself, or a LocalCluster started for this run."""
    if address:
        yield address
        return
    from distributed import LocalCluster

    from pipelines.engine.workers import start_tracker

    # The resource tracker its processes would start, unquieted, warned of each semaphore a Ctrl-C left; started from
    # its thread, a signal to the run's group killed it, and the clean-up started one again that printed tracebacks.
    start_tracker()

    # One cluster for the whole run (each stage subflow reuses it): worker start-up is paid once. Its workers ignore
    # the terminal's Ctrl-C: the run ends them (flows.dask_worker_setup). The scheduler's HTTP server takes any free
    # port: with no address it binds 8787, and a second run at the same time printed a 4-line warning on its stderr.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      preload=["flows.dask_worker_setup"]) as cluster:
        yield cluster.scheduler_address

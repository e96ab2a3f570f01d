"""Task runners of the stage flows: a thread pool in this process (local) or a Dask cluster (prefect-dask)."""

from __future__ import annotations

import contextlib
import os

from prefect.task_runners import ThreadPoolTaskRunner


def default_runner() -> ThreadPoolTaskRunner:
    """Thread pool for the local runner: library calls release the GIL (OpenCV, torch), two chunks keep cores busy."""
    return ThreadPoolTaskRunner(max_workers=max(2, min(4, os.cpu_count() or 1)))


def on_threads() -> bool:
    """True when tasks run on threads of this process (a library may then start its own process pool; Dask workers
    are daemonic processes and cannot, and there the Dask workers are the parallelism anyway)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context is None or isinstance(getattr(context, "task_runner", None), ThreadPoolTaskRunner)


def make_runner(runner: str, dask_address: str | None):
    """Return the task runner of a stage flow: a thread pool, or Dask on ``dask_address`` (a running scheduler)."""
    if runner == "local":
        return default_runner()
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

    # One cluster for the whole run (each stage subflow reuses it): worker start-up is paid once.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address

"""The Prefect flows: the parent ``structxlip-pipeline`` and one flow per stage (each servable as a deployment).

Thin by design: what a stage is, which items are pending and how a chunk is processed live in ``pipelines.stages``,
``pipelines.plan`` and ``pipelines.engine``. A flow maps the pending chunks of its plan over the task runner,
publishes artifacts and ends Failed (red in the UI) when a chunk failed. Every flow takes the same parameters
(``images_dir``, ``out_dir``, ``config_path``, ``refresh``); without ``config_path`` it reuses the config recorded in
``OUT/config.yaml`` by the run that made the folder, so a single-stage re-run keys its work exactly like that run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from prefect import flow
from prefect.futures import as_completed
from prefect.settings import temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from configs.schema import STAGES
from pipelines.engine import StageFailed, run_plan, write_report
from pipelines.plan import Pipeline, record_config, resolve_config
from pipelines.stages import STAGE_DEFINITIONS, parse_stages
from storage import lock

from flows.tasks import STAGE_TASKS

log = logging.getLogger("structxlip.flows")
_current: list[Pipeline] = []  # the pipeline of the run in progress in this process (config loaded once per run)


class PipelineFailed(RuntimeError):
    """A stage failed; ``report`` holds every stage summary so far (the failed one last)."""

    def __init__(self, report: dict, failed: StageFailed):
        self.report = report
        super().__init__(str(failed))


def open_pipeline(images_dir: str, out_dir: str, config_path: str | None) -> Pipeline:
    """Return the run's ``Pipeline``: the one the parent flow (or CLI) opened for these folders, else a new one."""
    images, out = Path(images_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    for pipeline in _current:
        if pipeline.images_dir == images and pipeline.layout.root == out:
            return pipeline
    config, _source = resolve_config(out, config_path)
    return Pipeline(images, out, config)


@contextlib.contextmanager
def current_pipeline(pipeline: Pipeline):
    """Make ``pipeline`` the one every flow of this run uses (no second config load, store read or lock)."""
    _current.append(pipeline)
    try:
        yield pipeline
    finally:
        _current.remove(pipeline)


def default_runner() -> ThreadPoolTaskRunner:
    """Thread pool for the local runner: library calls release the GIL (OpenCV, torch), two chunks keep cores busy."""
    return ThreadPoolTaskRunner(max_workers=max(2, min(4, os.cpu_count() or 1)))


def _on_threads() -> bool:
    """True when tasks run on threads of this process (a library may then start its own process pool; Dask workers
    are daemonic processes and cannot, and there the Dask workers are the parallelism anyway)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context is None or isinstance(getattr(context, "task_runner", None), ThreadPoolTaskRunner)


def run_stage(pipeline: Pipeline, stage: str, refresh: bool) -> dict:
    """Plan ``stage``, map its pending chunks over the flow's task runner, publish its artifacts; return the summary."""
    from tqdm import tqdm

    plan = pipeline.plan(stage, refresh=refresh)
    if not _on_threads():
        plan.runtime = {**plan.runtime, "workers": 1} if "workers" in plan.runtime else plan.runtime
    config = pipeline.config
    task = STAGE_TASKS[stage].with_options(retries=config.runtime.task_retries)
    chunk_size = 1 if STAGE_DEFINITIONS[stage].whole else config.runtime.chunk_size

    def execute(chunks):
        futures = {task.submit(keys, records, out_dir=str(pipeline.layout.root), stage_key=plan.stage_key,
                               params=plan.params, runtime=plan.runtime): (index, len(keys))
                   for index, (keys, records) in enumerate(chunks)}
        done = 0
        _progress(stage, done, len(plan.pending))
        with tqdm(total=len(plan.pending), desc=f"{stage:<9}", unit="item", file=sys.stderr,
                  disable=not sys.stderr.isatty()) as bar:
            for future in as_completed(list(futures)):
                index, size = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - reported in the summary; the stage ends failed
                    outcome = exc
                bar.update(size)
                done += size
                _progress(stage, done, len(plan.pending))
                yield index, outcome

    try:
        summary = run_plan(plan, pipeline.layout, chunk_size=chunk_size, refresh=refresh, execute=execute)
    except StageFailed as failed:
        _publish(pipeline, failed.summary)
        log.error("%s", failed.summary["error"])
        raise
    finally:
        pipeline.invalidate(stage)
    _publish(pipeline, summary)
    return summary


def _progress(stage: str, done: int, total: int) -> None:
    """Update the stage's progress artifact (a reporting error never fails a run)."""
    with contextlib.suppress(Exception):
        from flows.artifacts import stage_progress

        stage_progress(stage, done, total)


def _publish(pipeline: Pipeline, summary: dict) -> None:
    """Send the stage's artifacts to Prefect; a reporting error never fails a run (the data is already on disk)."""
    try:
        from flows import artifacts

        artifacts.publish_stage_summary(artifacts.StageSummary(
            summary["stage"], summary["processed"], summary["cached"], summary["failed"], float(summary["seconds"]),
            list(summary.get("failures") or [])))
        if summary["stage"] == "manifest" and summary["processed"]:
            rows = [r for r in pipeline.manifest_rows.rows if r["status"] == "ok"][:8]
            artifacts.publish_gallery("manifest", str(pipeline.layout.root), rows)
        if summary["stage"] == "train" and summary["processed"]:
            artifacts.publish_training(pipeline.layout.root)
        if summary["stage"] == "evaluate" and summary["processed"]:
            artifacts.publish_evaluation(pipeline.layout.root)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not publish %s artifacts: %s", summary["stage"], exc)


def _stage_flow(stage: str):
    definition = STAGE_DEFINITIONS[stage]

    def stage_flow(images_dir: str, out_dir: str, config_path: str | None = None, refresh: bool = False) -> dict:
        pipeline = open_pipeline(images_dir, out_dir, config_path)
        with lock.output_lock(pipeline.layout):
            return run_stage(pipeline, stage, refresh)

    # Deployments load a flow by "flows/pipeline.py:<stage>_flow"; the function's names must say the same.
    stage_flow.__name__ = stage_flow.__qualname__ = f"{stage}_flow"
    stage_flow.__doc__ = definition.description
    return flow(name=stage, description=definition.description, task_runner=default_runner(),
                validate_parameters=True)(stage_flow)


STAGE_FLOWS = {stage: _stage_flow(stage) for stage in STAGES}
ingest_flow, structure_flow, regions_flow, captions_flow, filter_flow, manifest_flow, train_flow, evaluate_flow = (
    STAGE_FLOWS[s] for s in STAGES)


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


@flow(name="structxlip-pipeline", description="StructXLIP data preparation, fine-tuning and evaluation, cached per stage.")
def structxlip_pipeline(
    images_dir: str,
    out_dir: str,
    config_path: str | None = None,
    stages: list[str] | None = None,
    refresh: list[str] | None = None,
    runner: str | None = None,
    dask_address: str | None = None,
) -> dict:
    """Run the requested stages in order as subflows; return ``{"stages": [summary, ...], "seconds", ...}``.

    A stage that fails ends the run (its summary is the last one) and the flow run ends Failed."""
    started = time.perf_counter()
    pipeline = open_pipeline(images_dir, out_dir, config_path)
    selected = parse_stages(stages)
    refreshed = set(parse_stages(refresh)) if refresh else set()
    runner = runner or pipeline.config.runtime.runner
    summaries: list[dict] = []
    failure: StageFailed | None = None
    # Prefect 3.8 joins a 1 s heartbeat thread at the end of every flow run; stage subflows need no heartbeat.
    with lock.output_lock(pipeline.layout), current_pipeline(pipeline), contextlib.ExitStack() as stack:
        stack.enter_context(temporary_settings(updates={"flows.heartbeat_frequency": None}))
        record_config(pipeline.layout, pipeline.config)
        address = dask_address or pipeline.config.runtime.dask_address
        if runner == "dask":
            address = stack.enter_context(dask_scheduler(address, pipeline.config.runtime.dask_workers))
        for stage in selected:
            stage_flow = STAGE_FLOWS[stage].with_options(task_runner=make_runner(runner, address))
            try:
                summaries.append(stage_flow(images_dir=str(pipeline.images_dir), out_dir=str(pipeline.layout.root),
                                            config_path=config_path, refresh=stage in refreshed))
            except StageFailed as exc:
                summaries.append(exc.summary)
                failure = exc
                break
    report = write_report(pipeline, summaries, seconds=time.perf_counter() - started,
                          not_run=[s for s in selected if s not in {x["stage"] for x in summaries}])
    if failure is not None:
        raise PipelineFailed(report, failure)
    return report


__all__ = ["STAGE_FLOWS", "PipelineFailed", "current_pipeline", "make_runner", "open_pipeline", "run_stage",
           "structxlip_pipeline"]

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
from typing import Literal, get_args

from prefect import flow
from prefect.futures import as_completed
from prefect.settings import temporary_settings

from configs.schema import STAGES
from pipelines.engine import StageFailed, run_plan, write_report
from pipelines.plan import Pipeline, record_config, resolve_config
from pipelines.stages import STAGE_DEFINITIONS, parse_stages
from storage import lock

from flows.runners import dask_scheduler, default_runner, make_runner, on_threads
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
    config, source = resolve_config(out, config_path)
    pipeline = Pipeline(images, out, config)
    pipeline.config_source = source
    return pipeline


@contextlib.contextmanager
def current_pipeline(pipeline: Pipeline):
    """Make ``pipeline`` the one every flow of this run uses (no second config load, store read or lock)."""
    _current.append(pipeline)
    try:
        yield pipeline
    finally:
        _current.remove(pipeline)


def run_stage(pipeline: Pipeline, stage: str, refresh: bool) -> dict:
    """Plan ``stage``, map its pending chunks over the flow's task runner, publish its artifacts; return the summary."""
    from tqdm import tqdm

    plan = pipeline.plan(stage, refresh=refresh)
    if not on_threads():
        plan.workers = 1  # Dask workers are the processes: a chunk runs in the task's own
    config = pipeline.config
    task = STAGE_TASKS[stage].with_options(retries=config.runtime.task_retries)

    def execute(chunks):
        futures = {task.submit(keys, records, out_dir=str(pipeline.layout.root), stage_key=plan.stage_key,
                               params=plan.params, runtime=plan.runtime, workers=plan.workers): (index, len(keys))
                   for index, (keys, records) in enumerate(chunks)}
        done = 0
        _progress(pipeline, stage, done, len(plan.pending))
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
                _progress(pipeline, stage, done, len(plan.pending))
                yield index, outcome

    try:
        summary = run_plan(plan, pipeline.layout, refresh=refresh, execute=execute)
    except StageFailed as failed:
        _publish(pipeline, failed.summary)
        _log_summary(failed.summary)
        log.error("%s", failed.summary["error"])
        raise
    finally:
        pipeline.invalidate(stage)
    _publish(pipeline, summary)
    _log_summary(summary)
    return summary


def _log_summary(summary: dict) -> None:
    """Log what the stage did in the flow run's log (the UI's Logs tab): counts, then the first failures' reasons."""
    with contextlib.suppress(Exception):
        from prefect.logging import get_run_logger

        logger = get_run_logger()
        logger.info("%s: %d processed, %d cached, %d failed in %.1f s", summary["stage"], summary["processed"],
                    summary["cached"], summary["failed"], float(summary["seconds"]))
        for failure in (summary.get("failures") or [])[:5]:
            logger.warning("%s: %s failed: %s", summary["stage"], failure["file"], failure["reason"])


def _progress(pipeline: Pipeline, stage: str, done: int, total: int) -> None:
    """Update the stage's progress artifact (a reporting error never fails a run)."""
    with contextlib.suppress(Exception):
        from flows.artifacts import stage_progress

        stage_progress(stage, done, total, namespace=namespace_of(pipeline))


def namespace_of(pipeline: Pipeline) -> str:
    from flows.artifacts import artifact_namespace

    return artifact_namespace(pipeline.images_dir, pipeline.layout.root)


GALLERY = {"structure": "structure", "regions": "regions", "captions": "regions", "manifest": "manifest"}


def _publish(pipeline: Pipeline, summary: dict) -> None:
    """Send the stage's artifacts to Prefect; a reporting error never fails a run (the data is already on disk).
    Records the CPU seconds it took in ``summary["publish_cpu_s"]`` (galleries, the quality report's plots)."""
    started = time.thread_time()
    try:
        _publish_artifacts(pipeline, summary)
    finally:
        summary["publish_cpu_s"] = round(time.thread_time() - started, 3)


def _publish_artifacts(pipeline: Pipeline, summary: dict) -> None:
    try:
        from flows import artifacts

        namespace = namespace_of(pipeline)
        where = f" from `{pipeline.images_dir}` into `{pipeline.layout.root}`"
        stage = summary["stage"]
        artifacts.publish_stage_summary(artifacts.StageSummary(
            stage, summary["processed"], summary["cached"], summary["failed"], float(summary["seconds"]),
            list(summary.get("failures") or [])), namespace=namespace, where=where)
        if stage in GALLERY and summary["processed"]:
            artifacts.publish_gallery(GALLERY[stage], str(pipeline.layout.root), pipeline.example_rows(stage),
                                      namespace=namespace, where=where)
        if stage == "manifest" and summary["processed"]:
            artifacts.publish_quality(pipeline.layout.root, vocab_dir=pipeline.config.filter.vocab_dir,
                                      namespace=namespace, where=where)
        if stage == "train" and summary["processed"]:
            artifacts.publish_training(pipeline.layout.root, namespace=namespace, where=where)
        if stage == "evaluate" and summary["processed"]:
            artifacts.publish_evaluation(pipeline.layout.root, namespace=namespace, where=where)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not publish %s artifacts: %s", summary["stage"], exc)


def _run_name(prefix: str):
    """Flow run names that name the dataset: ``<prefix>: <images folder> -> <output folder>``."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters or {}
        images = Path(str(parameters.get("images_dir") or "?")).name
        out = Path(str(parameters.get("out_dir") or "?")).name
        return f"{prefix}: {images} -> {out}"

    return name


PARAMETER_DOCS = """
    Args:
        images_dir: Folder of input images (searched recursively) with optional captions.jsonl/csv or NAME.txt.
        out_dir: Output folder (stage store, manifest, maps, crops, train/, eval/); one writer at a time.
        config_path: YAML config; empty = the config recorded in OUT/config.yaml by the run that made the folder,
            else the built-in defaults (the published StructXLIP values)."""


def _stage_flow(stage: str):
    definition = STAGE_DEFINITIONS[stage]

    def stage_flow(images_dir: str, out_dir: str, config_path: str | None = None, refresh: bool = False) -> dict:
        pipeline = open_pipeline(images_dir, out_dir, config_path)
        with lock.output_lock(pipeline.layout):
            return run_stage(pipeline, stage, refresh)

    # Deployments load a flow by "flows/pipeline.py:<stage>_flow"; the function's names must say the same.
    stage_flow.__name__ = stage_flow.__qualname__ = f"{stage}_flow"
    stage_flow.__doc__ = (definition.description + "\n" + PARAMETER_DOCS +
                          "\n        refresh: Recompute this stage even where its results are stored.\n")
    return flow(name=stage, description=definition.description, task_runner=default_runner(),
                validate_parameters=True, flow_run_name=_run_name(stage))(stage_flow)


STAGE_FLOWS = {stage: _stage_flow(stage) for stage in STAGES}
ingest_flow, structure_flow, regions_flow, captions_flow, filter_flow, manifest_flow, train_flow, evaluate_flow = (
    STAGE_FLOWS[s] for s in STAGES)


StageName = Literal["ingest", "structure", "regions", "captions", "filter", "manifest", "train", "evaluate"]
assert get_args(StageName) == STAGES


@flow(name="structxlip-pipeline", description="StructXLIP data preparation, fine-tuning and evaluation, cached per stage.",
      flow_run_name=_run_name("structxlip"))
def structxlip_pipeline(
    images_dir: str,
    out_dir: str,
    config_path: str | None = None,
    stages: list[StageName] | None = None,
    refresh: list[StageName] | None = None,
    runner: Literal["local", "dask"] | None = None,
    dask_address: str | None = None,
) -> dict:
    """Run the requested stages in order as subflows; return ``{"stages": [summary, ...], "seconds", ...}``.

    A stage that fails ends the run (its summary is the last one) and the flow run ends Failed.

    Args:
        images_dir: Folder of input images (searched recursively) with optional captions.jsonl/csv or NAME.txt.
        out_dir: Output folder (stage store, manifest, maps, crops, train/, eval/); one writer at a time.
        config_path: YAML config; empty = the config recorded in OUT/config.yaml by the run that made the folder,
            else the built-in defaults (the published StructXLIP values).
        stages: Stages to run, in pipeline order; empty = all eight.
        refresh: Stages to recompute even where their results are stored.
        runner: "local" (a thread pool in this process) or "dask"; empty = runtime.runner of the config.
        dask_address: A running Dask scheduler; empty with runner "dask" starts a LocalCluster for the run.
    """
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
            stage_flow = STAGE_FLOWS[stage].with_options(task_runner=make_runner(runner, address, pipeline.config.runtime.workers))
            try:
                summaries.append(stage_flow(images_dir=str(pipeline.images_dir), out_dir=str(pipeline.layout.root),
                                            config_path=config_path, refresh=stage in refreshed))
            except StageFailed as exc:
                summaries.append(exc.summary)
                failure = exc
                break
    report = write_report(pipeline, summaries, seconds=time.perf_counter() - started,
                          not_run=[s for s in selected if s not in {x["stage"] for x in summaries}])
    with contextlib.suppress(Exception):  # a report, never a reason to fail the run
        from flows.artifacts import publish_run_summary

        explorer = pipeline.layout.report_index
        publish_run_summary(report, namespace=namespace_of(pipeline), config_source=pipeline.config_source,
                            explorer=str(explorer) if explorer.is_file() else None)
    if failure is not None:
        raise PipelineFailed(report, failure)
    return report


__all__ = ["STAGE_FLOWS", "PipelineFailed", "current_pipeline", "make_runner", "open_pipeline", "run_stage",
           "structxlip_pipeline"]

"""The Prefect flows: the parent ``structxlip-pipeline`` and one flow per stage (each servable as a deployment).

Thin by design: what a stage is, which items are pending and how a chunk is processed live in ``pipelines.engine.stages``,
``pipelines.engine.plan`` and ``pipelines.engine.execute``. A flow maps the pending chunks of its plan over the task runner,
publishes artifacts and ends Failed (red in the UI) when a chunk failed.

Every flow entry behaves like the CLI: the config (``config_path``, else ``OUT/config.yaml`` of the run that made the
folder, else the defaults) with ``overrides`` applied exactly like ``--set``, then the same preflight (models, spaCy,
SAM, a writable output folder) before any stage: a problem ends the run Failed within seconds with the one-line
reason as its state message and nothing computed. The effective config is recorded in ``OUT/config.yaml``, so a CLI
run and a deployment run with the same values key identically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.futures import as_completed
from prefect.settings import temporary_settings
from prefect.states import Failed
from prefect.utilities.annotations import quote

from pipelines.engine.execute import StageFailed, prestart_workers, run_plan, write_report
from pipelines.reporting.report import refresh_explorer
from pipelines.engine.plan import (Pipeline, missing_inputs, preflight, record_config, resolve_config, stale_stages,
                            stages_with_work)
from pipelines.engine.stages import Stage, gallery_images, parse_stages
from storage import lock

from flows import artifacts
from flows.runners import dask_scheduler, default_runner, make_runner, on_threads
from flows.tasks import made_per_stage, stage_task

log = logging.getLogger("structxlip.flows")
_current: list[Pipeline] = []  # the pipeline of the run in progress in this process (config loaded once per run)
ACTIVE_FLOW_RUNS: list[str] = []  # ids of this process's flow runs in progress (an interrupt marks them Cancelled)


class PipelineFailed(RuntimeError):
    """A stage failed; ``report`` holds every stage summary so far (the failed one last)."""

    def __init__(self, report: dict, failed: StageFailed):
        self.report = report
        super().__init__(str(failed))


def _find_current(images_dir: str, out_dir: str) -> Pipeline | None:
    images, out = Path(images_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    return next((pipeline for pipeline in _current if pipeline.images_dir == images and pipeline.layout.root == out),
                None)


def open_pipeline(images_dir: str, out_dir: str, config_path: str | None, overrides: dict | None = None, *,
                  retry_failed: bool = False) -> Pipeline:
    """Return the run's ``Pipeline``: the one the parent flow (or CLI) opened for these folders, else a new one with
    the config resolved like the CLI's (``overrides`` validated like ``--set``)."""
    found = _find_current(images_dir, out_dir)
    if found is not None:
        return found
    config, source = resolve_config(Path(out_dir).expanduser().resolve(), config_path, overrides,
                                    overrides_source="overrides")
    pipeline = Pipeline(images_dir, out_dir, config, retry_failed=retry_failed)
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


@contextlib.contextmanager
def _tracked_flow_run(pipeline: Pipeline):
    """Record the flow run in progress in ``ACTIVE_FLOW_RUNS`` (an interrupted CLI marks those runs Cancelled) and in
    the output folder's lock (a run killed outright leaves them there for the next run to mark Crashed)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run_id = str(context.flow_run.id) if context is not None and context.flow_run is not None else None
    if run_id:
        ACTIVE_FLOW_RUNS.append(run_id)
        _note_flow_runs(pipeline)
    try:
        yield
    except Exception:
        _forget(run_id, pipeline)
        raise
    # A signal (KeyboardInterrupt, Prefect's TerminationSignal) keeps the run listed: the interrupt marks it Cancelled.
    _forget(run_id, pipeline)


def _forget(run_id: str | None, pipeline: Pipeline) -> None:
    if run_id in ACTIVE_FLOW_RUNS:
        ACTIVE_FLOW_RUNS.remove(run_id)
        _note_flow_runs(pipeline)


def _api_identity() -> dict:
    """Which Prefect API this process's runs are recorded in: the database of its ``PREFECT_HOME`` when the CLI runs
    its own temporary server (a new port each run), else the API's URL."""
    from prefect.settings import get_current_settings

    from flows import interrupts

    settings = get_current_settings()
    if interrupts.runs_own_server():
        return {"own_server_home": str(Path(settings.home).expanduser().resolve())}
    return {"api_url": os.environ.get("PREFECT_API_URL") or str(settings.api.url or "")}


def _note_flow_runs(pipeline: Pipeline) -> None:
    with contextlib.suppress(Exception):  # a record for the next run, never a reason to fail this one
        lock.note(pipeline.layout, prefect={**_api_identity(), "flow_runs": list(ACTIVE_FLOW_RUNS)})


def _settle_a_killed_run(pipeline: Pipeline) -> None:
    """When the last run on this output folder was killed outright (SIGKILL, the out-of-memory killer) its Prefect
    runs stayed Running for good: mark those still unfinished Crashed, with a warning, for it and any killed run before
    it that it had not settled. Only runs recorded in the API this process uses; otherwise the record is left for a
    run that uses that API."""
    killed, record = [], lock.left_behind(pipeline.layout)
    while isinstance(record, dict):
        killed.append(record)
        record = record.get("left_behind")
    if not any((record.get("prefect") or {}).get("flow_runs") for record in killed):
        return
    with contextlib.suppress(Exception):
        identity = _api_identity()
        if any({k: v for k, v in (record.get("prefect") or {}).items() if k != "flow_runs"} not in ({}, identity)
               for record in killed):
            return
        from flows import interrupts

        api_url = os.environ.get("PREFECT_API_URL") or identity.get("api_url")
        for record in killed:
            run_ids = (record.get("prefect") or {}).get("flow_runs")
            if not run_ids:
                continue
            who = f"pid {record.get('pid')}, started {record.get('started', '?')} on {record.get('host', '?')}"
            settled = interrupts.settle_flow_runs(api_url, run_ids, {
                "type": "CRASHED", "name": "Crashed",
                "message": f"its process ({who}) was killed before the run finished (SIGKILL, or out of memory)"})
            if settled:
                log.warning("a run on %s (%s) was killed before it finished: its %d unfinished Prefect flow "
                            "run(s) are marked Crashed", pipeline.layout.root, who, settled)
        lock.left_behind_settled(pipeline.layout)


def run_stage(pipeline: Pipeline, stage: str, refresh: bool) -> dict:
    """Plan ``stage``, map its pending chunks over the flow's task runner, publish its artifacts; return the summary."""
    from tqdm import tqdm

    plan = pipeline.plan(stage, refresh=refresh)
    threads = on_threads()
    if not threads:
        plan.processes = 0  # Dask workers are the processes: a chunk runs in the task's own
    task = stage_task(pipeline.stages[stage]).with_options(retries=pipeline.config.runtime.task_retries)

    # quote(): Prefect would otherwise walk every record of every chunk looking for futures to wait on (~1 CPU-s of the
    # run's own process at 1,000 images); the task receives the lists themselves. Only on threads: a quote does not
    # survive pickling to a Dask worker (Prefect 3.8 unpickles quote(x) as quote((x,))).
    unvisited = quote if threads else (lambda value: value)

    def execute(chunks):
        futures = {task.submit(unvisited(keys), unvisited(records), out_dir=str(pipeline.layout.root),
                               stage_key=plan.stage_key, params=plan.params, runtime=plan.runtime,
                               processes=plan.processes): (index, len(keys))
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

    with _tracked_flow_run(pipeline):
        try:
            summary = run_plan(plan, pipeline.layout, refresh=refresh, execute=execute)
        except StageFailed as failed:
            _publish(pipeline, failed.summary, plan.pending)
            _log_summary(failed.summary)
            log.error("%s", failed.summary["error"])
            raise
        finally:
            pipeline.invalidate(stage)
        _publish(pipeline, summary, plan.pending)
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
        artifacts.stage_progress(stage, done, total, namespace=namespace_of(pipeline))


def namespace_of(pipeline: Pipeline) -> str:
    return artifacts.artifact_namespace(pipeline.images_dir, pipeline.layout.root)


def _publish(pipeline: Pipeline, summary: dict, pending: list) -> None:
    """Send the stage's artifacts to Prefect; a reporting error never fails a run (the data is already on disk).
    Records ``{artifact label: artifact id}`` in ``summary["artifacts"]`` (the run summary links them) and the CPU
    seconds it took in ``summary["publish_cpu_s"]`` (galleries, the quality report's plots). ``pending``: the items the
    stage computed in this run, whose images its gallery shows."""
    started = time.thread_time()
    published: dict[str, Any] = {}
    try:
        namespace = namespace_of(pipeline)
        where = f" from `{pipeline.images_dir}` into `{pipeline.layout.root}`"
        stage = summary["stage"]
        ids = artifacts.publish_stage_summary(artifacts.StageSummary(
            stage, summary["processed"], summary["cached"], summary["failed"], float(summary["seconds"]),
            list(summary.get("failures") or [])), namespace=namespace, where=where)
        published.update({f"{stage} {kind}": value for kind, value in ids.items()})
        definition = pipeline.stages[stage]
        if definition.gallery and summary["processed"]:
            published[f"{stage} gallery"] = artifacts.publish_gallery(
                definition.gallery, str(pipeline.layout.root),
                definition.example_rows(pipeline, gallery_images(pipeline, pending)), namespace=namespace, where=where)
        if definition.report and summary["processed"]:
            published.update(REPORTS[definition.report](pipeline, namespace=namespace, where=where))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not publish %s artifacts: %s", summary["stage"], exc)
    summary["artifacts"] = {label: str(value) for label, value in published.items() if value is not None}
    summary["publish_cpu_s"] = round(time.thread_time() - started, 3)


def _quality_report(pipeline: Pipeline, *, namespace: str, where: str) -> dict:
    quality = artifacts.publish_quality(pipeline.layout.root, vocab_dir=pipeline.config.filter.vocab_dir,
                                        namespace=namespace, where=where)
    return {f"quality {name.replace('_', ' ')}": value for name, value in quality.items()}


def _training_report(pipeline: Pipeline, *, namespace: str, where: str) -> dict:
    return {"training curves": artifacts.publish_training(pipeline.layout.root, namespace=namespace, where=where)}


def _evaluation_report(pipeline: Pipeline, *, namespace: str, where: str) -> dict:
    recall = artifacts.publish_evaluation(pipeline.layout.root, namespace=namespace, where=where) or {}
    return {f"recall {kind}": value for kind, value in recall.items()}


# Stage.report -> the artifacts published after the stage computed something.
REPORTS = {"quality": _quality_report, "training": _training_report, "evaluation": _evaluation_report}


# Prefect 3.8 joins a heartbeat thread (which sleeps in 1 s steps) at the end of every flow run: 0-1 s each. Stage
# subflows need no heartbeat (their parent has one); nor does a run on its own temporary server (flows.commands),
# which nobody watches for crashed runs and which ends with the run.
NO_HEARTBEATS = {"flows.heartbeat_frequency": None}


def _run_name(prefix: str):
    """Flow run names that name the dataset: ``<prefix>: <images folder> -> <output folder>``."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters or {}
        images = Path(str(parameters.get("images_dir") or "?")).name
        out = Path(str(parameters.get("out_dir") or "?")).name
        return f"{prefix}: {images} -> {out}"

    return name


# ---- a flow entry: what the CLI does before and after the stages ----------------------------------------------------
def run_entry(images_dir: str, out_dir: str, *, config_path: str | None, overrides: dict | None, retry_failed: bool,
              stages: list[str] | None, refresh: list[str] | None, runner: str | None = None,
              dask_address: str | None = None, inline_first: bool = False, downstream: bool = False) -> dict | Failed:
    """Run ``stages`` (None: all of the config's stages, plugins included) as one entry (the parent flow, or a stage
    flow run on its own) and return the run report.

    Outside the CLI (a deployment, a served flow, a script), the config is resolved and preflighted here first: a
    problem returns a Failed state whose message is the one-line reason, before anything is computed or created.
    ``inline_first`` runs the first stage in this flow run (a stage flow), the others as subflows; ``downstream``
    adds every stage after the first one.
    """
    started = time.perf_counter()
    nested = _find_current(images_dir, out_dir) is not None  # the CLI opened it: config, preflight and lock done
    try:
        pipeline = open_pipeline(images_dir, out_dir, config_path, overrides, retry_failed=retry_failed)
        names = list(pipeline.stages)
        stages = parse_stages(stages, names)
        if downstream:
            stages = names[names.index(stages[0]):]
        refresh = parse_stages(refresh, names) if refresh else []
        if not nested:
            problem = missing_inputs(pipeline, stages)
            if problem:
                raise ValueError(problem)
            with_work = stages_with_work(pipeline, stages, set(refresh))
            preflight(pipeline, with_work)
    except (ValueError, OSError, RuntimeError) as exc:  # ConfigError is a ValueError
        log.error("%s", exc)
        return Failed(message=" ".join(str(exc).split()))
    runner = runner or pipeline.config.runtime.runner
    if not nested:  # the CLI started them as it planned
        prestart_workers(pipeline, with_work, runner)
    summaries: list[dict] = []
    failure: StageFailed | None = None
    try:
        held = lock.output_lock(pipeline.layout)
        held.__enter__()
    except RuntimeError as exc:  # another run holds the folder, or it cannot be written
        return Failed(message=str(exc))
    try:
        with current_pipeline(pipeline), _tracked_flow_run(pipeline), contextlib.ExitStack() as stack:
            _settle_a_killed_run(pipeline)
            stack.enter_context(temporary_settings(updates=NO_HEARTBEATS))
            record_config(pipeline.layout, pipeline.config)
            address = dask_address or pipeline.config.runtime.dask_address
            if runner == "dask":
                address = stack.enter_context(dask_scheduler(address, pipeline.config.runtime.dask_workers))
            for index, stage in enumerate(stages):
                try:
                    if inline_first and index == 0:
                        summaries.append(run_stage(pipeline, stage, stage in refresh))
                        continue
                    stage_flow = flow_of(pipeline.stages[stage]).with_options(
                        task_runner=make_runner(runner, address, pipeline.config.runtime.workers))
                    summaries.append(stage_flow(images_dir=str(pipeline.images_dir),
                                                out_dir=str(pipeline.layout.root), refresh=stage in refresh))
                except StageFailed as exc:
                    summaries.append(exc.summary)
                    failure = exc
                    break
        report = write_report(pipeline, summaries, seconds=time.perf_counter() - started,
                              not_run=[s for s in stages if s not in {x["stage"] for x in summaries}],
                              stale=stale_stages(pipeline, stages) if failure is None else [])
        report["explorer"] = refresh_explorer(pipeline.layout, summaries, vocab_dir=pipeline.config.filter.vocab_dir)
    finally:
        held.__exit__(None, None, None)
    with contextlib.suppress(Exception):  # a report, never a reason to fail the run
        artifacts.publish_run_summary(report, namespace=namespace_of(pipeline), config_source=pipeline.config_source,
                                      explorer=report["explorer"], metrics_path=str(pipeline.layout.eval_metrics))
    if failure is not None:
        raise PipelineFailed(report, failure)
    return report


PARAMETER_DOCS = """
    Args:
        images_dir: Folder of input images (searched recursively) with optional captions.jsonl/csv or NAME.txt.
        out_dir: Output folder (stage store, manifest, maps, crops, train/, eval/); one writer at a time.
        config_path: YAML config; empty = the config recorded in OUT/config.yaml by the run that made the folder,
            else the built-in defaults (the published StructXLIP values).
        overrides: Config values to change, as {"section.key": value}, e.g. {"structure.canny_low": 50}: the same
            as the CLI's --set; validated before anything runs.
        retry_failed: Recompute items whose failure is cached (e.g. after a library upgrade)."""


def _stage_flow(definition: Stage):
    stage = definition.name

    def stage_flow(images_dir: str, out_dir: str, config_path: str | None = None,
                   overrides: dict[str, Any] | None = None, refresh: bool = False, retry_failed: bool = False,
                   downstream: bool = False) -> dict:
        if _find_current(images_dir, out_dir) is not None:  # a subflow of the parent (or the CLI's) run
            return run_stage(open_pipeline(images_dir, out_dir, config_path), stage, refresh)
        return run_entry(images_dir, out_dir, config_path=config_path, overrides=overrides,
                         retry_failed=retry_failed, stages=[stage], refresh=[stage] if refresh else [],
                         inline_first=True, downstream=downstream)

    # Deployments load a flow by "flows/pipeline.py:<stage>_flow"; the function's names must say the same.
    stage_flow.__name__ = stage_flow.__qualname__ = f"{stage}_flow"
    stage_flow.__doc__ = (definition.description + "\n" + PARAMETER_DOCS +
                          "\n        refresh: Recompute this stage even where its results are stored."
                          "\n        downstream: Also run every later stage, so none is left computed from older "
                          "inputs.\n")
    return flow(name=stage, description=definition.description, task_runner=default_runner(),
                validate_parameters=True, flow_run_name=_run_name(stage))(stage_flow)


# Plugin stages' flows are made on first use, and are not module attributes, so that a flow run in a fresh process (a
# served deployment) is sent there by value instead of looked up in a module that does not define it.
STAGE_FLOWS, flow_of = made_per_stage(_stage_flow)
globals().update({f"{stage}_flow": stage_flow for stage, stage_flow in STAGE_FLOWS.items()})


@flow(name="structxlip-pipeline", description="StructXLIP data preparation, fine-tuning and evaluation, cached per stage.",
      flow_run_name=_run_name("structxlip"))
def structxlip_pipeline(
    images_dir: str,
    out_dir: str,
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    stages: list[str] | None = None,
    refresh: list[str] | None = None,
    retry_failed: bool = False,
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
        overrides: Config values to change, as {"section.key": value}, e.g. {"structure.canny_low": 50}: the same
            as the CLI's --set; validated before anything runs.
        stages: Stages to run, in pipeline order (ingest, structure, regions, captions, filter, manifest, train,
            evaluate and the config's plugin stages); empty = all of them.
        refresh: Stages to recompute even where their results are stored.
        retry_failed: Recompute items whose failure is cached (e.g. after a library upgrade).
        runner: "local" (a thread pool in this process) or "dask"; empty = runtime.runner of the config.
        dask_address: A running Dask scheduler; empty with runner "dask" starts a LocalCluster for the run.
    """
    return run_entry(images_dir, out_dir, config_path=config_path, overrides=overrides, retry_failed=retry_failed,
                     stages=stages, refresh=refresh, runner=runner, dask_address=dask_address)


__all__ = ["ACTIVE_FLOW_RUNS", "STAGE_FLOWS", "PipelineFailed", "flow_of", "current_pipeline", "make_runner", "open_pipeline",
           "run_entry", "run_stage", "structxlip_pipeline"]

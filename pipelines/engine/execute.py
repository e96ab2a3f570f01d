"""Executing a stage plan: run chunks through the library with per-item isolation, record them in the stage store,
and summarise. The orchestrator (Prefect tasks in ``flows/``, or plain calls) only decides *where* a chunk runs.

Failure rules:
- An exception while processing one item (an undecodable crop, a 2 MB caption spaCy refuses) becomes that item's
  ``failed`` row with a one-line reason; the chunk is retried item by item so the other items complete.
- An environment error (``pipelines.steps.errors``: a model that cannot load, CUDA out of memory, the network, a full or
  read-only disk) fails the whole chunk: nothing of it is recorded, so the next run retries it once the cause is
  fixed. The stage then ends failed. So does any error of a whole-dataset stage (manifest, train, evaluate): a failed
  training is never recorded as done.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

import logging

import pyarrow.compute as pc

from pipelines.engine import workers as pool
from pipelines.steps.errors import REASON_CHARS, describe_failure, is_environment_error, one_line
from pipelines.engine.plan import StagePlan, first_failures, manifest_failures, stages_with_work
from pipelines.engine.stages import Stage, find_stage
from storage.layout import OutputLayout
from storage.manifest import STATUS_FAILED, STATUS_OK
from storage.stage_store import ITEM_KEY, OUTPUTS, StageStore, output_records

log = logging.getLogger("structxlip.execute")


class StageFailed(RuntimeError):
    """A stage could not finish (a chunk hit an environment error, or a whole-dataset stage failed); carries its
    summary."""

    def __init__(self, summary: dict):
        self.summary = summary
        super().__init__(f"stage {summary['stage']} failed: {summary.get('error') or 'see its summary'}")


def _run_isolated(stage: Stage, records: list, layout: OutputLayout, call: Callable[[list], list[dict]]) -> list[dict]:
    """Run ``call`` on the chunk; if it raises for an item (not the environment: ``pipelines.steps.errors``), run each
    record alone so one bad item fails alone."""
    try:
        rows = call(records)
        if len(rows) != len(records):
            raise RuntimeError(f"{stage.name}: expected {len(records)} results for the chunk, got {len(rows)}")
        return rows
    except Exception as exc:
        if stage.whole or is_environment_error(exc, layout.root):
            raise  # nothing is recorded: the stage ends failed and the next run retries
        if len(records) == 1:
            return [stage.failed_row(records[0], f"{stage.name} failed: {one_line(exc)}")]
    return [row for record in records for row in _run_isolated(stage, [record], layout, call)]


def compute_rows(stage_name: str, records: list, *, out_dir: str, stage_key: str, params: dict,
                 runtime: dict, source: str | None = None) -> list[dict]:
    """Run one chunk through the stage's library call with per-item isolation; return one output row per record.
    ``source``: the plugin file defining the stage (None: a built-in stage)."""
    stage = find_stage(stage_name, source)
    layout = OutputLayout(out_dir)

    def call(chunk: list) -> list[dict]:
        return stage.run(chunk, layout=layout, stage_key=stage_key, params=params, runtime=runtime)

    return _run_isolated(stage, list(records), layout, call)


def record_rows(stage_name: str, item_keys: list[str], records: list, outputs: list[dict], *, out_dir: str,
                stage_key: str, source: str | None = None) -> dict:
    """Verify the chunk's outputs, record its rows as one store part; return ``{part, ok, failures, results}``.

    ``failures``: ``[{item_key, file, reason}]``; ``results``: the ``result`` column of whole-dataset stages.
    """
    stage = find_stage(stage_name, source)
    layout = OutputLayout(out_dir)
    rows = []
    failures = []
    for key, record, output in zip(item_keys, records, outputs):
        row = {**output, ITEM_KEY: key}
        if row.get("status") == STATUS_OK:
            try:
                row[OUTPUTS] = output_records(layout.root, stage.output_paths(row))
            except FileNotFoundError as exc:
                row.update(status=STATUS_FAILED, error=f"{stage.name}: output was not written ({exc.filename})")
        if row.get("status") != STATUS_OK:
            row["status"] = STATUS_FAILED
            reason = " ".join(str(row.get("error") or "unknown error").split())[:REASON_CHARS]
            row["error"] = reason
            failures.append({ITEM_KEY: key, "file": stage.label(record), "reason": reason})
        rows.append(row)
    part = StageStore(layout, stage_name, stage_key, stage.schema).write_part(rows)
    return {"part": part.name, "ok": len(rows) - len(failures), "failures": failures,
            "results": [r.get("result") for r in rows if r.get("status") == STATUS_OK and r.get("result")]}


def process_chunk(stage_name: str, item_keys: list[str], records: list, *, out_dir: str, stage_key: str,
                  params: dict, runtime: dict, source: str | None = None) -> dict:
    """Process one chunk in this process and record it as one store part (see ``record_rows``)."""
    outputs = compute_rows(stage_name, records, out_dir=out_dir, stage_key=stage_key, params=params, runtime=runtime,
                           source=source)
    return record_rows(stage_name, item_keys, records, outputs, out_dir=out_dir, stage_key=stage_key, source=source)


def _submit(executor, stage_name: str, records: list, options: dict) -> list[dict]:
    return executor.submit(compute_rows, stage_name, records, **options).result()


def _worker_modules(stage_name: str, options: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(skips, imports)`` of the stage's worker processes (``Stage.worker_skips``, ``Stage.worker_imports``)."""
    definition = find_stage(stage_name, options.get("source"))
    return definition.worker_skips(options["params"]), definition.worker_imports(options["params"], options["runtime"])


def _compute_alone(workers: int, stage_name: str, records: list, options: dict) -> list[dict]:
    """Compute the chunk in a worker of its own; if that worker dies, split it down to single items, each alone, and
    fail an item whose own worker dies."""
    with pool.alone(workers, *_worker_modules(stage_name, options)) as executor:
        try:
            return _submit(executor, stage_name, records, options)
        except BrokenProcessPool:
            pass
    if len(records) > 1:
        return [row for record in records for row in _compute_alone(workers, stage_name, [record], options)]
    return [find_stage(stage_name, options.get("source")).failed_row(
        records[0], f"{stage_name} failed: the worker process died while processing it (crash or out of memory)")]


def compute_isolated(workers: int, stage_name: str, records: list, **options) -> list[dict]:
    """Return the chunk's output rows computed in a worker process. A broken pool breaks every chunk in flight, so
    a chunk it broke is computed again alone (``_compute_alone``): only an item whose own worker dies fails."""
    executor = pool.pool(workers, stage_name, *_worker_modules(stage_name, options))
    try:
        return _submit(executor, stage_name, records, options)
    except BrokenProcessPool:
        pool.discard(executor)
    return _compute_alone(workers, stage_name, records, options)


def run_chunk(stage_name: str, item_keys: list[str], records: list, *, out_dir: str, stage_key: str, params: dict,
              runtime: dict, processes: int = 0, source: str | None = None) -> dict:
    """Process one chunk: in one of the ``processes`` engine worker processes, or in this process (0). The caller's
    process records the part either way, so a worker only computes. ``source``: a plugin stage's file."""
    if processes <= 0:
        return process_chunk(stage_name, item_keys, records, out_dir=out_dir, stage_key=stage_key, params=params,
                             runtime=runtime, source=source)
    outputs = compute_isolated(processes, stage_name, records, out_dir=out_dir, stage_key=stage_key,
                               params=params, runtime=runtime, source=source)
    return record_rows(stage_name, item_keys, records, outputs, out_dir=out_dir, stage_key=stage_key, source=source)


def chunks_of(plan: StagePlan) -> list[tuple[list[str], list]]:
    """Split the pending items into ``(item_keys, records)`` chunks in item-key order (deterministic)."""
    pending, chunk_size = plan.pending, plan.chunk_size
    return [([k for k, _ in pending[i:i + chunk_size]], [r for _, r in pending[i:i + chunk_size]])
            for i in range(0, len(pending), chunk_size)]


def run_plan(plan: StagePlan, layout: OutputLayout, *, refresh: bool,
             execute: Callable[[list[tuple[list[str], list]]], Iterable[tuple[int, dict | BaseException]]]) -> dict:
    """Execute ``plan`` with ``execute`` (yields ``(chunk index, chunk result or exception)`` as chunks finish) and
    return the stage summary. Raises ``StageFailed`` (after the summary is complete) when a chunk failed."""
    started = time.perf_counter()
    chunks = chunks_of(plan)
    results: list[dict] = []
    chunk_errors: list[str] = []
    unfinished = 0  # items of failed chunks: pending again next run
    for index, outcome in execute(chunks) if chunks else ():
        if isinstance(outcome, BaseException):
            chunk_errors.append(describe_failure(outcome, layout.root))
            unfinished += len(chunks[index][0])
        else:
            results.append(outcome)
    if results:
        store = StageStore(layout, plan.stage, plan.stage_key, find_stage(plan.stage, plan.source).schema)
        if refresh:
            store.remove_superseded([store.folder / r["part"] for r in results])
        try:
            store.compact()
        except OSError as exc:  # the parts as they are stay valid: the next run compacts them
            log.warning("%s: could not compact the stage's store parts (%s)", plan.stage,
                        describe_failure(exc, layout.root))
    summary = summarize(plan, results, chunk_errors, time.perf_counter() - started)
    summary["failed"] += unfinished
    summary["unfinished"] = unfinished
    if chunk_errors:
        raise StageFailed(summary)
    return summary


def execute_inline(plan: StagePlan, layout: OutputLayout
                   ) -> Callable[[list], Iterator[tuple[int, dict | BaseException]]]:
    """Return an ``execute`` for ``run_plan`` without an orchestrator: ``plan.workers`` chunks at a time (one after
    another when 1), each in this process or in the engine's worker processes (``plan.processes``; threads here only
    wait for them)."""

    def one(chunk: tuple[list[str], list]) -> dict:
        keys, records = chunk
        return run_chunk(plan.stage, keys, records, out_dir=str(layout.root), stage_key=plan.stage_key,
                         params=plan.params, runtime=plan.runtime, processes=plan.processes, source=plan.source)

    def execute(chunks):
        if plan.workers <= 1:
            for index, chunk in enumerate(chunks):
                try:
                    yield index, one(chunk)
                except Exception as exc:  # noqa: BLE001 - a failed chunk is reported, the others still run
                    yield index, exc
            return
        from concurrent import futures

        with futures.ThreadPoolExecutor(min(plan.workers, len(chunks))) as threads:
            submitted = {threads.submit(one, chunk): index for index, chunk in enumerate(chunks)}
            for future in futures.as_completed(submitted):
                try:
                    yield submitted[future], future.result()
                except Exception as exc:  # noqa: BLE001 - a failed chunk is reported, the others still run
                    yield submitted[future], exc

    return execute


def summarize(plan: StagePlan, results: list[dict], chunk_errors: list[str], seconds: float) -> dict:
    """Return the stage summary: processed (new ok), cached (reused ok), failed (new + cached), seconds, failures."""
    new_failures = [f for r in results for f in r["failures"]]
    cached_failed = plan.cached_failed
    summary = _summary(plan.stage, plan.stage_key, plan.params, plan.source, processed=sum(r["ok"] for r in results),
                       cached=plan.cached.num_rows - cached_failed, cached_failed=cached_failed,
                       new_failed=len(new_failures), failures=first_failures(plan, new_failures),
                       chunk_errors=chunk_errors, seconds=seconds)
    if find_stage(plan.stage, plan.source).counts_rows:
        stored = [json.loads(r) for result in results for r in result["results"]]
        if "result" in plan.cached.column_names:
            stored += [json.loads(r) for r in plan.cached.column("result").to_pylist() if r]
        # The first failed rows, by file: from the rows the manifest was built from (this run's plan), else the
        # manifest's own.
        built = [row for _key, record in plan.pending if isinstance(record, dict)
                 for row in record.get("rows") or [] if row.get("status") == STATUS_FAILED]
        failures = manifest_failures(built[:3], cached=not results) if plan.pending else plan.cached_failures
        _manifest_counts(summary, stored[0] if stored else None, failures,
                         written=bool(results))
    return summary


def _summary(stage: str, stage_key: str, params: dict, source: str | None, *, processed: int, cached: int,
             cached_failed: int, new_failed: int, failures: list[dict], chunk_errors: list[str],
             seconds: float) -> dict:
    summary: dict[str, Any] = {
        "stage": stage,
        "stage_key": stage_key,
        "processed": processed,
        "cached": cached,
        "failed": new_failed + cached_failed,
        "failed_cached": cached_failed,
        "seconds": round(seconds, 3),
        "failures": failures,
        "chunk_errors": chunk_errors,
        "status": "failed" if chunk_errors else "completed",
    }
    for resolved in find_stage(stage, source).summary_params:
        summary[resolved] = params[resolved]
    if chunk_errors:
        summary["error"] = (f"{len(chunk_errors)} chunk(s) failed ({chunk_errors[0]}); fix the cause and run the same "
                            "command again: finished work is kept")
    return summary


def _manifest_counts(summary: dict, info: dict | None, failures: list[dict], *, written: bool) -> None:
    """The manifest is one item, but its table counts rows: written now vs kept, plus duplicates left out;
    ``failures``: its first failed rows, as many as the table shows."""
    if info is None:
        return
    written_rows = info.get("written_rows", 0) if written else 0
    rows = info.get("rows", 0)
    failed = rows - info.get("ok", rows)  # rows of images that failed a stage or have no caption
    summary.update(processed=written_rows, cached=rows - written_rows, failed=failed, rows=rows, ok=info.get("ok", 0),
                   duplicates=info.get("duplicates", 0), failures=failures)


def write_report(pipeline, summaries: list[dict], *, seconds: float, not_run: list[str],
                 stale: list[str] | None = None) -> dict:
    """Write ``OUT/runs/<timestamp>.json`` (every stage summary of this run) and return the report. ``stale``: later
    stages whose stored results were computed from older inputs. Failing to write the record (a full disk) never
    loses the report: ``record_error`` says why."""
    from storage.atomic import atomic_write_text

    report = {
        "images_dir": str(pipeline.images_dir),
        "out_dir": str(pipeline.layout.root),
        "stages": summaries,
        "not_run": not_run,
        "stale": list(stale or []),
        "seconds": round(seconds, 3),
        "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
    try:
        atomic_write_text(pipeline.layout.run_summary(stamp), json.dumps(report, indent=2, default=str))
    except OSError as exc:
        report["record_error"] = describe_failure(exc, pipeline.layout.root)
    return report


def format_summary(report: dict) -> str:
    """Return the end-of-run table: one line per stage with processed, cached, failed and seconds."""
    lines = [f"{'stage':<10} {'processed':>9} {'cached':>7} {'failed':>7} {'seconds':>8}"]
    for s in report["stages"]:
        lines.append(f"{s['stage']:<10} {s['processed']:>9} {s['cached']:>7} {s['failed']:>7} {s['seconds']:>8.2f}")
        shown = (s.get("failures") or [])[:3]  # the first three of each stage; the artifact lists more
        for failure in shown:
            cached = " (cached)" if failure.get("cached") else ""
            lines.append(f"  x {failure['file']}: {failure['reason']}{cached}")
        # Items of failed chunks count as failed but are not item failures: their chunk's line says why.
        unfinished = s.get("unfinished") or 0
        more = s["failed"] - unfinished - len(shown)
        if more > 0:
            where = "the manifest's error column" if "rows" in s else \
                f"the {s['stage']}-failures artifact or the manifest"
            lines.append(f"  x ... {more} more (see {where})" if shown else f"  x {more} failed (see {where})")
        for number, error in enumerate(s.get("chunk_errors") or []):
            pending = f"; {unfinished} item(s) pending" if unfinished and number == 0 else ""
            lines.append(f"  ! chunk failed (retried next run{pending}): {error}")
        if s.get("duplicates"):
            lines.append(f"  {s['duplicates']} duplicate file(s) merged into the row of the same bytes (see duplicate_paths)")
    for stage in report.get("not_run") or []:
        lines.append(f"{stage:<10} {'not run (an earlier stage failed)':>36}")
    lines.append(f"total {report['seconds']:.1f} s; outputs in {report['out_dir']}")
    return "\n".join(lines)


def prestart_workers(pipeline, stages: list[str], runner: str | None = None) -> bool:
    """Start the forkservers of the engine workers for a run of ``stages`` (those with work) on this machine: one per
    kind of CPU stage (``Stage.worker_imports`` preloaded, ``Stage.worker_skips`` kept out), each importing in the
    background (``workers.prestart``). Call it as the run starts, before the first stage, from the main thread; it also
    starts the resource tracker (``workers.start_tracker``). Return whether a forkserver started: not with a Dask
    runner or ``runtime.workers: 1`` (no engine workers), nor for kinds already running in this process."""
    config = pipeline.config
    if (runner or config.runtime.runner) != "local" or config.runtime.workers == 1:
        return False
    kinds = []
    for stage in stages:
        definition = pipeline.stages[stage]
        params, runtime = definition.params(config).model_dump(), definition.runtime(config)
        if definition.on_cpu(params, runtime):
            kinds.append(pool.kind(definition.worker_imports(params, runtime), definition.worker_skips(params)))
    if not kinds:
        return False
    pool.start_tracker()  # from this (the main) thread, ignoring what a signal to the run's group leaves to the run
    return pool.prestart(kinds)


def run_inline(pipeline, stages: list[str], *, refresh: tuple[str, ...] = ()) -> list[dict]:
    """Run ``stages`` in this process without an orchestrator (tests, benchmarks, notebooks); return the summaries.
    Raises ``StageFailed`` like the flows do."""
    prestart_workers(pipeline, stages_with_work(pipeline, stages, set(refresh)))
    summaries = []
    for stage in stages:
        plan = pipeline.plan(stage, refresh=stage in refresh)
        try:
            summaries.append(run_plan(plan, pipeline.layout, refresh=stage in refresh,
                                      execute=execute_inline(plan, pipeline.layout)))
        finally:
            pipeline.invalidate(stage)
    return summaries

"""Prefect tasks: one verb-noun task per stage (``Stage.task_name``: ``extract_structure``), each a thin wrapper
over ``pipelines.engine.execute.run_chunk`` (the chunk is computed in the engine's worker processes, or in the task's own
process on a Dask worker).

What is done is decided by the stage store alone (``pipelines.engine.plan``), never by a Prefect cache: tasks run with
``NO_CACHE`` and persist no results. A retried or resumed chunk is simply pending again until its part is written.
"""

from __future__ import annotations

from typing import Any, Callable

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from pipelines.engine.stages import STAGE_DEFINITIONS, Stage


def _chunk_task(stage: Stage) -> Task:
    name, source = stage.name, stage.source

    def run(item_keys: list[str], records: list, *, out_dir: str, stage_key: str, params: dict, runtime: dict,
            processes: int = 0) -> dict:
        from pipelines.engine.execute import run_chunk
        from pipelines.engine.workers import Stopping

        try:
            return run_chunk(name, item_keys, records, out_dir=out_dir, stage_key=stage_key, params=params,
                             runtime=runtime, processes=processes, source=source)
        except Stopping as stopping:  # an interrupt's clean-up killed its workers: not a failure of the chunk
            from prefect.states import Cancelled

            return Cancelled(message=f"interrupted: {stopping}")

    run.__name__ = run.__qualname__ = stage.task_name
    run.__doc__ = stage.task_doc
    return task(name=stage.task_name, cache_policy=NO_CACHE, persist_result=False)(run)


def made_per_stage(factory: Callable[[Stage], Any]) -> tuple[dict[str, Any], Callable[[Stage], Any]]:
    """Return ``(built-in stage name -> factory(stage), lookup)``: ``lookup(stage)`` gives a built-in stage's object,
    or the object made (once per plugin file) for a plugin stage."""
    built_in = {name: factory(stage) for name, stage in STAGE_DEFINITIONS.items()}
    plugins: dict[tuple[str, str], Any] = {}

    def lookup(stage: Stage) -> Any:
        if stage.source is None:
            return built_in[stage.name]
        key = (stage.name, stage.source)
        if key not in plugins:
            plugins[key] = factory(stage)
        return plugins[key]

    return built_in, lookup


STAGE_TASKS, stage_task = made_per_stage(_chunk_task)

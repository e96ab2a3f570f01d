"""Prefect tasks: one verb-noun task per stage, each a thin wrapper over ``pipelines.engine.run_chunk``
(the chunk is computed in the engine's worker processes, or in the task's own process on a Dask worker).

What is done is decided by the stage store alone (``pipelines.plan``), never by a Prefect cache: tasks run with
``NO_CACHE`` and persist no results. A retried or resumed chunk is simply pending again until its part is written.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.schema import STAGES


def _chunk_task(name: str, stage: str, doc: str):
    def run(item_keys: list[str], records: list, *, out_dir: str, stage_key: str, params: dict, runtime: dict,
            processes: int = 0) -> dict:
        from pipelines.engine import run_chunk

        return run_chunk(stage, item_keys, records, out_dir=out_dir, stage_key=stage_key, params=params,
                         runtime=runtime, processes=processes)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = doc
    return task(name=name, cache_policy=NO_CACHE, persist_result=False)(run)


STAGE_TASKS = {
    "ingest": _chunk_task("ingest_images", "ingest", "Hash, open and measure one chunk of source files."),
    "structure": _chunk_task("extract_structure", "structure", "Write the structure maps of one chunk of images."),
    "regions": _chunk_task("propose_regions", "regions", "Propose regions and write crops for one chunk of images."),
    "captions": _chunk_task("score_local_captions", "captions", "Assign caption sentences to regions (CLIP scores)."),
    "filter": _chunk_task("filter_captions", "filter", "Remove appearance words and build hard negatives."),
    "manifest": _chunk_task("write_manifest", "manifest", "Join every stage's rows into the manifest."),
    "train": _chunk_task("train_model", "train", "Fine-tune CLIP on the manifest's train split (resumes a checkpoint)."),
    "evaluate": _chunk_task("evaluate_model", "evaluate", "Retrieval metrics of the fine-tuned model."),
}
assert tuple(STAGE_TASKS) == STAGES

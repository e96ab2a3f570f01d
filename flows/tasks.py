"""Prefect tasks: thin verb-noun wrappers that run one chunk of records through a library function and write the
chunk's Parquet part. Each returns the rows it wrote, so a cache hit can restore a part that was deleted.

Caching: ``ChunkCachePolicy`` keys a task run by its stage key, the chunk's item keys and the task's code, never by
the run id, so a later run (or a resumed, killed one) reuses finished chunks from ``OUT/.prefect/results``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE, CachePolicy, TaskSource

from storage.hashing import content_key
from storage.layout import OutputLayout
from storage.stage_store import ITEM_KEY, StageStore

from flows.stages import STAGE_SCHEMAS

# Bump to invalidate every cached chunk result (e.g. when the returned payload changes shape).
TASK_CACHE_VERSION = "1"


@dataclass
class ChunkCachePolicy(CachePolicy):
    """Cache key = task name + task source + stage key + the chunk's sorted item keys (no run id, no paths)."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        if not inputs or "item_keys" not in inputs or "stage_key" not in inputs:
            return None
        source = TaskSource().compute_key(task_ctx, inputs, flow_parameters) if task_ctx else None
        name = task_ctx.task.name if task_ctx else ""
        return content_key(TASK_CACHE_VERSION, name, source, inputs["stage_key"], sorted(inputs["item_keys"]), length=32)


# ---- heavy objects, built once per worker process and reused across chunks ------------------------------------------
_shared: dict[tuple, tuple[Any, threading.Lock]] = {}
_shared_lock = threading.Lock()


def shared(key: tuple, factory: Callable[[], Any]) -> tuple[Any, threading.Lock]:
    """Return the process-wide object for ``key`` (built by ``factory`` the first time) and the lock to hold while
    using it: tokenizers and spaCy pipelines are not safe to call from two threads at once, and torch already
    spreads one batch over every core, so chunks sharing a model take turns."""
    with _shared_lock:
        if key not in _shared:
            _shared[key] = (factory(), threading.Lock())
        return _shared[key]


def _write(out_dir: str, stage: str, stage_key: str, item_keys: list[str], outputs: list[dict]) -> dict:
    """Attach item keys to a library's outputs (one per input, same order), write the part; return the payload."""
    if len(outputs) != len(item_keys):
        raise RuntimeError(f"{stage}: expected {len(item_keys)} results for the chunk, got {len(outputs)}")
    rows = [{**output, ITEM_KEY: key} for key, output in zip(item_keys, outputs)]
    store = StageStore(OutputLayout(out_dir), stage, stage_key, STAGE_SCHEMAS[stage])
    part = store.write_part(rows)
    return {"part": part.name, "rows": rows}


# ---- stage tasks --------------------------------------------------------------------------------------------------
@task(name="ingest_images", persist_result=True)
def ingest_images(records: list, *, item_keys: list[str], out_dir: str, stage_key: str, options: dict) -> dict:
    """Hash, open and measure one chunk of source files; return ``{"part", "rows"}``."""
    from pipelines.ingest import ingest_images as run

    outputs = run(records, **options)
    return _write(out_dir, "ingest", stage_key, item_keys, outputs)


@task(name="extract_structure", persist_result=True)
def extract_structure(records: list[dict], *, item_keys: list[str], out_dir: str, stage_key: str, options: dict) -> dict:
    """Write the structure maps of one chunk of images; return ``{"part", "rows"}``."""
    from pipelines.structure import extract_structure as run

    outputs = run(records, layout=OutputLayout(out_dir), stage_key=stage_key, **options)
    return _write(out_dir, "structure", stage_key, item_keys, outputs)


@task(name="propose_regions", persist_result=True)
def propose_regions(records: list[dict], *, item_keys: list[str], out_dir: str, stage_key: str, options: dict) -> dict:
    """Propose regions and write their crops for one chunk of images; return ``{"part", "rows"}``."""
    from pipelines.regions import propose_regions as run

    outputs = run(records, layout=OutputLayout(out_dir), stage_key=stage_key, **options)
    return _write(out_dir, "regions", stage_key, item_keys, outputs)


@task(name="score_local_captions", persist_result=True)
def score_local_captions(
    records: list[dict], *, item_keys: list[str], out_dir: str, stage_key: str, options: dict
) -> dict:
    """Assign caption sentences to regions with CLIP scores for one chunk; return ``{"part", "rows"}``."""
    from pipelines import captions as library

    options = dict(options)
    scorer_args = options.pop("scorer")
    captioner_args = options.pop("captioner")
    spacy_model = options.pop("spacy_model")
    scorer, scorer_lock = shared(("clip", *sorted(scorer_args.items())), lambda: library.ClipScorer(**scorer_args))
    nlp, nlp_lock = shared(("spacy", spacy_model), lambda: _load_spacy(spacy_model))
    captioner, captioner_lock = None, threading.Lock()
    if captioner_args is not None:
        captioner, captioner_lock = shared(("captioner", *sorted(captioner_args.items())),
                                           lambda: library.Captioner(**captioner_args))
    with scorer_lock, nlp_lock, captioner_lock:  # always taken in this order: no deadlock between stages
        outputs = library.score_local_captions(
            records, layout=OutputLayout(out_dir), scorer=scorer, nlp=nlp, captioner=captioner, **options
        )
    return _write(out_dir, "captions", stage_key, item_keys, outputs)


@task(name="filter_captions", persist_result=True)
def filter_captions(records: list[dict], *, item_keys: list[str], out_dir: str, stage_key: str, options: dict) -> dict:
    """Remove appearance words from one chunk's captions and build hard negatives; return ``{"part", "rows"}``."""
    from pipelines.filtering import CaptionFilter, filter_captions as run

    options = dict(options)
    filter_args = options.pop("caption_filter")
    caption_filter, filter_lock = shared(("caption_filter", *sorted(filter_args.items())),
                                         lambda: CaptionFilter(**filter_args))
    with filter_lock:
        outputs = run(records, caption_filter=caption_filter, **options)
    return _write(out_dir, "filter", stage_key, item_keys, outputs)


def _load_spacy(name: str):
    from pipelines.filtering import load_spacy

    return load_spacy(name)


@task(name="train_model", cache_policy=NO_CACHE)
def train_model(*, manifest_dir: str, out_dir: str, objective: dict, options: dict) -> dict:
    """Fine-tune CLIP on the manifest's train split; return ``{steps, epochs_completed, model_dir, ...}``."""
    from structxlip.train import Objective, train

    result = train(manifest_dir, out_dir, objective=Objective(**objective), **options)
    return {
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "epochs_completed": result.epochs_completed,
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
        "model_dir": None if result.model_dir is None else str(result.model_dir),
        "seconds_per_step": result.seconds_per_step,
    }


@task(name="evaluate_model", cache_policy=NO_CACHE)
def evaluate_model(*, manifest_dir: str, checkpoint: str, out_path: str, options: dict) -> dict:
    """Retrieval metrics of ``checkpoint`` on the manifest (also written to ``out_path``); return them."""
    from structxlip.evaluate import evaluate

    return {"metrics": evaluate(manifest_dir, checkpoint=checkpoint, out_path=out_path, **options)}


STAGE_TASKS = {
    "ingest": ingest_images,
    "structure": extract_structure,
    "regions": propose_regions,
    "captions": score_local_captions,
    "filter": filter_captions,
}

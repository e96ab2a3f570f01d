"""The Prefect flows: one flow per stage (servable on its own as a deployment) and the parent ``structxlip-pipeline``.

Every stage flow takes the same typed parameters (``images_dir``, ``out_dir``, ``config_path``, ``refresh``), loads
the config itself (flows are entry points), works out which items are current from the image folder and the earlier
stages' stored results, and maps only the *pending* ones, in chunks, over the task runner. Its return value is the
stage summary ``{stage, processed, cached, failed, seconds, ...}``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from prefect import flow, unmapped
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from configs.schema import STAGES, Config, load_config
from storage import lock
from storage.atomic import atomic_write_text
from storage.hashing import content_key
from storage.layout import OutputLayout
from storage.manifest import STATUS_FAILED, STATUS_OK, read_manifest
from storage.stage_store import ITEM_KEY, StageStore

from flows.stages import STAGE_SCHEMAS, parse_stages, regions_method, stage_keys, stage_params, text_item_key
from flows.tasks import STAGE_TASKS, ChunkCachePolicy, evaluate_model, train_model

log = logging.getLogger("structxlip.flows")
MAX_FAILURES_LISTED = 50


# ---- what is current: the folder scan joined with every stage's stored results ---------------------------------------
class RunState:
    """The current items of every stage for one images folder, output folder and config (computed lazily)."""

    def __init__(self, images_dir: str | os.PathLike, out_dir: str | os.PathLike, config_path: str | None):
        self.images_dir = Path(images_dir).expanduser().resolve()
        if not self.images_dir.is_dir():
            raise NotADirectoryError(f"images folder not found: {images_dir}")
        self.config: Config = load_config(config_path)
        self.layout = OutputLayout(out_dir)
        self.keys = stage_keys(self.config)
        self.params = stage_params(self.config)

    def store(self, stage: str) -> StageStore:
        return StageStore(self.layout, stage, self.keys[stage], STAGE_SCHEMAS.get(stage))

    @cached_property
    def scan(self):
        from pipelines.ingest import scan_images

        ingest = self.config.ingest
        result = scan_images(self.images_dir, extensions=ingest.extensions, follow_symlinks=ingest.follow_symlinks)
        for problem in getattr(result, "problems", None) or []:
            log.warning("ingest: %s", problem)
        return result

    @cached_property
    def caption_index(self):
        """Captions as they are in the folder now (re-read every run; cheap)."""
        from pipelines.ingest import read_captions

        index = read_captions(self.images_dir, self.scan.files)
        for problem in getattr(index, "problems", None) or []:
            log.warning("captions: %s", problem)
        return index

    def caption_of(self, source_path: str) -> tuple[str | None, str | None, str | None]:
        entry = self.caption_index.get(str(source_path))
        if not entry:
            return None, None, None
        caption, caption_source, note = (tuple(entry) + (None, None, None))[:3]
        return (caption if isinstance(caption, str) and caption.strip() else None), caption_source, note

    @cached_property
    def ingest_rows(self) -> list[dict]:
        """Stored ingest records of the files in the folder now (files not ingested yet are absent)."""
        current = {f.file_key for f in self.scan.files}
        return [r for r in self.store("ingest").read().to_pylist() if r[ITEM_KEY] in current]

    @cached_property
    def images(self) -> list[dict]:
        """One ``{image_id, source_path}`` per distinct ingested image (first path in sorted order), by image id."""
        canonical: dict[str, dict] = {}
        for row in sorted(self.ingest_rows, key=lambda r: r["source_path"]):
            if row["status"] == STATUS_OK and row["image_id"] not in canonical:
                canonical[row["image_id"]] = {"image_id": row["image_id"], "source_path": row["source_path"]}
        return sorted(canonical.values(), key=lambda r: r["image_id"])

    def stage_rows(self, stage: str, item_keys: set[str]) -> dict[str, dict]:
        """Stored rows of ``stage`` for the given item keys, by image id."""
        return {r["image_id"]: r for r in self.store(stage).read().to_pylist() if r[ITEM_KEY] in item_keys}

    @cached_property
    def structure_rows(self) -> dict[str, dict]:
        return self.stage_rows("structure", {r["image_id"] for r in self.images})

    @cached_property
    def regions_rows(self) -> dict[str, dict]:
        ok = {i for i, r in self.structure_rows.items() if r["status"] == STATUS_OK}
        return self.stage_rows("regions", ok)

    @cached_property
    def text_keys(self) -> dict[str, str]:
        """Image id -> text item key (image + its current caption) of every image the caption stage should see."""
        captioner = self.config.captions.captioner
        keys = {}
        for image in self.images:
            caption, _source, _note = self.caption_of(image["source_path"])
            if caption or captioner:
                keys[image["image_id"]] = text_item_key(image["image_id"], caption)
        return keys

    @cached_property
    def captions_rows(self) -> dict[str, dict]:
        ok = {i for i, r in self.regions_rows.items() if r["status"] == STATUS_OK}
        return self.stage_rows("captions", {k for i, k in self.text_keys.items() if i in ok})

    @cached_property
    def filter_rows(self) -> dict[str, dict]:
        ok = {i for i, r in self.captions_rows.items() if r["status"] == STATUS_OK and r.get("caption")}
        return self.stage_rows("filter", {k for i, k in self.text_keys.items() if i in ok})


# ---- mapping pending chunks over the task runner --------------------------------------------------------------------
def _label(record: Any) -> str | None:
    """The source file of an input record (a dict with ``source_path`` or a ``SourceImage``), if it has one."""
    path = record.get("source_path") if isinstance(record, dict) else getattr(record, "path", None)
    return None if path is None else str(path)


def _summary(stage: str, outputs: list[dict], *, cached: int, seconds: float, chunk_errors: list[str],
             sources: dict[str, str | None] | None = None, **extra) -> dict:
    """Return the stage summary dict (counts of newly computed ok/failed items, cached items, seconds)."""
    sources = sources or {}
    failed = [o for o in outputs if o.get("status") == STATUS_FAILED]
    failures = [
        {"file": Path(str(o.get("source_path") or sources.get(o.get(ITEM_KEY)) or "")).name
         or str(o.get("image_id") or o.get(ITEM_KEY)),
         "reason": str(o.get("error") or "unknown error")}
        for o in failed[:MAX_FAILURES_LISTED]
    ]
    return {
        "stage": stage,
        "processed": len(outputs) - len(failed),
        "cached": cached,
        "failed": len(failed),
        "seconds": round(seconds, 3),
        "failures": failures,
        "chunk_errors": chunk_errors,
        **extra,
    }


def _publish(stage: str, summary: dict, gallery_rows: list[dict] | None = None, out_dir: str | None = None) -> None:
    """Send the stage's artifacts (summary table, failures, gallery) to Prefect; a reporting error never fails a run."""
    try:
        from flows import artifacts

        artifacts.publish_stage_summary(
            artifacts.StageSummary(stage, summary["processed"], summary["cached"], summary["failed"],
                                   float(summary["seconds"]), list(summary.get("failures") or []))
        )
        if gallery_rows and out_dir:
            artifacts.publish_gallery(stage, out_dir, gallery_rows)
    except Exception as exc:  # artifacts are reports; the data is already safely on disk
        log.warning("could not publish %s artifacts: %s", stage, exc)


def _progress(stage: str, done: int, total: int) -> None:
    with contextlib.suppress(Exception):
        from flows.artifacts import stage_progress

        stage_progress(stage, done, total)


def run_chunks(
    state: RunState,
    stage: str,
    items: list[tuple[str, Any]],
    *,
    options: dict,
    refresh: bool,
) -> dict:
    """Map the pending ``(item_key, record)`` items of ``stage`` in chunks; return the stage summary dict."""
    from tqdm import tqdm

    started = time.perf_counter()
    store = state.store(stage)
    unique = dict(sorted(items, key=lambda kv: kv[0]))  # deterministic chunks: same pending set -> same cache keys
    done = set() if refresh else store.done_keys()
    pending = [(k, r) for k, r in unique.items() if k not in done]
    chunk_size = state.config.runtime.chunk_size
    chunks = [pending[i : i + chunk_size] for i in range(0, len(pending), chunk_size)]
    outputs: list[dict] = []
    chunk_errors: list[str] = []
    written = []
    if chunks:
        task = STAGE_TASKS[stage].with_options(
            retries=state.config.runtime.task_retries,
            cache_policy=ChunkCachePolicy(),
            persist_result=True,
            result_storage=state.layout.results_dir,
            refresh_cache=True if refresh else None,
        )
        futures = task.map(
            [[r for _, r in chunk] for chunk in chunks],
            item_keys=[[k for k, _ in chunk] for chunk in chunks],
            out_dir=unmapped(str(state.layout.root)),
            stage_key=unmapped(store.stage_key),
            options=unmapped(options),
        )
        sizes = {id(f): len(c) for f, c in zip(futures, chunks)}
        done_items = 0
        _progress(stage, 0, len(pending))
        with tqdm(total=len(pending), desc=f"{stage:<9}", unit="img", file=sys.stderr, dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                try:
                    payload = future.result()
                except Exception as exc:  # a chunk that failed after its retries stays pending for the next run
                    chunk_errors.append(" ".join(f"{type(exc).__name__}: {exc}".split())[:300])
                else:
                    part = store.folder / payload["part"]
                    if not part.exists():
                        # A cached result whose part was deleted: restore the part from the cached rows.
                        part = store.write_part(payload["rows"])
                    written.append(part)
                    outputs.extend(payload["rows"])
                done_items += sizes[id(future)]
                bar.update(sizes[id(future)])
                _progress(stage, done_items, len(pending))
        if refresh and written:
            store.remove_superseded(written)
    if chunk_errors:
        log.warning("%s: %d chunk(s) failed and will be retried next run: %s", stage, len(chunk_errors), chunk_errors[0])
    summary = _summary(stage, outputs, cached=len(unique) - len(pending), seconds=time.perf_counter() - started,
                       chunk_errors=chunk_errors, sources={k: _label(r) for k, r in pending})
    _publish(stage, summary)
    return summary


def _stage_flow(name: str, description: str) -> Callable:
    """Decorate a stage body ``fn(state, refresh) -> summary`` as a Prefect flow with the shared typed parameters."""

    def decorate(body: Callable[[RunState, bool], dict]):
        def stage_flow(images_dir: str, out_dir: str, config_path: str | None = None, refresh: bool = False) -> dict:
            state = RunState(images_dir, out_dir, config_path)
            with lock.output_lock(state.layout):
                return body(state, refresh)

        # Deployments load a flow by "flows/pipeline.py:<name>_flow"; the function's names must say the same.
        stage_flow.__name__ = stage_flow.__qualname__ = f"{name}_flow"
        stage_flow.__doc__ = description
        return flow(name=name, description=description, task_runner=default_runner(), validate_parameters=True)(stage_flow)

    return decorate


def default_runner() -> ThreadPoolTaskRunner:
    """Thread pool for the local runner: library calls release the GIL (OpenCV, torch), two chunks keep cores busy."""
    return ThreadPoolTaskRunner(max_workers=max(2, min(4, os.cpu_count() or 1)))


def _threads_runner() -> bool:
    """True when this flow's tasks run on threads of this process (so a library may start its own process pool);
    Dask worker processes are daemonic and cannot, and there the Dask workers are the parallelism anyway."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context is None or isinstance(getattr(context, "task_runner", None), ThreadPoolTaskRunner)


# ---- stage flows ----------------------------------------------------------------------------------------------------
@_stage_flow("ingest", "Hash, open and measure every new or changed image file in the folder.")
def ingest_flow(state: RunState, refresh: bool) -> dict:
    items = [(f.file_key, f) for f in state.scan.files]
    return run_chunks(state, "ingest", items, options={"max_pixels": state.config.ingest.max_pixels}, refresh=refresh)


@_stage_flow("structure", "Write Canny/scribble (and optional LoG/Sobel) structure maps of every ingested image.")
def structure_flow(state: RunState, refresh: bool) -> dict:
    s = state.config.structure
    options = {
        "backend": s.backend, "long_side": s.long_side, "canny_low": s.canny_low, "canny_high": s.canny_high,
        "extra_maps": list(s.extra_maps), "scribble_sigma": s.scribble.sigma,
        "scribble_threshold": s.scribble.threshold, "scribble_final_sigma": s.scribble.final_sigma,
        "max_pixels": state.config.ingest.max_pixels, "workers": s.workers if _threads_runner() else 1,
        "batch_size": s.batch_size,
    }
    items = [(i["image_id"], i) for i in state.images]
    return run_chunks(state, "structure", items, options=options, refresh=refresh)


@_stage_flow("regions", "Propose local regions (SAM or structure-based) and write their RGB and structure crops.")
def regions_flow(state: RunState, refresh: bool) -> dict:
    r = state.config.regions
    options = {
        "method": regions_method(state.config), "sam_model_type": r.sam_model_type, "sam_checkpoint": r.sam_checkpoint,
        "points_per_side": r.points_per_side, "points_per_batch": r.points_per_batch,
        "min_area_fraction": r.min_area_fraction, "max_area_fraction": r.max_area_fraction,
        "max_regions": r.max_regions, "nms_iou": r.nms_iou, "max_side": r.max_side, "device": r.device,
        "max_pixels": state.config.ingest.max_pixels,
    }
    structure = state.structure_rows
    items = [
        (i["image_id"], {**i, "structure_path": structure[i["image_id"]]["structure_path"]})
        for i in state.images
        if structure.get(i["image_id"], {}).get("status") == STATUS_OK
    ]
    return run_chunks(state, "regions", items, options=options, refresh=refresh)


@_stage_flow("captions", "Split captions into sentences and assign each to its best region with CLIP scores.")
def captions_flow(state: RunState, refresh: bool) -> dict:
    c = state.config.captions
    options = {
        "scorer": {"model_name_or_dir": state.config.scoring_model, "device": c.device, "batch_size": c.batch_size},
        "captioner": None if not c.captioner else {
            "model_id": c.captioner, "device": c.device, "max_new_tokens": c.max_new_tokens},
        "spacy_model": state.config.filter.spacy_model,
        "include_full_image": c.include_full_image,
        "caption_regions": c.caption_regions,
    }
    regions = state.regions_rows
    items = []
    for image in state.images:
        region = regions.get(image["image_id"])
        key = state.text_keys.get(image["image_id"])
        if region is None or region["status"] != STATUS_OK or key is None:
            continue
        caption, caption_source, _note = state.caption_of(image["source_path"])
        items.append((key, {**image, "caption": caption, "caption_source": caption_source, "segments": region["segments"]}))
    return run_chunks(state, "captions", items, options=options, refresh=refresh)


@_stage_flow("filter", "Remove appearance words (colours, materials, textures) from captions; build hard negatives.")
def filter_flow(state: RunState, refresh: bool) -> dict:
    f = state.config.filter
    options = {
        "caption_filter": {
            "spacy_model": f.spacy_model, "vocab_dir": f.vocab_dir, "remove_colors": f.remove_colors,
            "remove_materials": f.remove_materials, "remove_textures": f.remove_textures,
            "remove_domain": f.remove_domain, "min_content_words": f.min_content_words, "batch_size": f.batch_size,
        },
        "max_hard_negatives": f.max_hard_negatives,
    }
    items = [
        (state.text_keys[image_id], {"image_id": image_id, "caption": row["caption"], "segments": row["segments"]})
        for image_id, row in state.captions_rows.items()
        if row["status"] == STATUS_OK and row.get("caption")
    ]
    return run_chunks(state, "filter", items, options=options, refresh=refresh)


@_stage_flow("manifest", "Join every stage's results into the manifest (one row per image) and write it incrementally.")
def manifest_flow(state: RunState, refresh: bool) -> dict:
    from pipelines.manifest import build_manifest_rows, write_manifest

    started = time.perf_counter()
    ingest = list(state.ingest_rows)
    built = build_manifest_rows(
        ingest=ingest,
        captions_index={r["source_path"]: state.caption_of(r["source_path"]) for r in ingest},
        structure=state.structure_rows,
        regions=state.regions_rows,
        captions=state.captions_rows,
        filtered=state.filter_rows,
        split_ratios=dict(state.config.manifest.split_ratios),
    )
    if refresh:
        for part in state.layout.manifest_dir.glob("part-*.parquet"):
            part.unlink()
    result = write_manifest(state.layout, built.rows)
    written_ids = set(result.written_ids)
    new_rows = [r for r in built.rows if r["image_id"] in written_ids]
    summary = _summary(
        "manifest", new_rows, cached=result.kept_rows, seconds=time.perf_counter() - started, chunk_errors=[],
        rows=len(built.rows), ok=sum(r["status"] == STATUS_OK for r in built.rows), duplicates=len(built.duplicates),
    )
    for duplicate in built.duplicates:
        log.warning("manifest: %s is a duplicate of %s (left out)", duplicate["source_path"], duplicate["duplicate_of"])
    gallery = [r for r in built.rows if r["status"] == STATUS_OK][:8] if result.written_rows else None
    _publish("manifest", summary, gallery_rows=gallery, out_dir=str(state.layout.root))
    return summary


def _manifest_digest(layout: OutputLayout) -> str:
    """Content key of the manifest's rows (order-independent): training is redone only when the data changed."""
    table = read_manifest(layout.root)
    rows = sorted(table.to_pylist(), key=lambda r: r["image_id"])
    return content_key(rows, length=32)


def _fingerprint(path: Path) -> list[int] | dict[str, list[int]] | None:
    """(size, mtime_ns) of a file, or of every file under a folder; None when absent. Detects outputs overwritten
    or deleted since they were recorded (e.g. a model retrained with other parameters into the same folder)."""
    if path.is_file():
        return [path.stat().st_size, path.stat().st_mtime_ns]
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
                 for p in sorted(path.rglob("*")) if p.is_file()}
        return files or None
    return None


def _single_result_stage(state: RunState, stage: str, refresh: bool, item_key: str, outputs: Callable[[], list[Path]],
                         compute: Callable[[], dict]) -> dict:
    """Run a one-item stage (train, evaluate) unless its stored row matches ``item_key`` and its files are unchanged."""
    started = time.perf_counter()
    store = state.store(stage)
    stored = {r[ITEM_KEY]: r for r in store.read().to_pylist()}
    row = stored.get(item_key)
    if row is not None and not refresh and row["status"] == STATUS_OK:
        recorded = json.loads(row["result"] or "{}").get("fingerprints", {})
        if all(_fingerprint(p) and recorded.get(str(p)) == _fingerprint(p) for p in outputs()):
            return _summary(stage, [], cached=1, seconds=time.perf_counter() - started, chunk_errors=[])
    try:
        result = compute()
        status, error = STATUS_OK, None
    except Exception as exc:
        result, status, error = {}, STATUS_FAILED, " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        log.error("%s failed: %s", stage, error)
    fingerprints = {str(p): _fingerprint(p) for p in outputs()}
    record = {ITEM_KEY: item_key, "image_id": None, "status": status, "error": error,
              "result": json.dumps({**result, "fingerprints": fingerprints}, default=str)}
    if status == STATUS_OK:
        store.write_part([record])
    output = {**record, "source_path": stage}
    summary = _summary(stage, [output], cached=0, seconds=time.perf_counter() - started, chunk_errors=[])
    if status == STATUS_FAILED:
        raise RuntimeError(f"{stage} failed: {error}")
    return summary


@_stage_flow("train", "Fine-tune CLIP with the StructXLIP losses on the manifest's train split (cached by data + params).")
def train_flow(state: RunState, refresh: bool) -> dict:
    t = state.config.train
    options = {
        "clip_model": state.config.model.clip_model, "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr,
        "min_lr": t.min_lr, "weight_decay": t.weight_decay, "logit_scale_min": t.logit_scale_min,
        "logit_scale_max": t.logit_scale_max, "max_text_tokens": t.max_text_tokens,
        "keep_positions": t.keep_positions, "structure_kind": t.structure_kind, "chunk_top_k": t.chunk_top_k,
        "chunk_base_window": t.chunk_base_window, "chunk_stride": t.chunk_stride, "max_chunks": t.max_chunks,
        "precision": t.precision, "device": t.device, "num_workers": t.num_workers,
        "checkpoint_every_steps": t.checkpoint_every_steps, "seed": t.seed,
        "config": {"stage_key": state.keys["train"], "params": state.params["train"]},
    }

    def compute() -> dict:
        from structxlip.train import Objective  # torch: imported only when training actually runs

        objective = {name: getattr(t, name) for name in Objective.__dataclass_fields__}
        return train_model(manifest_dir=str(state.layout.manifest_dir), out_dir=str(state.layout.root),
                           objective=objective, options=options)

    item_key = content_key("train", _manifest_digest(state.layout), state.keys["train"], length=32)
    summary = _single_result_stage(
        state, "train", refresh, item_key,
        outputs=lambda: [state.layout.model_dir],
        compute=compute,
    )
    if summary["processed"]:  # a cached stage's plots are already on the server under the same key
        with contextlib.suppress(Exception):
            from flows import artifacts

            artifacts.publish_training(state.layout.root)
    _publish("train", summary)
    return summary


@_stage_flow("evaluate", "Retrieval Recall@K (image/text/structure directions) of the fine-tuned model.")
def evaluate_flow(state: RunState, refresh: bool) -> dict:
    e, t = state.config.evaluate, state.config.train
    if _fingerprint(state.layout.model_dir) is None:
        raise FileNotFoundError(f"no trained model in {state.layout.model_dir}: run the train stage first")
    options = {
        "base_model": state.config.model.clip_model, "split": e.split, "batch_size": e.batch_size, "device": e.device,
        "precision": t.precision, "max_text_tokens": t.max_text_tokens, "keep_positions": t.keep_positions,
        "structure_kind": t.structure_kind, "num_workers": t.num_workers,
    }
    model = _fingerprint(state.layout.model_dir)
    item_key = content_key("evaluate", _manifest_digest(state.layout), state.keys["evaluate"], model, length=32)
    summary = _single_result_stage(
        state, "evaluate", refresh, item_key,
        outputs=lambda: [state.layout.eval_metrics],
        compute=lambda: evaluate_model(manifest_dir=str(state.layout.manifest_dir),
                                       checkpoint=str(state.layout.model_dir),
                                       out_path=str(state.layout.eval_metrics), options=options),
    )
    if summary["processed"]:  # a cached stage's plots are already on the server under the same key
        with contextlib.suppress(Exception):
            from flows import artifacts

            artifacts.publish_evaluation(state.layout.root)
    _publish("evaluate", summary)
    return summary


STAGE_FLOWS = {
    "ingest": ingest_flow,
    "structure": structure_flow,
    "regions": regions_flow,
    "captions": captions_flow,
    "filter": filter_flow,
    "manifest": manifest_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
}


# ---- the parent flow ------------------------------------------------------------------------------------------------
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
    """Run the requested stages in order as subflows; return ``{"stages": [summary, ...], "seconds", ...}``."""
    started = time.perf_counter()
    config = load_config(config_path)
    selected = parse_stages(stages)
    refreshed = set(parse_stages(refresh)) if refresh else set()
    runner = runner or config.runtime.runner
    dask_address = dask_address or config.runtime.dask_address
    layout = OutputLayout(out_dir)
    summaries: list[dict] = []
    with lock.output_lock(layout), contextlib.ExitStack() as stack:
        if runner == "dask":
            dask_address = stack.enter_context(dask_scheduler(dask_address, config.runtime.dask_workers))
        for stage in selected:
            stage_flow = STAGE_FLOWS[stage].with_options(task_runner=make_runner(runner, dask_address))
            summary = stage_flow(images_dir=str(images_dir), out_dir=str(layout.root), config_path=config_path,
                                 refresh=stage in refreshed)
            summaries.append(summary)
    report = {
        "images_dir": str(Path(images_dir).expanduser().resolve()),
        "out_dir": str(layout.root),
        "config_path": config_path,
        "stages": summaries,
        "seconds": round(time.perf_counter() - started, 3),
        "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
    atomic_write_text(layout.run_summary(stamp), json.dumps(report, indent=2))
    return report


def format_summary(report: dict) -> str:
    """Return the end-of-run table: one line per stage with processed, cached, failed and seconds."""
    lines = [f"{'stage':<10} {'processed':>9} {'cached':>7} {'failed':>7} {'seconds':>8}"]
    for s in report["stages"]:
        lines.append(f"{s['stage']:<10} {s['processed']:>9} {s['cached']:>7} {s['failed']:>7} {s['seconds']:>8.2f}")
        failures = s.get("failures") or []
        for failure in failures[:3]:
            lines.append(f"  x {failure['file']}: {failure['reason']}")
        if s["failed"] > 3:
            lines.append(f"  x ... {s['failed'] - 3} more (see the {s['stage']}-failures artifact or the manifest)")
        for error in s.get("chunk_errors") or []:
            lines.append(f"  ! chunk failed (retried next run): {error}")
        if s.get("duplicates"):
            lines.append(f"  {s['duplicates']} duplicate file(s) left out of the manifest (same bytes as another file)")
    lines.append(f"total {report['seconds']:.1f} s; outputs in {report['out_dir']}")
    return "\n".join(lines)


__all__ = ["STAGES", "STAGE_FLOWS", "RunState", "format_summary", "make_runner", "run_chunks", "structxlip_pipeline"]

"""Stage definitions for the orchestrator: which config values are each stage's parameters, its cache key, the key of
one item, and the Parquet schema of its per-stage results. Nothing here imports Prefect.

Stage key = ``content_key(stage, code versions, parameters, previous stage's key)``: the keys form a chain, so a
changed parameter changes its stage's key and every later one, never an earlier one. Runtime-only settings
(devices, worker counts, batch sizes, chunk size) are left out: they do not change results.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import pyarrow as pa

from configs.schema import STAGES, Config
from storage.hashing import content_key, file_digest
from storage.manifest import SEGMENT_TYPE
from storage.stage_store import ITEM_KEY

# Library modules whose VERSION goes into each stage's key (bump a VERSION when that module's outputs change).
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "ingest": ("pipelines.ingest", "pipelines.images"),
    "structure": ("pipelines.structure", "pipelines.images"),
    "regions": ("pipelines.regions",),
    "captions": ("pipelines.captions",),
    "filter": ("pipelines.filtering", "pipelines.hard_negatives"),
    "manifest": ("pipelines.manifest",),
    "train": ("structxlip.train",),
    "evaluate": ("structxlip.evaluate",),
}
TEXT_STAGES = ("captions", "filter")

_STATUS = [pa.field(ITEM_KEY, pa.string(), nullable=False), pa.field("image_id", pa.string()),
           pa.field("status", pa.string()), pa.field("error", pa.string())]
STAGE_SCHEMAS: dict[str, pa.Schema] = {
    "ingest": pa.schema(
        [*_STATUS, pa.field("source_path", pa.string()), pa.field("width", pa.int32()), pa.field("height", pa.int32())]
    ),
    "structure": pa.schema(
        [*_STATUS, *(pa.field(f"{k}_path", pa.string()) for k in ("structure", "scribble", "log", "sobel"))]
    ),
    "regions": pa.schema([*_STATUS, pa.field("segments", pa.list_(SEGMENT_TYPE))]),
    "captions": pa.schema(
        [*_STATUS, pa.field("caption", pa.string()), pa.field("caption_source", pa.string()),
         pa.field("segments", pa.list_(SEGMENT_TYPE))]
    ),
    "filter": pa.schema(
        [*_STATUS, pa.field("filtered_caption", pa.string()), pa.field("segments", pa.list_(SEGMENT_TYPE)),
         pa.field("hard_negatives", pa.list_(pa.string()))]
    ),
    # train / evaluate: one row each, their result summary as JSON text.
    "train": pa.schema([*_STATUS, pa.field("result", pa.string())]),
    "evaluate": pa.schema([*_STATUS, pa.field("result", pa.string())]),
}


def regions_method(config: Config) -> str:
    """Return the region proposer actually used: ``auto`` means SAM when a checkpoint is set, else ``structure``."""
    method = config.regions.method
    if method == "auto":
        return "sam" if config.regions.sam_checkpoint else "structure"
    return method


def _vocab_digest(vocab_dir: str) -> dict[str, str]:
    """File name -> SHA-256 of the vocabulary files, so editing a word list changes the filter stage's key."""
    folder = Path(vocab_dir).expanduser()
    return {p.name: file_digest(p) for p in sorted(folder.glob("*")) if p.is_file()}


def stage_params(config: Config) -> dict[str, dict]:
    """Return each stage's result-affecting parameters (JSON-able), taken explicitly from the config sections."""
    s, r, c, f, t = config.structure, config.regions, config.captions, config.filter, config.train
    train = t.model_dump(exclude={"device", "num_workers", "precision"})
    return {
        "ingest": {"extensions": sorted(e.lower().lstrip(".") for e in config.ingest.extensions),
                   "max_pixels": config.ingest.max_pixels, "follow_symlinks": config.ingest.follow_symlinks},
        "structure": {"backend": s.backend, "long_side": s.long_side, "canny_low": s.canny_low,
                      "canny_high": s.canny_high, "extra_maps": sorted(s.extra_maps),
                      "scribble": s.scribble.model_dump()},
        "regions": {"method": regions_method(config), "sam_model_type": r.sam_model_type,
                    "sam_checkpoint": r.sam_checkpoint, "points_per_side": r.points_per_side,
                    "min_area_fraction": r.min_area_fraction, "max_area_fraction": r.max_area_fraction,
                    "max_regions": r.max_regions, "nms_iou": r.nms_iou, "max_side": r.max_side},
        "captions": {"clip_model": config.scoring_model, "include_full_image": c.include_full_image,
                     "captioner": c.captioner, "caption_regions": c.caption_regions,
                     "max_new_tokens": c.max_new_tokens},
        "filter": {"spacy_model": f.spacy_model, "vocab": _vocab_digest(f.vocab_dir),
                   "remove_colors": f.remove_colors, "remove_materials": f.remove_materials,
                   "remove_textures": f.remove_textures, "remove_domain": f.remove_domain,
                   "min_content_words": f.min_content_words, "max_hard_negatives": f.max_hard_negatives},
        "manifest": {"split_ratios": dict(config.manifest.split_ratios)},
        "train": {"clip_model": config.model.clip_model, **train},
        "evaluate": {"split": config.evaluate.split},
    }


_VERSION_LINE = re.compile(r"""^VERSION\s*(?::\s*str\s*)?=\s*["']([^"']+)["']""", re.MULTILINE)


@functools.lru_cache(maxsize=None)
def module_version(name: str) -> str:
    """Return a module's ``VERSION = "..."`` read from its source without importing it (importing torch-based
    modules costs seconds per run); "0" when it declares none, "missing" when the module does not exist."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return "missing"
    match = _VERSION_LINE.search(Path(spec.origin).read_text(encoding="utf-8"))
    return match.group(1) if match else "0"


def code_version(stage: str) -> dict[str, str]:
    """Return ``{module: VERSION}`` of the library modules a stage runs."""
    return {name: module_version(name) for name in STAGE_MODULES[stage]}


def stage_keys(config: Config) -> dict[str, str]:
    """Return the chained cache key of every stage, in pipeline order."""
    params = stage_params(config)
    keys: dict[str, str] = {}
    previous = None
    for stage in STAGES:
        keys[stage] = content_key(stage, code_version(stage), params[stage], previous)
        previous = keys[stage]
    return keys


def text_item_key(image_id: str, caption: str | None) -> str:
    """Item key of the text stages: the image and its caption, so an edited caption recomputes only text stages."""
    return content_key("text", image_id, caption or "")


def parse_stages(text: str | list[str] | None) -> list[str]:
    """Return the requested stages in pipeline order from ``"a,b"`` or a list; raise ValueError naming an unknown one."""
    if text is None:
        return list(STAGES)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n and n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise ValueError(f"expected stages from {', '.join(STAGES)}, got {', '.join(unknown) or 'none'}")
    return [s for s in STAGES if s in names]

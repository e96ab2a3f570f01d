"""The staged pipeline (chunks, stage store, sentence-only splitter, shared models) writes the manifest that the
plain library calls give, one call per stage over every image, with the full spaCy parser splitting sentences. The
pipeline runs its CPU stages in two engine worker processes (pipelines.engine.workers)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import tolerant_edge_iou
from configs.schema import load_config
from pipelines.steps.captions import ClipScorer, score_local_captions
from pipelines.engine.execute import run_inline
from pipelines.steps.filtering import CaptionFilter, load_spacy
from pipelines.steps.hard_negatives import filter_captions
from pipelines.steps.ingest import ingest_images, read_captions, scan_images
from pipelines.steps.manifest import build_manifest_rows
from pipelines.engine.plan import Pipeline
from pipelines.steps.regions import propose_regions
from pipelines.engine.stages import STAGE_DEFINITIONS, library_arguments, stage_keys
from pipelines.steps.structure import extract_structure
from storage.layout import OutputLayout
from tests.corpus import make_generated_images
from tests.manifests import builtin_joins, assert_same

ROOT = Path(__file__).resolve().parents[2]
DATA_STAGES = ["ingest", "structure", "regions", "captions", "filter", "manifest"]
MIN_EDGE_IOU = 0.99  # same code on the same pixels: equal maps, but the comparison is the tests' tolerant one


def _params(name, config):
    return library_arguments(STAGE_DEFINITIONS[name].params(config).model_dump())


def _library_manifest(images_dir: Path, out: Path, config) -> list[dict]:
    keys = stage_keys(config)
    layout = OutputLayout(out)
    scan = scan_images(images_dir, extensions=config.ingest.extensions, follow_symlinks=config.ingest.follow_symlinks)
    ingest = ingest_images(scan.files, max_pixels=config.ingest.max_pixels)
    images = sorted({r["image_id"]: {"image_id": r["image_id"], "source_path": r["source_path"]}
                     for r in sorted(ingest, key=lambda r: r["source_path"]) if r["status"] == "ok"}.values(),
                    key=lambda r: r["image_id"])
    index = read_captions(images_dir, scan.files)
    structure = extract_structure(images, layout=layout, stage_key=keys["structure"], **_params("structure", config),
                                  max_pixels=config.ingest.max_pixels, batch_size=8)
    structure_by_id = {r["image_id"]: r for r in structure}
    region_params = _params("regions", config)
    regions = propose_regions([{**i, "structure_path": structure_by_id[i["image_id"]]["structure_path"]} for i in images],
                              layout=layout, stage_key=keys["regions"], **region_params, points_per_batch=64,
                              device="cpu", max_pixels=config.ingest.max_pixels)
    regions_by_id = {r["image_id"]: r for r in regions}
    records = []
    for image in images:
        caption, source, _note = (tuple(index.get(image["source_path"]) or ()) + (None, None, None))[:3]
        records.append({**image, "caption": caption, "caption_source": source,
                        "segments": regions_by_id[image["image_id"]]["segments"]})
    scorer = ClipScorer(config.scoring_model, device="cpu", batch_size=5)
    captions = score_local_captions(records, layout=layout, scorer=scorer, nlp=load_spacy(config.filter.spacy_model),
                                    include_full_image=config.captions.include_full_image)
    f = config.filter
    caption_filter = CaptionFilter(spacy_model=f.spacy_model, vocab_dir=f.vocab_dir, remove_colors=f.remove_colors,
                                   remove_materials=f.remove_materials, remove_textures=f.remove_textures,
                                   remove_domain=f.remove_domain, min_content_words=f.min_content_words)
    filtered = filter_captions([{"image_id": c["image_id"], "caption": c["caption"], "segments": c["segments"]}
                                for c in captions], caption_filter=caption_filter,
                               max_hard_negatives=f.max_hard_negatives)
    return build_manifest_rows(
        ingest=ingest, captions_index={r["source_path"]: index.get(r["source_path"]) for r in ingest},
        joins=builtin_joins(structure_by_id, regions_by_id, {c["image_id"]: c for c in captions},
                            {r["image_id"]: r for r in filtered}),
        split_ratios=dict(config.manifest.split_ratios)).rows


def _edge_map(root: Path, relative: str) -> np.ndarray:
    return cv2.imread(str(root / relative), cv2.IMREAD_GRAYSCALE)


def test_pipeline_manifest_equals_the_library_calls(tmp_path):
    images = tmp_path / "images"
    make_generated_images(images, 7, size=(200, 150), seed=11)
    # Two engine worker processes whatever the machine: the parallel path is the one compared.
    config = load_config(ROOT / "configs" / "demo.yaml", {"runtime.chunk_size": 3, "runtime.workers": 2})
    pipeline_out, library_out = tmp_path / "pipeline", tmp_path / "library"

    run_inline(Pipeline(images, pipeline_out, config), DATA_STAGES)
    table = pq.read_table(sorted((pipeline_out / "manifest").glob("*.parquet")))
    staged = sorted(table.to_pylist(), key=lambda r: r["source_path"])
    plain = _library_manifest(images, library_out, config)

    assert len(staged) == len(plain) == 7
    assert all(r["status"] == "ok" for r in staged)
    assert sum(len(r["segments"]) for r in staged) > 0 and sum(len(r["hard_negatives"]) for r in staged) > 0
    for a, b in zip(staged, plain):
        assert_same({k: a.get(k) for k in b}, b, f"row {Path(b['source_path']).name}")
        for column in ("structure_path", "scribble_path"):
            assert tolerant_edge_iou(_edge_map(pipeline_out, a[column]), _edge_map(library_out, b[column])) \
                >= MIN_EDGE_IOU

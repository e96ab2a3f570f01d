"""Multi-caption folders end to end (no orchestrator): several captions per image and byte-identical files become one
manifest row with every caption (filtered) and every path; editing one further caption reruns only the text stages."""

from __future__ import annotations

import json
import shutil

from configs import load_config
from pipelines.engine.execute import run_inline
from tests.manifests import builtin_joins
from pipelines.steps.manifest import build_manifest_rows
from pipelines.engine.plan import Pipeline
from storage.manifest import read_manifest
from tests.corpus import make_generated_images

DATA = ["ingest", "structure", "regions", "captions", "filter", "manifest"]
CONFIG = {"model.clip_model": "structxlip/tiny-clip", "regions.method": "structure", "regions.max_regions": 2,
          "runtime.chunk_size": 2, "runtime.workers": 1, "captions.device": "cpu"}
RATIOS = {"train": 1.0}


def _counts(summaries):
    return {s["stage"]: (s["processed"], s["cached"], s["failed"]) for s in summaries}


def _write_captions(folder, extra_second: str):
    lines = [{"file": "gen_00000.jpg", "caption": "A red ball lies on green grass."},
             {"file": "gen_00001.jpg", "caption": ["A blue car is parked by a wooden fence.", extra_second]},
             {"file": "gen_00000.jpg", "caption": "A small red ball on a lawn."},
             {"file": "copy_of_0.jpg", "caption": "A shiny red sphere in a garden."}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def test_multi_caption_folder_gives_one_row_per_image_with_every_caption_and_path(tmp_path):
    images = tmp_path / "images"
    make_generated_images(images, 2, size=(96, 72))
    shutil.copyfile(images / "gen_00000.jpg", images / "copy_of_0.jpg")  # identical bytes: the same image
    _write_captions(images, "A grey car stands near a fence.")
    out = tmp_path / "out"
    config = load_config(overrides=CONFIG)
    first = run_inline(Pipeline(images, out, config), DATA)
    # 3 files, 2 images: the text stages see each image once.
    assert _counts(first)["ingest"] == (3, 0, 0) and _counts(first)["filter"] == (2, 0, 0)
    rows = {r["source_path"].rsplit("/", 1)[1]: r for r in read_manifest(out).to_pylist()}
    assert sorted(rows) == ["copy_of_0.jpg", "gen_00001.jpg"]  # the first path in sorted order holds the row
    zero, one = rows["copy_of_0.jpg"], rows["gen_00001.jpg"]
    assert zero["status"] == one["status"] == "ok"
    assert [p.rsplit("/", 1)[1] for p in zero["duplicate_paths"]] == ["gen_00000.jpg"]
    # Union over the two files in sorted path order, each file's captions in file order.
    assert zero["caption"] == "A shiny red sphere in a garden."
    assert [e["caption"] for e in zero["extra_captions"]] == ["A red ball lies on green grass.",
                                                             "A small red ball on a lawn."]
    assert one["caption"] == "A blue car is parked by a wooden fence." and one["duplicate_paths"] is None
    (extra,) = one["extra_captions"]
    # The filter removes colour words from the further captions too.
    assert extra["caption"] == "A grey car stands near a fence." and "grey" not in extra["filtered_caption"]
    assert "car" in extra["filtered_caption"] and "red" not in zero["extra_captions"][0]["filtered_caption"]

    # Editing one further caption reruns the text stages of that image only.
    _write_captions(images, "A silver car stands near a fence.")
    again = run_inline(Pipeline(images, out, config), DATA)
    counts = _counts(again)
    assert counts["structure"] == (0, 2, 0) and counts["regions"] == (0, 2, 0)
    assert counts["captions"] == (1, 1, 0) and counts["filter"] == (1, 1, 0)
    one = {r["image_id"]: r for r in read_manifest(out).to_pylist()}[one["image_id"]]
    assert one["extra_captions"][0]["caption"] == "A silver car stands near a fence."


def test_build_rows_union_captions_over_identical_files():
    ingest = [{"source_path": p, "image_id": "a", "status": "ok", "error": None, "width": 4, "height": 4}
              for p in ("/img/b.jpg", "/img/a.jpg", "/img/c.jpg")]
    index = {"/img/a.jpg": (None, None, "no caption found"),
             "/img/b.jpg": ("b one", "jsonl", None, ("b two", "shared")),
             "/img/c.jpg": ("shared", "csv", None, ("c two",))}
    built = build_manifest_rows(ingest=ingest, captions_index=index, joins=builtin_joins(),
                                split_ratios=RATIOS)
    (row,) = built.rows
    assert row["source_path"] == "/img/a.jpg" and row["duplicate_paths"] == ["/img/b.jpg", "/img/c.jpg"]
    # a.jpg has none; b.jpg's captions, then c.jpg's new ones ("shared" once); source of the first captioned file.
    assert row["caption"] == "b one" and row["caption_source"] == "jsonl"
    assert [e["caption"] for e in row["extra_captions"]] == ["b two", "shared", "c two"]
    assert row["error"] == "structure: not computed"
    assert [d["source_path"] for d in built.duplicates] == ["/img/b.jpg", "/img/c.jpg"]

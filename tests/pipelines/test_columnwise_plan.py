"""Planning column-wise (``Pipeline.item_keys``, ``pending_count``, ``plan``: records for the pending items only,
cached results as columns) against the row-wise definitions it stands in for, computed here independently on the same
folder: every current item with its record, row by row from the stored rows as dicts (the stages' rules written out
again in this file). Keys, pending items (their records too), cached counts and the failures listed are equal for
every stage, with failed files, identical files, several captions per image, an image without a caption, a deleted
output, a new image and a changed caption. The manifest's key follows its rows: it changes exactly when the rows it
would build change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from configs import load_config
from pipelines.engine.execute import run_inline, summarize
from pipelines.engine.plan import MAX_FAILURES_LISTED, Pipeline
from tests.corpus import make_generated_images

DATA = ["ingest", "structure", "regions", "captions", "filter", "manifest"]
CONFIG = {"model.clip_model": "structxlip/tiny-clip", "regions.method": "structure", "regions.max_regions": 3,
          "runtime.chunk_size": 2, "runtime.workers": 1, "captions.device": "cpu"}


def _pipeline(images, out):
    return Pipeline(images, out, load_config(overrides=CONFIG))


def _reference_items(pipeline, stage):
    """Every current item of ``stage`` with its record, row by row from the stored rows as dicts (``done_rows``): the
    stages' rules written out again here, independently of their column-wise definitions."""
    if stage == "ingest":
        return [(f.file_key, f) for f in pipeline.scan.files]
    if stage == "manifest":
        return pipeline.stages[stage].items(pipeline.view_of(stage))
    canonical = {}  # image id -> its first file in sorted order
    for row in sorted(pipeline.done_rows("ingest").values(), key=lambda r: r["source_path"]):
        if row["status"] == "ok" and row["image_id"] not in canonical:
            canonical[row["image_id"]] = {"image_id": row["image_id"], "source_path": row["source_path"]}
    images = sorted(canonical.values(), key=lambda r: r["image_id"])
    if stage == "structure":
        return [(image["image_id"], image) for image in images]
    if stage == "regions":
        structure = pipeline.done_rows("structure")
        return [(i["image_id"], {**i, "structure_path": structure[i["image_id"]]["structure_path"]})
                for i in images if structure.get(i["image_id"], {}).get("status") == "ok"]
    if stage == "captions":
        regions, items = pipeline.done_rows("regions"), []
        for image in images:
            region, key = regions.get(image["image_id"]), pipeline.text_keys.get(image["image_id"])
            if region is None or region["status"] != "ok" or key is None:
                continue
            captions, source, _note = pipeline.captions_of_image(image["image_id"])
            items.append((key, {**image, "caption": captions[0] if captions else None, "caption_source": source,
                                "segments": region["segments"]}))
        return items
    assert stage == "filter"
    items = []
    for image_id, row in pipeline.done_rows("captions").items():
        if row["status"] == "ok" and row.get("caption"):
            record = {"image_id": image_id, "source_path": canonical[image_id]["source_path"],
                      "caption": row["caption"], "segments": row["segments"]}
            extra = pipeline.captions_of_image(image_id)[0][1:]
            if extra:
                record["extra_captions"] = extra
            items.append((pipeline.text_keys[image_id], record))
    return items


def _row_wise(images, out, stage):
    """Keys, pending items, cached (ok, failed) counts and the cached failures listed, from ``_reference_items`` and
    the stored rows as dicts, on a pipeline of its own."""
    pipeline = _pipeline(images, out)
    definition = pipeline.stages[stage]
    items = dict(sorted(_reference_items(pipeline, stage), key=lambda item: item[0]))
    done = pipeline.store(stage).stored().done()
    cached = {key: done[key] for key in items if key in done}
    pending = [(key, record) for key, record in items.items() if key not in done]
    failed = [key for key, row in cached.items() if row["status"] == "failed"]
    if definition.counts_rows:
        rows = [r for r in pipeline.manifest_rows.rows if r["status"] == "failed"][:3]
        listed = [(Path(r["source_path"]).name, r["error"]) for r in rows]
    else:
        listed = [(definition.label(items[key]), cached[key]["error"]) for key in failed[:MAX_FAILURES_LISTED]]
    return sorted(items), pending, (len(cached) - len(failed), len(failed)), listed


def _column_wise(images, out, stage):
    pipeline = _pipeline(images, out)
    keys = sorted(pipeline.item_keys(stage).to_pylist())
    assert pipeline.pending_count(stage) == len(_pipeline(images, out).plan(stage).pending)
    plan = pipeline.plan(stage)
    counts = (plan.cached.num_rows - plan.cached_failed, plan.cached_failed)
    summary = summarize(plan, [], [], 0.0)
    listed = [(f["file"], f["reason"]) for f in summary["failures"]]
    if stage != "manifest":
        assert (summary["cached"], summary["failed"]) == counts
    return keys, plan.pending, counts, listed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("columnwise"))


def _run(root):
    """A folder with failed files, identical files, several captions and none, run through the data stages."""
    images = root / "images"
    paths = make_generated_images(images, 5, size=(96, 72))
    shutil.copyfile(paths[0], images / "same_as_gen_0.jpg")  # identical bytes: one image, two files
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")  # fails ingest
    (images / "odd.png").write_bytes(paths[1].read_bytes()[:300])  # fails ingest (truncated)
    lines = (images / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    first = rows[0]
    rows.append({**first, "caption": "A second caption about the same scene with a red square."})
    rows = [row for row in rows if "gen_00004" not in json.dumps(row)]  # gen_00004 has no caption
    (images / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = root / "out"
    run_inline(_pipeline(images, out), DATA)
    return images, out


def _compare_all(images, out):
    for stage in DATA:
        keys, pending, counts, listed = _row_wise(images, out, stage)
        column_keys, column_pending, column_counts, column_listed = _column_wise(images, out, stage)
        assert column_keys == keys, stage
        assert column_pending == pending, stage
        if stage != "manifest" or not pending:
            assert column_counts == counts, stage
            assert column_listed == listed, stage


def test_a_cached_run_plans_the_same_column_wise(run):
    images, out = run
    pipeline = _pipeline(images, out)
    assert pipeline.done_table("ingest").num_rows == 8
    summaries = {s: summarize(pipeline.plan(s), [], [], 0.0) for s in DATA}
    assert summaries["ingest"]["failed"] == 2 and summaries["manifest"]["failed"] == 3  # + gen_00004: no caption
    assert {f["file"] for f in summaries["ingest"]["failures"]} == {"broken.jpg", "odd.png"}
    _compare_all(images, out)


def test_pending_work_is_counted_the_same_column_wise(tmp_path):
    images2, out2 = _run(tmp_path)  # file keys name the files' inodes: a copied folder would be new files
    pipeline = _pipeline(images2, out2)
    with_crop = next(i for i, r in pipeline.done_rows("regions").items() if r["segments"])
    (out2 / pipeline.done_rows("regions")[with_crop]["segments"][0]["crop_path"]).unlink()  # regions: 1 pending
    make_generated_images(images2, 1, size=(96, 72), start=5)  # a new image: ingest 1 pending
    rows = [json.loads(line) for line in (images2 / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    rows[1]["caption"] = "An edited caption naming a blue circle on the left."
    (images2 / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert len(_column_wise(images2, out2, "ingest")[1]) == 1
    assert len(_column_wise(images2, out2, "regions")[1]) == 1
    _compare_all(images2, out2)
    run_inline(_pipeline(images2, out2), ["ingest"])  # the new image now waits in structure
    assert len(_column_wise(images2, out2, "structure")[1]) == 1
    _compare_all(images2, out2)
    # The edited caption, the new image and gen_00000 (adding the image rewrote captions.jsonl one line per file,
    # which dropped its second caption) now wait in filter.
    run_inline(_pipeline(images2, out2), DATA[:4])
    assert len(_column_wise(images2, out2, "filter")[1]) == 3
    _compare_all(images2, out2)


def test_the_manifest_key_changes_exactly_when_its_rows_do(tmp_path):
    images2, out2 = _run(tmp_path)

    def key_and_rows():
        pipeline = _pipeline(images2, out2)
        return pipeline.stages["manifest"].item_key(pipeline), pipeline.manifest_rows.rows

    key, rows = key_and_rows()
    assert key_and_rows() == (key, rows)  # a second look: the same
    (images2 / "gen_00004.txt").write_text("A caption for the image that had none.\n", encoding="utf-8")
    changed_key, changed_rows = key_and_rows()  # its manifest row now reads "captions: not computed"
    assert changed_rows != rows and changed_key != key
    run_inline(_pipeline(images2, out2), DATA)
    final_key, final_rows = key_and_rows()
    assert final_rows != changed_rows and final_key not in (key, changed_key)
    (images2 / "gen_00004.txt").unlink()
    assert key_and_rows() == (key, rows)  # back to the first folder: the first rows, the first key

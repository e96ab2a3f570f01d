"""The column-wise plan of a cached run (``Pipeline.item_keys``, ``pending_count``, ``cached_summary``) against the
row-wise plan it stands in for (``Stage.items``, ``plan().pending``, ``summarize``), computed independently on the same
folder: item keys, pending counts and the summaries are equal for every stage, with failed files, identical files,
several captions per image, an image without a caption, a deleted output and a changed caption. The manifest's key
follows its rows: it changes exactly when the rows it would build change."""

from __future__ import annotations

import json
import shutil

import pytest

from configs import load_config
from pipelines.engine.execute import cached_summary, run_inline, summarize
from pipelines.engine.plan import Pipeline
from tests.corpus import make_generated_images

DATA = ["ingest", "structure", "regions", "captions", "filter", "manifest"]
CONFIG = {"model.clip_model": "structxlip/tiny-clip", "regions.method": "structure", "regions.max_regions": 3,
          "runtime.chunk_size": 2, "runtime.workers": 1, "captions.device": "cpu"}


def _pipeline(images, out):
    return Pipeline(images, out, load_config(overrides=CONFIG))


def _row_wise(images, out, stage):
    """Keys, pending count and summary of ``stage`` through the row-wise plan, on a pipeline of its own."""
    pipeline = _pipeline(images, out)
    plan = pipeline.plan(stage)
    definition = pipeline.stages[stage]
    keys = sorted(key for key, _record in definition.items(pipeline.view_of(stage)))
    return keys, len(plan.pending), summarize(plan, [], [], 0.0)


def _column_wise(images, out, stage):
    pipeline = _pipeline(images, out)
    keys = sorted(pipeline.item_keys(stage).to_pylist())
    pending = pipeline.pending_count(stage)
    return keys, pending, cached_summary(pipeline, stage) if not pending else None


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
        keys, pending, summary = _row_wise(images, out, stage)
        column_keys, column_pending, column_summary = _column_wise(images, out, stage)
        assert column_keys == keys, stage
        assert column_pending == pending, stage
        if not pending:
            assert column_summary == summary, stage


def test_a_cached_run_plans_the_same_column_wise(run):
    images, out = run
    pipeline = _pipeline(images, out)
    assert pipeline.done_table("ingest").num_rows == 8
    failed = [s for s in DATA if cached_summary(pipeline, s)["failed"]]
    assert failed and "ingest" in failed  # the failures are listed from the columns, by file
    files = {f["file"] for f in cached_summary(pipeline, "ingest")["failures"]}
    assert files == {"broken.jpg", "odd.png"}
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
    assert _column_wise(images2, out2, "ingest")[1] == 1
    assert _column_wise(images2, out2, "regions")[1] == 1
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

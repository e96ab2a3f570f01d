"""Planning and executing stages over the store, without an orchestrator: only pending items run; a missing or
truncated output file, or an unreadable store part, makes exactly its items pending again (with one warning); a bad
item fails alone; a storage error fails the chunk and records nothing; a moved output folder stays cached."""

from __future__ import annotations

import errno
import http.server
import json
import logging
import shutil

import pytest

from configs import load_config
from pipelines.engine import stages as stage_module
from pipelines.engine.execute import StageFailed, run_inline
from pipelines.engine.plan import Pipeline
from pipelines.engine.stages import PipelineView, text_item_key
from tests.corpus import make_generated_images
from tests.local_http import serving

DATA = ["ingest", "structure", "regions", "captions", "filter", "manifest"]
CONFIG = {"model.clip_model": "structxlip/tiny-clip", "regions.method": "structure", "regions.max_regions": 3,
          "runtime.chunk_size": 2, "runtime.workers": 1, "train.epochs": 1, "train.batch_size": 2,
          "train.device": "cpu", "evaluate.split": "all", "evaluate.device": "cpu", "captions.device": "cpu"}


def _counts(summaries):
    return {s["stage"]: (s["processed"], s["cached"], s["failed"]) for s in summaries}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    images = tmp_path_factory.mktemp("plan") / "images"
    make_generated_images(images, 5, size=(96, 72))
    return images


def _pipeline(images, out, **overrides):
    return Pipeline(images, out, load_config(overrides={**CONFIG, **overrides}))


def test_nothing_is_redone_and_broken_outputs_are_rebuilt_exactly(folder, tmp_path, caplog):
    out = tmp_path / "out"
    first = run_inline(_pipeline(folder, out), DATA)
    assert _counts(first) == {s: (5, 0, 0) for s in DATA}
    pipeline = _pipeline(folder, out)
    assert all(not pipeline.plan(s).pending for s in DATA)

    # Delete one crop and truncate one (other image's) structure map: exactly those items are recomputed.
    regions = pipeline.done_rows("regions")
    with_crop = next(i for i, r in regions.items() if r["segments"])
    crop = out / regions[with_crop]["segments"][0]["crop_path"]
    crop.unlink()
    other = next(i for i in pipeline.done_rows("structure") if i != with_crop)
    structure_map = out / pipeline.done_rows("structure")[other]["structure_path"]
    structure_map.write_bytes(structure_map.read_bytes()[:20])
    caplog.set_level(logging.WARNING)
    again = run_inline(_pipeline(folder, out), DATA)
    assert _counts(again)["structure"] == (1, 4, 0)
    # The rebuilt map has the same key and bytes, so later stages keep their results; only the crop's image reruns.
    assert {s: c for s, c in _counts(again).items() if s != "structure"} == {
        "ingest": (0, 5, 0), "regions": (1, 4, 0), "captions": (0, 5, 0), "filter": (0, 5, 0), "manifest": (0, 5, 0)}
    assert crop.is_file() and len(structure_map.read_bytes()) > 20
    warnings = [r.getMessage() for r in caplog.records if "missing or changed outputs" in r.getMessage()]
    assert any(w.startswith("structure: 1 item(s)") for w in warnings), warnings
    assert any(w.startswith("regions: 1 item(s)") for w in warnings), warnings
    assert all(not _pipeline(folder, out).plan(s).pending for s in DATA)


def test_a_corrupt_part_is_moved_aside_and_its_items_recomputed(folder, tmp_path, caplog):
    out = tmp_path / "out"
    run_inline(_pipeline(folder, out), DATA[:2])
    import pyarrow.parquet as pq

    part = sorted((out / "stages" / "structure").glob("*/part-*.parquet"))[0]
    lost = pq.read_table(part).num_rows
    part.write_bytes(b"PAR1 not really parquet")
    caplog.set_level(logging.WARNING)
    pipeline = _pipeline(folder, out)
    pending = pipeline.plan("structure").pending
    assert len(pending) == lost
    assert (part.parent / (part.name + ".corrupt")).is_file() and not part.exists()
    assert any(part.name in r.getMessage() and "moved aside" in r.getMessage() for r in caplog.records)
    assert _counts(run_inline(pipeline, ["structure"]))["structure"] == (lost, 5 - lost, 0)


def test_one_bad_item_fails_alone_and_a_storage_error_records_nothing(folder, tmp_path, monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    lines = (images / "captions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["caption"] = "A dog. " * 300_000  # 2.1 MB: spaCy refuses texts over 1,000,000 characters (E088)
    lines[0] = json.dumps(first)
    (images / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summaries = run_inline(_pipeline(images, out, **{"runtime.chunk_size": 8}), DATA)
    captions = _counts(summaries)["captions"]
    assert captions == (4, 0, 1), captions
    failure = next(s for s in summaries if s["stage"] == "captions")["failures"][0]
    assert failure["file"] == first["file"] and "more than the 1,000,000 spaCy splits" in failure["reason"] and len(failure["reason"]) <= 300
    # The failure is recorded: the next run counts it as a cached failure and does not retry it.
    again = run_inline(_pipeline(images, out, **{"runtime.chunk_size": 8}), ["captions"])
    assert _counts(again)["captions"] == (0, 4, 1) and again[0]["failed_cached"] == 1

    # A full disk while writing maps fails the chunk: the stage fails, nothing is recorded, the next run retries.
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "maps" / "x.png"))

    monkeypatch.setattr(stage_module.Structure, "run", disk_full)
    with pytest.raises(StageFailed) as failed:
        run_inline(_pipeline(images, out, **{"structure.canny_low": 10}), ["structure"])
    assert failed.value.summary["status"] == "failed" and "disk full while writing" in failed.value.summary["error"] \
        and str(out / "maps" / "x.png") in failed.value.summary["error"]
    monkeypatch.undo()
    assert len(_pipeline(images, out, **{"structure.canny_low": 10}).plan("structure").pending) == 5


def test_a_moved_output_folder_stays_cached_through_train_and_evaluate(folder, tmp_path):
    out = tmp_path / "out"
    everything = [*DATA, "train", "evaluate"]
    first = run_inline(_pipeline(folder, out), everything)
    assert _counts(first)["train"] == (1, 0, 0) and _counts(first)["evaluate"] == (1, 0, 0)
    moved = tmp_path / "elsewhere" / "out"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    pipeline = _pipeline(folder, moved)
    assert {s: len(pipeline.plan(s).pending) for s in everything} == dict.fromkeys(everything, 0)
    # A changed training parameter retrains (and re-evaluates); the data stages stay cached.
    changed = _pipeline(folder, moved, **{"train.lr": 1e-4})
    assert [s for s in everything if changed.plan(s).pending] == ["train"]
    assert changed.keys["evaluate"] != pipeline.keys["evaluate"]
    # Deleting the exported model makes train pending again (its files are verified like any output).
    shutil.rmtree(moved / "train" / "model")
    assert [s for s in everything if _pipeline(folder, moved).plan(s).pending] == ["train"]


def test_preflight_names_the_key_and_the_fix(folder, tmp_path, monkeypatch):
    from pipelines.engine.plan import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    pipeline = _pipeline(folder, tmp_path / "out", **{"model.clip_model": "org/not-cached"})
    with pytest.raises(ValueError) as error:
        preflight(pipeline, ["captions", "filter"])
    message = str(error.value)
    assert message.startswith("model.clip_model: 'org/not-cached' is not in the local Hugging Face cache")
    assert "configs/demo.yaml" in message and "\n" not in message
    missing_spacy = _pipeline(folder, tmp_path / "out", **{"filter.spacy_model": "xx_no_such_pipeline"})
    with pytest.raises(ValueError, match=r"^filter.spacy_model: spaCy pipeline 'xx_no_such_pipeline' is not installed"):
        preflight(missing_spacy, ["filter"])
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    with pytest.raises(ValueError, match="is not writable"):
        preflight(_pipeline(folder, blocked / "out"), ["ingest"])
    preflight(_pipeline(folder, tmp_path / "fine"), ["ingest", "structure", "regions", "captions", "filter"])


def test_preflight_checks_the_sam_model_only_when_regions_use_sam(folder, tmp_path, monkeypatch):
    from pipelines.engine.plan import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    sam = _pipeline(folder, tmp_path / "out", **{"regions.method": "sam", "regions.sam_model": "org/no-sam"})
    with pytest.raises(ValueError, match=r"^regions.sam_model: 'org/no-sam' is not in the local Hugging Face cache"):
        preflight(sam, ["structure", "regions"])
    preflight(sam, ["structure"])  # only the selected stages' needs are checked
    preflight(_pipeline(folder, tmp_path / "out", **{"regions.sam_model": "org/no-sam"}), ["regions"])  # structure


class _Hub(http.server.BaseHTTPRequestHandler):
    """A local stand-in for the hub's ``HEAD /{repo}/resolve/{revision}/config.json``: answers ``status`` (0: closes
    the connection without an answer); ``requests`` counts what it was asked."""

    status = 200
    requests = 0

    def do_HEAD(self):  # noqa: N802 - http.server's name
        type(self).requests += 1
        if not self.status:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.send_response(self.status)
        if self.status == 200:
            self.send_header("ETag", '"abc"')
            self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "problem", "requests"), [
    (200, None, 1), (404, "the hub has no model 'org/some-clip' this machine may read", 1),
    (503, "'org/some-clip' is not in the local Hugging Face cache and the hub cannot be reached", 1),
    (0, "'org/some-clip' is not in the local Hugging Face cache and the hub cannot be reached", 2)])
def test_preflight_asks_the_hub_once_and_never_waits_for_its_backoff(tmp_path, monkeypatch, status, problem,
                                                                     requests):
    """A hub model not in the cache is probed with one HEAD of its config.json: an answer is final (a 503 is not
    retried five times with backoff, as a download would), no answer is tried once more."""
    from huggingface_hub import constants

    from pipelines.engine.plan import _model_problems

    hub = type("Hub", (_Hub,), {"status": status})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # tests/conftest.py sets it before the import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with serving(hub) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        problems = _model_problems("model.clip_model", "org/some-clip")
    assert hub.requests == requests
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(f"model.clip_model: {problem}"), problems


def test_preflight_names_a_model_setting_that_is_no_repo_id_without_asking_the_hub(monkeypatch):
    from pipelines.engine.plan import _model_problems

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("org/two words", "a/b/c"):
        (problem,) = _model_problems("model.clip_model", name)
        assert problem.startswith(f"model.clip_model: {name!r} is neither a model folder nor a Hugging Face model id")


def test_missing_inputs_names_the_stage_its_input_and_the_stages_that_make_it(folder, tmp_path):
    from pipelines.engine.plan import missing_inputs

    pipeline = _pipeline(folder, tmp_path / "out")
    data = "ingest,structure,regions,captions,filter,manifest"
    for stages in (["train"], ["train", "evaluate"], ["evaluate"]):
        problem = missing_inputs(pipeline, stages)
        assert problem == (f"stage {stages[0]} needs a manifest and {pipeline.layout.manifest_dir} has none: run the "
                           f"data stages first (all stages, or --stages {data})"), stages
    assert missing_inputs(pipeline, [*DATA, "train", "evaluate"]) is None  # made by an earlier selected stage
    assert missing_inputs(pipeline, ["structure"]) is None  # a data stage lists what its upstream has
    run_inline(pipeline, DATA)
    pipeline = _pipeline(folder, tmp_path / "out")
    assert missing_inputs(pipeline, ["train"]) is None
    assert missing_inputs(pipeline, ["evaluate"]) == ("stage evaluate needs the fine-tuned model of this manifest and "
                                                      "config, and none is stored: run the train stage first")
    assert missing_inputs(pipeline, ["train", "evaluate"]) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert missing_inputs(_pipeline(empty, tmp_path / "out2"), ["ingest"]).startswith(f"no images found in {empty}")


def test_an_output_folder_inside_the_images_folder_is_not_ingested(folder, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    out = images / "out"
    run_inline(_pipeline(images, out), DATA[:3])
    again = _pipeline(images, out)
    assert len(again.scan.files) == 5 and not again.plan("ingest").pending


def test_the_pipeline_provides_everything_a_stage_reads(folder, tmp_path):
    pipeline = _pipeline(folder, tmp_path / "out")
    members = set(PipelineView.__annotations__) | {name for name in vars(PipelineView) if not name.startswith("_")}
    assert {"stages", "keys", "images", "done_rows", "manifest_digest"} <= members
    assert sorted(name for name in members if name not in vars(pipeline) and not hasattr(Pipeline, name)) == []


def test_planning_pauses_the_garbage_collector_and_restores_it(folder, tmp_path, monkeypatch):
    # Planning a catalogue runs with the cyclic collector off (its automatic full collections walk every item's
    # objects again and again); it is on again afterwards, also when planning raises, and stays off if it was off.
    import gc

    pipeline = _pipeline(folder, tmp_path / "out")
    seen = []
    original = Pipeline.item_keys

    def item_keys(self, stage):
        seen.append(gc.isenabled())
        return original(self, stage)

    monkeypatch.setattr(Pipeline, "item_keys", item_keys)
    from pipelines.steps import ingest

    scan_images = ingest.scan_images

    def scanning(*args, **kwargs):
        seen.append(gc.isenabled())
        return scan_images(*args, **kwargs)

    monkeypatch.setattr(ingest, "scan_images", scanning)
    assert gc.isenabled()
    assert len(pipeline.scan) == 5 and gc.isenabled()  # the folder's scan too
    assert pipeline.pending_count("ingest") == 5 and pipeline.plan("ingest").pending
    assert len(seen) > 1 and not any(seen) and gc.isenabled()

    def broken(self, stage):
        raise RuntimeError("planning failed")

    monkeypatch.setattr(Pipeline, "item_keys", broken)
    with pytest.raises(RuntimeError, match="planning failed"):
        _pipeline(folder, tmp_path / "other").pending_count("ingest")
    assert gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(RuntimeError):
            _pipeline(folder, tmp_path / "third").plan("ingest")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_images_captions_are_the_union_over_its_files_in_path_order(tmp_path):
    # Three files with the same bytes are one image: its captions are b's two (jsonl, in file order) then c's
    # sidecar, a having none; the source is that of the first file with a caption. A lone file keeps its own.
    images = tmp_path / "images"
    paths = make_generated_images(images, 3, size=(64, 48))
    (images / "captions.jsonl").unlink()
    same = paths[0].read_bytes()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(same)
    paths[0].unlink()
    (images / "c.txt").write_text("One from a sidecar.", encoding="utf-8")
    (images / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"file": "b.jpg", "caption": "Two."}, {"file": paths[1].name, "caption": "Four."},
        {"file": "b.jpg", "caption": "Three."}, {"file": "c.jpg", "caption": "Ignored: c has a sidecar."}]),
        encoding="utf-8")
    run_inline(_pipeline(images, tmp_path / "out"), ["ingest"])
    pipeline = _pipeline(images, tmp_path / "out")
    ids = {row["source_path"].rsplit("/", 1)[1]: row["image_id"] for row in pipeline.done_rows("ingest").values()}
    assert ids["a.jpg"] == ids["b.jpg"] == ids["c.jpg"] and len(set(ids.values())) == 3
    assert pipeline.captions_of_image(ids["a.jpg"]) == (["Two.", "Three.", "One from a sidecar."], "jsonl", None)
    assert pipeline.captions_of_image(ids[paths[1].name]) == (["Four."], "jsonl", None)
    assert pipeline.captions_of_image(ids[paths[2].name]) == ([], None, None)
    assert pipeline.captions_of_image("0" * 32) == ([], None, None)
    keys = pipeline.text_keys
    assert keys[ids["a.jpg"]] == text_item_key(ids["a.jpg"], "Two.", ["Three.", "One from a sidecar."])
    assert keys[ids[paths[1].name]] == text_item_key(ids[paths[1].name], "Four.")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_manifest_part_is_rewritten(folder, tmp_path, caplog, damage):
    """A manifest part cut short or overwritten is replaced by the next run (not an error on every run after)."""
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    run_inline(_pipeline(folder, out), DATA)
    part = sorted((out / "manifest").glob("*.parquet"))[0]
    before = pq.read_table(part)
    part.write_bytes(part.read_bytes()[:len(part.read_bytes()) // 2] if damage == "truncated" else b"junk")
    caplog.set_level(logging.WARNING)
    again = run_inline(_pipeline(folder, out), DATA)
    assert _counts(again)["manifest"][0] == 5 and _counts(again)["ingest"] == (0, 5, 0)
    rebuilt = pq.read_table(out / "manifest").sort_by("image_id")
    assert rebuilt.equals(before.sort_by("image_id"))
    assert all(not _pipeline(folder, out).plan(s).pending for s in DATA)


def test_the_manifest_rows_are_read_again_only_after_a_stage_they_follow_from(folder, tmp_path):
    out = tmp_path / "out"
    run_inline(_pipeline(folder, out), DATA)
    pipeline = _pipeline(folder, out)
    rows = pipeline.manifest_rows
    for stage in ("manifest", "train", "evaluate"):
        pipeline.invalidate(stage)
        assert pipeline.manifest_rows is rows, stage
    pipeline.invalidate("filter")
    assert pipeline.manifest_rows is not rows
    assert [r["image_id"] for r in pipeline.manifest_rows.rows] == [r["image_id"] for r in rows.rows]


def test_a_gallery_shows_the_images_its_run_computed_and_reads_no_other_rows(folder, tmp_path):
    from pipelines.engine.stages import gallery_images

    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(folder, images)
    run_inline(_pipeline(images, out), DATA)
    before = {row["image_id"] for row in _pipeline(images, out).images}
    make_generated_images(images, 2, size=(96, 72), start=5)  # a run that adds 2 images
    pipeline = _pipeline(images, out)
    run_inline(pipeline, ["ingest"])
    pipeline = _pipeline(images, out)
    added = sorted({row["image_id"] for row in pipeline.images} - before)
    assert len(added) == 2
    assert gallery_images(pipeline, pipeline.plan("structure").pending) == added
    # At most `limit` of them, evenly spread by image id.
    assert gallery_images(pipeline, pipeline.plan("structure").pending, limit=1) == added[:1]
    run_inline(pipeline, DATA[1:])
    pipeline = _pipeline(images, out)
    everything = sorted(before | set(added))
    # The manifest, one item made of every image: all of them, or an even sample (0, 2, 4 of 7 by id).
    manifest = [(key, {"rows": []}) for key in ("manifest",)]
    assert gallery_images(pipeline, manifest) == everything
    assert gallery_images(pipeline, manifest, limit=3) == [everything[0], everything[2], everything[4]]

    for stage in ("structure", "regions", "captions"):
        whole = pipeline.done_rows(stage)
        assert pipeline.done_rows(stage, added) == {i: row for i, row in whole.items() if i in added}
    structure, scored = pipeline.done_rows("structure"), pipeline.done_rows("captions")
    rows = pipeline.stages["captions"].example_rows(pipeline.view_of("captions"), added)
    assert [row["image_id"] for row in rows] == added
    for row in rows:
        assert row["structure_path"] == structure[row["image_id"]]["structure_path"]
        assert row["segments"] == scored[row["image_id"]]["segments"]
    shown = pipeline.stages["manifest"].example_rows(pipeline.view_of("manifest"), added)
    assert sorted(row["image_id"] for row in shown) == added
    # The rows of the images asked for are checked as every row is: a lost map leaves its image out.
    (out / structure[added[0]]["structure_path"]).unlink()
    assert set(_pipeline(images, out).done_rows("structure", added)) == {added[1]}
    assert added[0] not in _pipeline(images, out).done_rows("structure")

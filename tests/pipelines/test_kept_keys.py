"""Keys a run keeps for the next one (``OUT/cache``): the ingest item key of every file (``Pipeline.file_keys``) and
the text stages' item keys with the captions' digest (``Pipeline.caption_keys``). A fully cached run reuses them
without reading a caption or hashing a file; every change to what they follow from (an image's stat fields, a caption
line, a sidecar's bytes, a sidecar appearing or going, a captions.csv, a sidecar link's target, the captioner
setting) gives the keys computed from the folder itself, compared here with ``_text_key_table`` and
``_captions_digest``, which read the folder every time."""

from __future__ import annotations

import json
import logging
import os

import pyarrow as pa
import pytest

from configs import load_config
from pipelines.engine.execute import run_inline
from pipelines.engine.plan import Pipeline
from pipelines.steps import ingest
from tests.corpus import make_generated_images

DATA = ["ingest", "structure", "regions", "captions", "filter", "manifest"]
CONFIG = {"model.clip_model": "structxlip/tiny-clip", "regions.method": "structure", "regions.max_regions": 2,
          "runtime.chunk_size": 4, "runtime.workers": 1, "captions.device": "cpu"}


def _pipeline(images, out, **overrides):
    return Pipeline(images, out, load_config(overrides={**CONFIG, **overrides}))


@pytest.fixture
def folder(tmp_path):
    """A folder run through the data stages: 4 images, one with a sidecar caption, the others in captions.jsonl (a
    run per test: file keys name paths and inodes, so a copied folder would be new files)."""
    images = tmp_path / "images"
    make_generated_images(images, 4, size=(80, 60))
    (images / "gen_00003.txt").write_text("A sidecar caption of a small scene with a square.\n", encoding="utf-8")
    run_inline(_pipeline(images, tmp_path / "out"), DATA)
    return images, tmp_path / "out"


def _from_the_folder(pipeline):
    """The caption keys read from the folder itself, never from OUT."""
    return pipeline._text_key_table(), pipeline._captions_digest()


def _assert_current(images, out, **overrides):
    pipeline = _pipeline(images, out, **overrides)
    table, digest = _from_the_folder(_pipeline(images, out, **overrides))
    assert pipeline.caption_keys.table.equals(table)
    assert pipeline.captions_digest() == digest
    assert pipeline.file_keys.to_pylist() == pipeline.scan.file_keys()
    return pipeline


def test_a_cached_run_reads_no_caption_and_hashes_no_file(folder, monkeypatch):
    images, out = folder
    assert (out / "cache" / "file-keys.parquet").is_file() and (out / "cache" / "caption-keys.parquet").is_file()
    expected = _assert_current(images, out)
    keys = {stage: expected.item_keys(stage).to_pylist() for stage in DATA}

    def refused(*args, **kwargs):
        raise AssertionError("a fully cached run read the folder's captions or hashed its files")

    # one file per image: the images as the ingest rows give them, by image id (image_table's shortcut)
    rows = sorted(expected.done_rows("ingest").values(), key=lambda row: row["image_id"])
    assert expected.image_table.to_pylist() == [{"image_id": r["image_id"], "source_path": r["source_path"]}
                                                for r in rows]
    monkeypatch.setattr(ingest, "read_captions", refused)
    monkeypatch.setattr(ingest.ScanResult, "file_keys", refused)
    monkeypatch.setattr(ingest, "file_key", refused)
    pipeline = _pipeline(images, out)
    assert {stage: pipeline.item_keys(stage).to_pylist() for stage in DATA} == keys
    assert all(pipeline.pending_count(stage) == 0 for stage in DATA)
    assert pipeline.captions_digest() == expected.captions_digest()


def _rewrite_jsonl_same_size(images, out):
    path = images / "captions.jsonl"
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    rows[0]["caption"] = rows[0]["caption"].replace("a", "o", 1)  # the same size: only the stat times tell
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert len(path.read_text(encoding="utf-8")) == len(text)


def _add_sidecar(images, out):
    (images / "gen_00000.txt").write_text("A new sidecar caption.\n", encoding="utf-8")


def _edit_sidecar_same_size(images, out):
    path = images / "gen_00003.txt"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("small", "SMALL"), encoding="utf-8")


def _remove_sidecar(images, out):
    (images / "gen_00003.txt").unlink()


def _add_csv(images, out):
    (images / "captions.jsonl").unlink()
    (images / "captions.csv").write_text("file,caption\ngen_00001.jpg,A caption from a CSV file.\n", encoding="utf-8")


@pytest.mark.parametrize("change", [_rewrite_jsonl_same_size, _add_sidecar, _edit_sidecar_same_size, _remove_sidecar,
                                    _add_csv])
def test_every_change_to_the_captions_gives_the_folders_keys(folder, change):
    images, out = folder
    before = _assert_current(images, out)
    change(images, out)
    after = _assert_current(images, out)
    assert (after.caption_keys.table, after.captions_digest()) != (before.caption_keys.table, before.captions_digest())
    assert _assert_current(images, out).captions_digest() == after.captions_digest()  # kept again, and reused


def test_a_sidecar_link_not_followed_by_the_scan_still_counts(folder):
    images, out = folder
    target = images.parent / "elsewhere.txt"
    target.write_text("A caption behind a link.\n", encoding="utf-8")
    (images / "gen_00001.txt").symlink_to(target)
    unfollowed = {"ingest.follow_symlinks": False}  # another ingest key: ingested again under it
    run_inline(_pipeline(images, out, **unfollowed), ["ingest"])
    before = _assert_current(images, out, **unfollowed)
    linked = next(i["image_id"] for i in before.images if i["source_path"].endswith("gen_00001.jpg"))
    assert before.captions_of_image(linked)[0] == ["A caption behind a link."]
    target.write_text("Another caption behind the same link.\n", encoding="utf-8")  # the link itself is unchanged
    after = _assert_current(images, out, **unfollowed)
    assert after.captions_digest() != before.captions_digest()


def test_the_captioner_setting_gives_its_own_keys(folder):
    images, out = folder
    path = images / "captions.jsonl"
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if "gen_00002" not in line]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")  # gen_00002: no caption
    without = _assert_current(images, out)
    with_captioner = _assert_current(images, out, **{"captions.captioner": "some/captioner"})
    assert with_captioner.caption_keys.table.num_rows == without.caption_keys.table.num_rows + 1


def test_a_changed_image_is_hashed_again_and_keys_wait_for_its_ingest(folder):
    images, out = folder
    os.utime(images / "gen_00002.jpg", ns=(1_000_000_000, 1_000_000_000))  # new stat fields: a new file key
    pipeline = _pipeline(images, out)
    assert pipeline.file_keys.to_pylist() == pipeline.scan.file_keys()
    assert pipeline.pending_count("ingest") == 1
    assert pipeline._caption_keys_key() is None  # not every file ingested: nothing is kept or reused
    run_inline(pipeline, ["ingest"])
    _assert_current(images, out)


def test_unreadable_or_foreign_kept_keys_are_made_again(folder):
    images, out = folder
    (out / "cache" / "file-keys.parquet").write_bytes(b"not parquet")
    caption_keys = out / "cache" / "caption-keys.parquet"
    other = pa.table({"image_id": ["x"], "text_key": ["y"]}).replace_schema_metadata(
        {b"structxlip.derived": json.dumps({"key": "another", "notes": {}}).encode()})
    import pyarrow.parquet as pq
    pq.write_table(other, caption_keys)
    _assert_current(images, out)
    assert (out / "cache" / "file-keys.parquet").read_bytes()[:4] == b"PAR1"  # made again and kept
    assert pq.read_table(caption_keys).num_rows == 4


def test_caption_problems_are_reported_on_every_run(folder, caplog):
    images, out = folder
    with open(images / "captions.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    for _ in range(2):  # read from the folder, then from what OUT keeps
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="structxlip.plan"):
            _pipeline(images, out).text_key_table  # noqa: B018
        assert [r.getMessage() for r in caplog.records] == [
            f"captions: captions.jsonl line 5: invalid JSON: Expecting property name enclosed in double quotes"]


def test_planning_a_new_folder_makes_no_output_folder(tmp_path):
    images = tmp_path / "images"
    make_generated_images(images, 2, size=(80, 60))
    pipeline = _pipeline(images, tmp_path / "out")
    assert all(pipeline.pending_count(stage) == 2 for stage in ("ingest",))
    assert pipeline.file_keys.to_pylist() == pipeline.scan.file_keys()
    assert not (tmp_path / "out").exists()  # a run refused after planning leaves nothing behind
    run_inline(pipeline, ["ingest"])
    assert (tmp_path / "out" / "cache" / "file-keys.parquet").is_file()  # kept once results are
    assert _pipeline(images, tmp_path / "out").file_keys.to_pylist() == pipeline.scan.file_keys()


def _independent_file_keys(images, out) -> list[str]:
    """Every file key hashed from the scan itself (``file_key`` of each location and stat fields), never from OUT."""
    scan = _pipeline(images, out).scan
    return [ingest.file_key(location, *times, *ids)
            for location, times, ids in zip(scan.locations, scan.times.tolist(), scan.ids.tolist())]


def _counting_file_key(monkeypatch) -> list[str]:
    hashed: list[str] = []
    real = ingest.file_key

    def counted(location, *fields):
        hashed.append(location)
        return real(location, *fields)

    monkeypatch.setattr(ingest, "file_key", counted)
    return hashed


def test_a_changed_folder_hashes_only_its_new_and_changed_files(folder, monkeypatch):
    images, out = folder
    (images / "added.jpg").write_bytes((images / "gen_00000.jpg").read_bytes()[::-1])  # a new file (unreadable)
    os.utime(images / "gen_00002.jpg", ns=(2_000_000_000, 2_000_000_000))  # new stat fields
    (images / "gen_00001.jpg").unlink()
    expected = _independent_file_keys(images, out)
    hashed = _counting_file_key(monkeypatch)
    assert _pipeline(images, out).file_keys.to_pylist() == expected
    assert sorted(os.path.basename(location) for location in hashed) == ["added.jpg", "gen_00002.jpg"]
    hashed.clear()  # kept again: the next run reads them all
    assert _pipeline(images, out).file_keys.to_pylist() == expected and hashed == []


def test_an_undecodable_file_name_keeps_the_keys_without_locations(folder, monkeypatch):
    images, out = folder
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not valid UTF-8
    try:
        (images / name).write_bytes((images / "gen_00000.jpg").read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not valid UTF-8")
    expected = _independent_file_keys(images, out)
    assert _pipeline(images, out).file_keys.to_pylist() == expected  # every file hashed, the keys kept
    hashed = _counting_file_key(monkeypatch)
    assert _pipeline(images, out).file_keys.to_pylist() == expected and hashed == []
    (images / "gen_00002.jpg").unlink()  # then a change: nothing to join on, every file hashed again
    expected = _independent_file_keys(images, out)
    hashed.clear()
    assert _pipeline(images, out).file_keys.to_pylist() == expected and len(hashed) == 4

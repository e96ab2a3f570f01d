"""A run that changes a few images rebuilds only their manifest rows (``Pipeline.manifest_update``, ``row_signatures``,
``write_manifest(replace=...)``), and the manifest it leaves equals the one built from every row
(``Pipeline.manifest_rows``, ``build_manifest_rows``: the rules tested on their own in ``test_manifest.py``), after
each kind of change a folder sees: new images, an edited caption, a deleted file, a duplicate file, a file that fails,
another split, and a manifest changed behind the run's back."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pytest

from configs import load_config
from pipelines.engine.execute import run_inline
from pipelines.engine.plan import Pipeline
from pipelines.steps.manifest import failed_image_id, write_manifest
from storage.manifest import manifest_table, read_manifest
from storage.layout import OutputLayout
from storage.parquet import parquet_parts
from tests.corpus import make_generated_images
from tests.pipelines.test_columnwise_plan import CONFIG, DATA, _run


def _pipeline(images, out, **overrides):
    return Pipeline(images, out, load_config(overrides={**CONFIG, **overrides}))


def _on_disk(out) -> list[dict]:
    return read_manifest(out).sort_by("image_id").to_pylist()


def _built_whole(images, out, **overrides) -> list[dict]:
    """Every row built from the stages' results (the path before signatures), as the manifest stores them."""
    rows = _pipeline(images, out, **overrides).manifest_rows.rows
    return manifest_table(rows).sort_by("image_id").to_pylist()


def _update(images, out, **overrides) -> tuple[list[str], list[str]]:
    """(image ids of the rows the next manifest run builds, image ids whose row on disk it replaces)."""
    record = _pipeline(images, out, **overrides).manifest_update()
    assert "replace" in record, "the manifest on disk should have known signatures"
    return sorted(r["image_id"] for r in record["rows"]), sorted(record["replace"].to_pylist())


def _run_and_check(images, out, **overrides) -> dict:
    (summary,) = [s for s in run_inline(_pipeline(images, out, **overrides), DATA) if s["stage"] == "manifest"]
    assert _on_disk(out) == _built_whole(images, out, **overrides)
    assert OutputLayout(out).manifest_index.is_file()
    return summary


def _captions(images) -> list[dict]:
    return [json.loads(line) for line in (images / "captions.jsonl").read_text(encoding="utf-8").splitlines()]


def _write_captions(images, rows) -> None:
    (images / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _id_of(out, name) -> str:
    (row,) = [r for r in _on_disk(out) if r["source_path"].endswith("/" + name)]
    return row["image_id"]


def test_each_change_rebuilds_only_its_rows_and_the_manifest_equals_a_whole_rebuild(tmp_path):
    images, out = _run(tmp_path)  # 5 images, a duplicate file, 2 failed files, 2 captions of one, none of another
    layout = OutputLayout(out)
    assert layout.manifest_index.is_file()
    assert _on_disk(out) == _built_whole(images, out)
    assert _update(images, out) == ([], [])  # nothing changed: nothing to build

    # Two new images with captions: their rows only, nothing replaced.
    before = _captions(images)
    make_generated_images(images, 2, size=(96, 72), start=5)  # (it writes captions.jsonl anew: the old lines kept)
    _write_captions(images, before + [r for r in _captions(images) if r["file"] in ("gen_00005.jpg", "gen_00006.jpg")])
    run_inline(_pipeline(images, out), DATA[:-1])
    new_ids = sorted(_pipeline(images, out).done_rows("structure").keys() - {r["image_id"] for r in _on_disk(out)})
    assert len(new_ids) == 2
    assert _update(images, out) == (new_ids, [])
    _run_and_check(images, out)

    # An edited caption: that image's row, replacing its row on disk.
    rows = _captions(images)
    edited = next(r for r in rows if r["file"] == "gen_00002.jpg")
    edited["caption"] = "An edited caption naming a blue circle on the left."
    _write_captions(images, rows)
    run_inline(_pipeline(images, out), DATA[:-1])
    gen2 = _id_of(out, "gen_00002.jpg")
    assert _update(images, out) == ([gen2], [gen2])
    _run_and_check(images, out)

    # A deleted file: its row goes, no row is built.
    gen3 = _id_of(out, "gen_00003.jpg")
    (images / "gen_00003.jpg").unlink()
    run_inline(_pipeline(images, out), DATA[:-1])
    assert _update(images, out) == ([], [gen3])
    summary = _run_and_check(images, out)
    assert gen3 not in {r["image_id"] for r in _on_disk(out)}

    # A second copy of an image: the image's row (its duplicate_paths) changes.
    gen1 = _id_of(out, "gen_00001.jpg")
    shutil.copyfile(images / "gen_00001.jpg", images / "zz_copy_of_gen_1.jpg")
    run_inline(_pipeline(images, out), DATA[:-1])
    assert _update(images, out) == ([gen1], [gen1])
    _run_and_check(images, out)
    (row,) = [r for r in _on_disk(out) if r["image_id"] == gen1]
    assert [os.path.basename(p) for p in row["duplicate_paths"]] == ["zz_copy_of_gen_1.jpg"]

    # A file that cannot be read as an image: a failed row of its own.
    (images / "zz_broken.jpg").write_bytes(b"still not a jpeg")
    run_inline(_pipeline(images, out), DATA[:-1])
    built, replaced = _update(images, out)
    assert replaced == [] and len(built) == 1
    _run_and_check(images, out)
    (row,) = [r for r in _on_disk(out) if r["image_id"] == built[0]]
    assert row["status"] == "failed" and row["error"].startswith("ingest: ")

    # Other split ratios: every row follows from them, every row is built again.
    ratios = {"manifest.split_ratios": {"train": 0.5, "val": 0.25, "test": 0.25}}
    every = sorted(r["image_id"] for r in _on_disk(out))
    assert _update(images, out, **ratios) == (every, every)
    _run_and_check(images, out, **ratios)
    assert _update(images, out, **ratios) == ([], [])
    assert summary["stage"] == "manifest"


def test_a_manifest_changed_behind_the_run_is_compared_row_by_row(tmp_path):
    images, out = _run(tmp_path)
    layout = OutputLayout(out)
    (part,) = parquet_parts(layout.manifest_dir)
    table = read_manifest(out)
    # A hand edit keeps the part's name and size but not its time: the kept signatures no longer describe it.
    bad = table.set_column(table.schema.get_field_index("caption"), "caption",
                           pa.array(["x" * len(c) if c else c for c in table.column("caption").to_pylist()]))
    import pyarrow.parquet as pq

    pq.write_table(bad, part)
    assert "replace" not in _pipeline(images, out).manifest_update()  # every row built, compared with the parts
    # The item key of the manifest did not change, so a run would skip it: --refresh manifest rewrites it.
    run_inline(_pipeline(images, out), DATA, refresh=("manifest",))
    assert _on_disk(out) == _built_whole(images, out)
    assert _update(images, out) == ([], [])

    # The index deleted: the next manifest run compares the rows once and keeps the index again.
    layout.manifest_index.unlink()
    make_generated_images(images, 1, size=(96, 72), start=5)
    run_inline(_pipeline(images, out), DATA[:-1])
    record = _pipeline(images, out).manifest_update()
    assert "replace" not in record and len(record["rows"]) == 8  # every row: 6 images and 2 failed files
    _run_and_check(images, out)
    assert _update(images, out) == ([], [])


def test_replacing_rows_rewrites_only_the_parts_that_hold_them(tmp_path, monkeypatch):
    import pipelines.steps.manifest as manifest

    monkeypatch.setattr(manifest, "MAX_ROWS_PER_PART", 3)
    layout = OutputLayout(tmp_path)

    def rows(ids, tag=""):
        return [{"image_id": i, "source_path": f"/img/{i}.jpg", "status": "ok", "caption": f"{tag}{i}"} for i in ids]

    first = write_manifest(layout, rows("abcdefgh"))
    assert len(first.written_parts) == 3  # abc, def, gh
    parts = {p.name: p.stat().st_ino for p in parquet_parts(layout.manifest_dir)}
    # e changes, g goes, i comes: the part holding d-f is rewritten with its d and f carried, gh's part with nothing
    # of g; abc's is kept as it is (the same file).
    result = write_manifest(layout, rows("ei", tag="new "), replace=pa.array(["e", "g"]))
    assert result.kept_rows == 3 and result.written_rows == 5 and sorted(result.written_ids) == list("defhi")
    assert sorted(r["image_id"] for r in read_manifest(tmp_path).to_pylist()) == list("abcdefhi")
    got = {r["image_id"]: r["caption"] for r in read_manifest(tmp_path).to_pylist()}
    assert got == {"a": "a", "b": "b", "c": "c", "d": "d", "e": "new e", "f": "f", "h": "h", "i": "new i"}
    kept = [p for p in parquet_parts(layout.manifest_dir) if p.name in parts]
    assert len(kept) == 1 and kept[0].stat().st_ino == parts[kept[0].name]
    # A row of ``rows`` already on disk and not named in ``replace`` still appears once.
    write_manifest(layout, rows("a", tag="again "), replace=pa.array([], pa.string()))
    got = {r["image_id"]: r["caption"] for r in read_manifest(tmp_path).to_pylist()}
    assert len(read_manifest(tmp_path)) == 8 and got["a"] == "again a"
    with pytest.raises(ValueError, match="one manifest row per image_id"):
        write_manifest(layout, rows("aa"), replace=pa.array([], pa.string()))


def test_a_failed_file_without_an_image_id_is_named_by_its_path(tmp_path, monkeypatch):
    """Ingest records of older runs may have no image id for a file it could not read: the manifest names its row by
    the path (``failed_image_id``), and the incremental path finds the file by that name too."""
    import pipelines.steps.ingest as ingest

    images, out = _run(tmp_path)
    monkeypatch.setattr(ingest, "_unreadable_id", lambda path: None)  # the ingest stage runs in this process
    (images / "zz_folder.jpg").mkdir()  # a folder named like an image: unreadable
    run_inline(_pipeline(images, out), DATA[:-1])
    (path,) = [p for p, i in zip(*(_pipeline(images, out).done_table("ingest").column(c).to_pylist()
                                   for c in ("source_path", "image_id"))) if i is None]
    assert _update(images, out) == ([failed_image_id(path)], [])
    _run_and_check(images, out)
    (row,) = [r for r in _on_disk(out) if r["image_id"] == failed_image_id(path)]
    assert row["status"] == "failed" and "folder named like an image" in row["error"]
    (images / "zz_folder.jpg").rmdir()
    run_inline(_pipeline(images, out), DATA[:-1])
    assert _update(images, out) == ([], [failed_image_id(path)])
    _run_and_check(images, out)


def test_going_back_to_an_earlier_folder_leaves_no_row_of_the_image_removed(tmp_path):
    """Adding an image keeps the manifest's other parts; removing it again makes the folder what it was, whose
    manifest result is still stored with its parts intact: it is out of date all the same (``Manifest.outdated``)."""
    images, out = _run(tmp_path)
    first = _on_disk(out)
    before = _captions(images)
    (added,) = make_generated_images(images, 1, size=(96, 72), start=5)
    _write_captions(images, before)
    _run_and_check(images, out)
    assert len(_on_disk(out)) == len(first) + 1
    added.unlink()
    _run_and_check(images, out)
    assert _on_disk(out) == first


def test_a_signature_changes_exactly_with_its_images_inputs_whatever_their_order():
    from pipelines.steps.manifest import row_signatures

    files = pa.table({"source_path": ["/i/a.jpg", "/i/b.jpg", "/i/b_copy.jpg", "/i/c.jpg"],
                      "image_id": ["A", "B", "B", None], "item_key": ["fa", "fb", "fb2", "fc"],
                      "status": ["ok", "ok", "ok", "failed"], "error": [None, None, None, "cannot read"],
                      "captions": ["a cat\x1fjsonl\x1fNone\x1fNone", "a dog\x1fjsonl\x1fNone\x1fNone",
                                   "None\x1fNone\x1fNone\x1fNone", "None\x1fNone\x1fNone\x1fNone"]})
    stage = pa.table({"image_id": ["A", "B"], "item_key": ["ka", "kb"], "status": ["ok", "failed"],
                      "error": [None, "too small"]})
    base = row_signatures(files, [stage], "salt")
    c = failed_image_id("/i/c.jpg")
    assert base.column("image_id").to_pylist() == sorted(["A", "B", c])
    signature = dict(zip(*(base.column(n).to_pylist() for n in ("image_id", "signature"))))
    assert len(set(signature.values())) == 3
    shuffled = row_signatures(files.take([3, 2, 0, 1]), [stage.take([1, 0])], "salt")
    assert shuffled.equals(base)

    def changed(new_files=files, new_stage=stage, salt="salt") -> set[str]:
        got = dict(zip(*(row_signatures(new_files, [new_stage], salt).column(n).to_pylist()
                         for n in ("image_id", "signature"))))
        return {i for i in got.keys() | signature.keys() if got.get(i) != signature.get(i)}

    def set_value(table, column, row, value):
        values = table.column(column).to_pylist()
        values[row] = value
        return table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.string()))

    for column in ("source_path", "item_key", "status", "error", "captions"):
        assert changed(new_files=set_value(files, column, 2, "other")) == {"B"}, column  # B's second file
    assert changed(new_files=set_value(files, "error", 0, "")) == {"A"}  # "" is not None
    assert changed(new_files=files.slice(0, 2)) == {"B", c}  # B lost a file, c is gone
    for column in ("item_key", "status", "error"):
        assert changed(new_stage=set_value(stage, column, 1, "other")) == {"B"}, column
    assert changed(new_stage=stage.slice(0, 1)) == {"B"}  # B not computed there
    assert changed(salt="other") == {"A", "B", c}

"""Manifest join rules, deterministic splits and the incremental part writer."""

from __future__ import annotations

import hashlib
from collections import Counter

import duckdb
import pyarrow.parquet as pq
import pytest

from tests.manifests import builtin_joins
from pipelines.steps.manifest import assign_split, build_manifest_rows, failed_image_id, write_manifest
from storage.layout import OutputLayout
from storage.manifest import bbox, read_manifest

RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _split_reference(image_id: str, ratios: dict) -> str:
    """Independent formula: the first 13 hex digits of sha256("split:"+id) as a fraction of 16**13."""
    u = int(hashlib.sha256(("split:" + image_id).encode()).hexdigest()[:13], 16) / 16**13
    edge = 0.0
    for name in ("train", "val", "test"):
        edge += ratios.get(name, 0.0)
        if u < edge:
            return name
    return "test"


def test_assign_split_matches_reference_and_ratios():
    ids = [f"{i:032x}" for i in range(4000)]
    splits = [assign_split(i, RATIOS) for i in ids]
    assert splits == [_split_reference(i, RATIOS) for i in ids]
    counts = Counter(splits)
    assert 0.77 < counts["train"] / 4000 < 0.83 and 0.08 < counts["val"] / 4000 < 0.12
    assert {assign_split(i, {"train": 0.5, "val": 0.0, "test": 0.5}) for i in ids} == {"train", "test"}
    assert assign_split("x", {"train": 1.0}) == "train"
    with pytest.raises(ValueError, match="split ratios"):
        assign_split("x", {"train": 0.0})


def _ingest(path, image_id, status="ok", error=None):
    return {"source_path": path, "image_id": image_id, "status": status, "error": error, "width": 8, "height": 6}


SEG = {"bbox": bbox(1, 2, 5, 6), "crop_path": "crops/a/000.jpg", "structure_crop_path": "crops/a/000.structure.png"}


def _stage_results():
    structure = {i: {"status": "ok", "structure_path": f"maps/{i}.canny.png", "scribble_path": f"maps/{i}.scribble.png"}
                 for i in ("a", "b", "c", "d")}
    structure["b"] = {"status": "failed", "error": "cannot decode\n image (b.jpg)"}
    regions = {i: {"status": "ok", "segments": [SEG]} for i in ("a", "c", "d")}
    captions = {"a": {"status": "ok", "caption": "A red cat.", "caption_source": "jsonl",
                      "segments": [{**SEG, "caption": "A red cat.", "similarity_score": 21.5}]},
                "c": {"status": "failed", "error": "CLIP exploded"}}
    filtered = {"a": {"status": "ok", "filtered_caption": "A cat.", "hard_negatives": ["A dog."],
                      "segments": [{**SEG, "caption": "A red cat.", "filtered_caption": "A cat.", "similarity_score": 21.5}]}}
    return structure, regions, captions, filtered


def test_build_rows_join_errors_duplicates_and_failed_ingest():
    structure, regions, captions, filtered = _stage_results()
    ingest = [
        _ingest("/img/z_copy_of_a.jpg", "a"),
        _ingest("/img/a.jpg", "a"),
        _ingest("/img/b.jpg", "b"),
        _ingest("/img/c.jpg", "c"),
        _ingest("/img/d.jpg", "d"),
        _ingest("/img/e.jpg", None, "failed", "cannot read image: permission denied (e.jpg)"),
    ]
    index = {"/img/a.jpg": ("A red cat.", "jsonl", None), "/img/c.jpg": ("A dog.", "txt", None),
             "/img/d.jpg": (None, None, "no entry for d.jpg in captions.jsonl")}
    built = build_manifest_rows(ingest=ingest, captions_index=index,
                                joins=builtin_joins(structure, regions, captions, filtered), split_ratios=RATIOS)
    rows = {r["source_path"]: r for r in built.rows}
    assert sorted(rows) == ["/img/a.jpg", "/img/b.jpg", "/img/c.jpg", "/img/d.jpg", "/img/e.jpg"]
    assert built.duplicates == [{"source_path": "/img/z_copy_of_a.jpg", "duplicate_of": "/img/a.jpg", "image_id": "a"}]

    a = rows["/img/a.jpg"]
    assert (a["status"], a["error"], a["split"]) == ("ok", None, _split_reference("a", RATIOS))
    assert (a["caption"], a["filtered_caption"], a["hard_negatives"]) == ("A red cat.", "A cat.", ["A dog."])
    assert a["segments"][0]["filtered_caption"] == "A cat." and a["structure_path"] == "maps/a.canny.png"
    assert (rows["/img/b.jpg"]["status"], rows["/img/b.jpg"]["error"]) == ("failed", "structure: cannot decode image (b.jpg)")
    assert rows["/img/b.jpg"]["split"] is None
    assert rows["/img/c.jpg"]["error"] == "captions: CLIP exploded"
    assert rows["/img/d.jpg"]["error"] == "no caption: no entry for d.jpg in captions.jsonl"
    e = rows["/img/e.jpg"]
    assert e["image_id"] == failed_image_id("/img/e.jpg") and len(e["image_id"]) == 32
    assert e["error"] == "ingest: cannot read image: permission denied (e.jpg)"


def test_not_computed_stage_is_named():
    built = build_manifest_rows(ingest=[_ingest("/img/a.jpg", "a")], captions_index={"/img/a.jpg": ("x y z", "txt")},
                                joins=builtin_joins(), split_ratios=RATIOS)
    assert built.rows[0]["error"] == "structure: not computed"


def _rows(ids, tag="v1"):
    return [{"image_id": i, "source_path": f"/img/{i}.jpg", "status": "ok", "caption": f"{tag} {i}", "split": "train",
             "segments": [{**SEG, "similarity_score": 20.25}], "hard_negatives": []} for i in ids]


def _content(layout):
    return sorted(read_manifest(layout.root).to_pylist(), key=lambda r: r["image_id"])


def test_write_manifest_is_incremental(tmp_path):
    layout = OutputLayout(tmp_path)
    first = write_manifest(layout, _rows("abcde"))
    assert (first.written_rows, first.kept_rows, len(first.written_parts)) == (5, 0, 1)
    part_1 = first.written_parts[0]

    again = write_manifest(layout, _rows("abcde"))
    assert (again.written_rows, again.kept_rows, again.written_parts, again.removed_parts) == (0, 5, [], [])

    added = write_manifest(layout, _rows("abcdefgh"))
    assert (added.written_rows, added.kept_rows, sorted(added.written_ids)) == (3, 5, ["f", "g", "h"])
    assert part_1.exists() and len(list(layout.manifest_dir.glob("*.parquet"))) == 2

    changed = _rows("abcdefgh")
    changed[6]["caption"] = "edited g"  # g lives in the second part: only that part is rewritten
    edit = write_manifest(layout, changed)
    assert (edit.written_rows, edit.kept_rows, edit.removed_parts) == (3, 5, added.written_parts)
    assert part_1.exists()

    removed = write_manifest(layout, [r for r in changed if r["image_id"] != "b"])
    assert removed.removed_parts == [part_1] and removed.written_rows == 4
    got = _content(layout)
    assert [r["image_id"] for r in got] == list("acdefgh")
    assert next(r for r in got if r["image_id"] == "g")["caption"] == "edited g"
    count = duckdb.sql(f"select count(*), count(distinct image_id) from '{layout.manifest_dir}/*.parquet'").fetchall()[0]
    assert count == (7, 7)


def test_write_manifest_repairs_duplicate_parts(tmp_path):
    """A run killed between writing a new part and deleting an old one leaves rows twice; the next write fixes it."""
    layout = OutputLayout(tmp_path)
    part = write_manifest(layout, _rows("ab")).written_parts[0]
    copy = layout.manifest_part("zzcopy")
    copy.write_bytes(part.read_bytes())
    result = write_manifest(layout, _rows("ab"))
    assert result.removed_parts == [copy] and result.kept_rows == 2
    assert pq.read_table(part).num_rows == 2 and not copy.exists()


def test_write_manifest_refuses_repeated_ids(tmp_path):
    with pytest.raises(ValueError, match="one manifest row per image_id"):
        write_manifest(OutputLayout(tmp_path), _rows("aa"))


def test_a_rewrite_is_swapped_in_whole_readers_see_old_or_new(tmp_path, monkeypatch):
    """While the new manifest is written, the folder still holds exactly the old one; then the new one, whole."""
    import pipelines.steps.manifest as manifest_module

    layout = OutputLayout(tmp_path)
    old = write_manifest(layout, _rows("abcd", tag="old")).written_parts
    seen = []
    real_write = manifest_module.write_parquet_atomic

    def observing_write(table, path):
        seen.append((sorted(p.name for p in layout.manifest_dir.glob("*.parquet")), _content(layout)))
        return real_write(table, path)

    monkeypatch.setattr(manifest_module, "write_parquet_atomic", observing_write)
    result = write_manifest(layout, _rows("abcd", tag="old"), rewrite=True)
    assert seen and all(names == [p.name for p in old] and len(rows) == 4 for names, rows in seen)
    assert result.written_rows == 4 and _content(layout) == _content(layout)
    # A kill during the write (an exception here) leaves the old manifest exactly as it was.
    monkeypatch.setattr(manifest_module, "write_parquet_atomic", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    before = _content(layout)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(layout, _rows("abcdef", tag="new"))
    assert _content(layout) == before
    assert [p.name for p in tmp_path.iterdir()] == ["manifest"]  # no staging folder left behind

"""The manifest contract: schema, bbox convention, reading from any of its locations, duckdb compatibility."""

from __future__ import annotations

import duckdb
import pytest

from storage.layout import OutputLayout
from storage.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    bbox,
    manifest_root,
    manifest_table,
    read_manifest,
    resolve_manifest_path,
)
from storage.parquet import write_parquet_atomic


def _rows():
    return [
        {
            "image_id": "a" * 32, "source_path": "/data/a.jpg", "status": "ok", "width": 640, "height": 480,
            "caption": "a red car", "filtered_caption": "a car", "structure_path": "maps/k/aa/a.canny.png",
            "split": "train", "hard_negatives": ["a blue car"],
            "segments": [
                {"bbox": bbox(10, 20, 110, 70), "crop_path": "crops/r/aa/a/000.jpg",
                 "structure_crop_path": "crops/r/aa/a/000.structure.png", "caption": "a car",
                 "filtered_caption": "a car", "similarity_score": 24.5},
                {"bbox": bbox(0, 0, 5, 5), "crop_path": None, "structure_crop_path": None, "caption": None,
                 "filtered_caption": None, "similarity_score": 17.25},
            ],
        },
        {"image_id": "b" * 32, "source_path": "/data/b.jpg", "status": "failed", "error": "cannot decode"},
    ]


def test_bbox_convention():
    assert bbox(10, 20, 110, 70) == {"x1": 10, "y1": 20, "x2": 110, "y2": 70, "width": 100, "height": 50}


def test_manifest_table_fills_missing_columns_with_null():
    table = manifest_table(_rows())
    assert table.schema == MANIFEST_SCHEMA
    failed = table.to_pylist()[1]
    assert set(failed) == set(MANIFEST_COLUMNS)
    assert failed["caption"] is None and failed["segments"] is None


def test_read_manifest_from_out_folder_manifest_folder_and_file(tmp_path):
    layout = OutputLayout(tmp_path)
    part = write_parquet_atomic(manifest_table(_rows()), layout.manifest_part("p1"))
    for location in (tmp_path, layout.manifest_dir, part):
        rows = read_manifest(location).to_pylist()
        assert [r["image_id"] for r in rows] == ["a" * 32, "b" * 32]
        assert rows[0]["segments"][0]["similarity_score"] == 24.5
        assert manifest_root(location).root == layout.root


def test_read_manifest_empty_and_missing(tmp_path):
    (tmp_path / "manifest").mkdir()
    empty = read_manifest(tmp_path)
    assert empty.num_rows == 0 and empty.schema == MANIFEST_SCHEMA
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_manifest(tmp_path / "nowhere")


def test_manifest_is_queryable_with_duckdb(tmp_path):
    part = write_parquet_atomic(manifest_table(_rows()), OutputLayout(tmp_path).manifest_part("p1"))
    result = duckdb.sql(
        f"SELECT image_id, status, len(segments) AS n, segments[1].bbox.width AS w, "
        f"segments[1].similarity_score AS s, hard_negatives[1] AS neg FROM read_parquet('{part}') ORDER BY image_id"
    ).fetchall()
    assert result[0] == ("a" * 32, "ok", 2, 100, 24.5, "a blue car")
    assert result[1] == ("b" * 32, "failed", None, None, None, None)
    ok = duckdb.sql(f"SELECT count(*) FROM read_parquet('{part}') WHERE status = 'ok'").fetchall()[0][0]
    assert ok == 1


def test_resolve_manifest_path_relative_absolute_and_escape(tmp_path):
    layout = OutputLayout(tmp_path)
    assert resolve_manifest_path(layout, "maps/x.png") == layout.root / "maps" / "x.png"
    assert resolve_manifest_path(layout, "/data/external.png").as_posix() == "/data/external.png"
    assert resolve_manifest_path(layout, None) is None
    with pytest.raises(ValueError, match="escapes"):
        resolve_manifest_path(layout, "../../etc/passwd")

"""A selection of image ids as a manifest subset (absolute paths, readable from anywhere) or reference JSON."""

from __future__ import annotations

import json
import shutil

import pytest

from storage.manifest import read_manifest, resolve_manifest_path
from storage.selection import read_ids, select_manifest
from structxlip.data import load_records
from structxlip.app.synthetic import make_synthetic_manifest


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    make_synthetic_manifest(folder, n_images=8, image_size=48)
    return folder


def test_read_ids_takes_lines_spaces_commas_and_comments(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# picked in the explorer\nabc\n\n def, ghi  # the blue one\nabc\n")
    assert read_ids(path) == ["abc", "def", "ghi"]


def test_subset_holds_exactly_the_selected_rows_with_absolute_paths(out, tmp_path):
    rows = read_manifest(out).to_pylist()
    picked = [rows[5]["image_id"], rows[1]["image_id"], rows[2]["image_id"]]
    selection = select_manifest(out, picked, parquet_path=tmp_path / "subset.parquet",
                                json_path=tmp_path / "subset.json")
    subset = read_manifest(tmp_path / "subset.parquet").to_pylist()
    assert [r["image_id"] for r in subset] == [rows[1]["image_id"], rows[2]["image_id"], rows[5]["image_id"]]
    assert subset == selection.rows
    from storage.layout import OutputLayout

    layout = OutputLayout(out)
    for original, copied in zip([rows[1], rows[2], rows[5]], subset):
        assert copied["structure_path"] == str(resolve_manifest_path(layout, original["structure_path"]))
        assert [s["crop_path"] for s in copied["segments"]] == \
            [str(resolve_manifest_path(layout, s["crop_path"])) for s in original["segments"]]
        assert copied["split"] == original["split"] and copied["caption"] == original["caption"]
    # The subset is read from anywhere: moved away from OUT, its records still find every file.
    moved = tmp_path / "elsewhere" / "subset.parquet"
    moved.parent.mkdir()
    shutil.copy(tmp_path / "subset.parquet", moved)
    records = load_records(moved, split=None, top_k=3)
    assert sorted(r.image_id for r in records) == sorted(r["image_id"] for r in subset if r["status"] == "ok")
    reference = json.loads((tmp_path / "subset.json").read_text())
    assert sorted(r["structxlip"]["image_id"] for r in reference) == \
        sorted(r["image_id"] for r in subset if r["status"] == "ok" and r["caption"])


def test_split_override_and_unknown_ids(out, tmp_path):
    rows = read_manifest(out).to_pylist()
    ok = [r["image_id"] for r in rows if r["status"] == "ok"][:3]
    selection = select_manifest(out, ok, split="train")
    assert {r["split"] for r in selection.rows} == {"train"}
    with pytest.raises(ValueError, match=r"^2 selected image id\(s\) are not in the manifest .*: nope1, nope2$"):
        select_manifest(out, [ok[0], "nope2", "nope1"])
    with pytest.raises(ValueError, match="expected a split among train, val, test, got 'dev'"):
        select_manifest(out, ok, split="dev")
    with pytest.raises(ValueError, match="at least one image id"):
        select_manifest(out, [])

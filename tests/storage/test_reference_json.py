"""Reference-trainer JSON: lossless export/import round trips, absolute paths, bad items rejected with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage.layout import OutputLayout
from storage.manifest import read_manifest, resolve_manifest_path
from storage.reference_json import (
    EXTRA_KEY,
    export_reference_json,
    import_reference_json,
    read_reference_json,
)
from structxlip.app.synthetic import make_synthetic_manifest

REFERENCE_KEYS = {"original_filename", "original_caption", "original_filename_structure", "segment"}
PATH_COLUMNS = ("structure_path", "scribble_path")


@pytest.fixture(scope="module")
def synthetic_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_manifest(out, n_images=6, image_size=48, seed=3)
    return out


def _ok_rows(location) -> list[dict]:
    return [row for row in read_manifest(location).to_pylist() if row["status"] == "ok"]


def _absolute_rows(location) -> list[dict]:
    """Rows with every path made absolute (compares manifests that live in different folders)."""
    from storage.manifest import manifest_root

    layout = manifest_root(location)
    rows = _ok_rows(location)
    for row in rows:
        for column in PATH_COLUMNS:
            row[column] = str(resolve_manifest_path(layout, row[column]))
        for segment in row["segments"]:
            for key in ("crop_path", "structure_crop_path"):
                segment[key] = str(resolve_manifest_path(layout, segment[key]))
    return rows


def test_export_writes_the_reference_format_with_absolute_paths(synthetic_out, tmp_path):
    out_json = tmp_path / "ref.json"
    assert export_reference_json(synthetic_out, out_json) == 6  # the failed row is not exported
    records = json.loads(out_json.read_text())
    first = records[0]
    assert REFERENCE_KEYS | {EXTRA_KEY} == set(first)
    assert Path(first["original_filename"]).is_absolute() and Path(first["original_filename"]).is_file()
    assert Path(first["original_filename_structure"]).is_absolute()
    assert Path(first["original_filename_structure"]).is_file()
    segment = first["segment"][0]
    assert set(segment) == {"similarity_score", "filename", "caption", "filename_structure_cropped", "bbox_coordinates"}
    box = segment["bbox_coordinates"]
    assert box["width"] == box["x2"] - box["x1"] and box["height"] == box["y2"] - box["y1"]
    assert Path(segment["filename_structure_cropped"]).is_file()
    row = _ok_rows(synthetic_out)[0]
    assert first["original_caption"] == row["caption"]
    assert first[EXTRA_KEY]["filtered_caption"] == row["filtered_caption"]
    assert first[EXTRA_KEY]["hard_negatives"] == row["hard_negatives"]
    assert export_reference_json(synthetic_out, tmp_path / "test.json", split="test") == sum(
        r["split"] == "test" for r in _ok_rows(synthetic_out))


def test_manifest_export_import_gives_the_same_rows(synthetic_out, tmp_path):
    out_json = tmp_path / "ref.json"
    export_reference_json(synthetic_out, out_json)
    # Into a new folder: files stay where they are (absolute paths), rows are otherwise identical.
    result = import_reference_json(out_json, tmp_path / "imported")
    assert result.rejected == []
    assert _absolute_rows(tmp_path / "imported") == _absolute_rows(synthetic_out)
    # Back into the folder the files live in: byte-for-byte the same rows, relative paths included.
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(synthetic_out, copy)
    export_reference_json(copy, tmp_path / "copy.json")
    with pytest.raises(ValueError, match="already holds a manifest"):
        import_reference_json(tmp_path / "copy.json", copy)
    import_reference_json(tmp_path / "copy.json", copy, overwrite=True)
    assert _ok_rows(copy) == _ok_rows(synthetic_out)
    assert len(list((copy / "manifest").glob("*.parquet"))) == 1


def test_export_import_export_is_identical(synthetic_out, tmp_path):
    first = tmp_path / "first.json"
    export_reference_json(synthetic_out, first)
    import_reference_json(first, tmp_path / "elsewhere")
    second = tmp_path / "second.json"
    export_reference_json(tmp_path / "elsewhere", second)
    assert second.read_text() == first.read_text()


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_relative_paths_resolve_against_the_json_folder_and_escapes_are_rejected(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(data / "img" / "a.png")
    good = {"original_filename": "img/a.png", "original_caption": "a red square",
            "original_filename_structure": "img/a_edges.png",  # missing file: still accepted (has_structure=False)
            "segment": [{"similarity_score": 21, "filename": "img/a.png", "caption": "red",
                         "filename_structure_cropped": None,
                         "bbox_coordinates": {"x1": 0, "y1": 0, "x2": 10.0, "y2": 5, "width": 10, "height": 5}}]}
    bad = [
        {"original_caption": "no image key"},
        {"original_filename": "img/a.png", "original_caption": 7},
        {"original_filename": "../../etc/passwd", "original_caption": "escape"},
        {"original_filename": "img/a.png", "original_caption": "x", "segment": "not a list"},
        {"original_filename": "img/a.png", "original_caption": "x",
         "segment": [{"bbox_coordinates": {"x1": 0, "y1": 0, "x2": 4}}]},
        {"original_filename": "img/missing.png", "original_caption": "x"},
        {"original_filename": "img/a.png", "original_caption": "x", "original_filename_structure": "../../../x.png"},
        "not an object",
    ]
    source = _write(data / "ref.json", [good] + bad)
    result = import_reference_json(source, tmp_path / "out")
    reasons = dict(result.rejected)
    assert sorted(reasons) == list(range(1, 9))
    assert "missing key 'original_filename'" in reasons[1]
    assert "original_caption must be str" in reasons[2]
    assert "escapes" in reasons[3]
    assert "segment must be list" in reasons[4]
    assert "missing key 'y2'" in reasons[5]
    assert "image file not found" in reasons[6]
    assert "escapes" in reasons[7]
    assert "expected an object" in reasons[8]
    (row,) = result.rows
    assert row["source_path"] == str((data / "img" / "a.png").resolve())
    assert row["structure_path"] == str((data / "img" / "a_edges.png").resolve())  # outside OUT: kept absolute
    assert (row["width"], row["height"]) == (40, 30)  # read from the image header
    assert row["split"] == "train" and row["caption_source"] == "reference-json"
    assert row["segments"][0]["bbox"]["x2"] == 10 and row["segments"][0]["similarity_score"] == 21.0
    assert len(row["image_id"]) == 32


def test_in_memory_reading_and_unusable_files(tmp_path):
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_reference_json(_write(tmp_path / "obj.json", {"a": 1}))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_reference_json(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="no usable records"):
        import_reference_json(_write(tmp_path / "bad.json", [{"original_caption": "x"}]), tmp_path / "o")
    assert not (OutputLayout(tmp_path / "o").manifest_dir.exists() and
                any(OutputLayout(tmp_path / "o").manifest_dir.iterdir()))


def test_fractional_bbox_values_are_read_like_the_reference_does(tmp_path):
    from PIL import Image

    for n in range(6):  # one image per item: records of one image would become one row with several captions
        Image.new("RGB", (40, 30), (10 * n, 0, 0)).save(tmp_path / f"a{n}.png")
    files = iter(range(6))
    box = lambda **v: {"original_filename": f"a{next(files)}.png", "original_caption": "a red square",  # noqa: E731
                       "segment": [{"similarity_score": 20.5, "filename": None, "caption": "red",
                                    "filename_structure_cropped": None, "bbox_coordinates": v}]}
    items = [
        box(x1=2.5, y1=0.25, x2=10.4, y2=5.0, width=7.9, height=4.75),  # fractional: the enclosing pixel box
        box(x1="3", y1="1.0", x2="12", y2="6", width="9", height="5"),  # numeric strings, as float() reads them
        box(x1=1, y1=2, x2=3, y2=4, width=2, height=2),  # whole numbers: kept as given
        box(x1="left", y1=0, x2=1, y2=1, width=1, height=1),
        box(x1=0, y1=0, x2=float("nan"), y2=1, width=1, height=1),
        box(x1=5.5, y1=0, x2=5.25, y2=1, width=1, height=1),
    ]
    result = read_reference_json(_write(tmp_path / "ref.json", items))
    boxes = [row["segments"][0]["bbox"] for row in result.rows]
    assert boxes == [{"x1": 2, "y1": 0, "x2": 11, "y2": 5, "width": 9, "height": 5},
                     {"x1": 3, "y1": 1, "x2": 12, "y2": 6, "width": 9, "height": 5},
                     {"x1": 1, "y1": 2, "x2": 3, "y2": 4, "width": 2, "height": 2}]
    reasons = dict(result.rejected)
    assert "x1 must be a number, got 'left'" in reasons[3]
    assert "must be a finite number" in reasons[4]
    assert "x2 < x1" in reasons[5]


# ---- issue 14: overflowing numbers and split values, one line per rejected item -------------------------------------
def _overflowing_json(data: Path) -> Path:
    """A reference JSON written as text (Infinity, 1e400 and 10**30 are not what json.dumps of Python values gives)."""
    from PIL import Image

    (data / "img").mkdir(parents=True)
    Image.new("RGB", (8, 6), "blue").save(data / "img" / "a.png")
    Image.new("RGB", (8, 6), "green").save(data / "img" / "b.png")

    def item(segment: str = "", extra: str = "", image: str = "img/a.png") -> str:
        segments = f', "segment": [{{"filename": "img/a.png", "caption": "c", {segment}}}]' if segment else ""
        extras = f', "structxlip": {{{extra}}}' if extra else ""
        return f'{{"original_filename": "{image}", "original_caption": "a blue square"{segments}{extras}}}'

    box = '"bbox_coordinates": {{"x1": {x1}, "y1": 0, "x2": 4, "y2": 3, "width": 4, "height": 3}}'
    items = [
        item(),  # 0: fine
        item(box.format(x1="1e400")),  # 1: parses as inf
        item(box.format(x1="Infinity")),  # 2
        item(box.format(x1="NaN")),  # 3
        item(box.format(x1="-1e400")),  # 4
        item(box.format(x1=str(10**30))),  # 5: a whole number that int32 cannot hold
        item(extra=f'"height": {10**30}'),  # 6
        item(extra='"width": -5'),  # 7
        item('"similarity_score": 1e400'),  # 8
        item('"similarity_score": ' + "9" * 400),  # 9: an int too large for a float
        item(extra='"split": "../../evil"'),  # 10
        item(extra='"split": "train\\nrejected item 0: forged"'),  # 11: a newline would forge an output line
        item(extra='"split": "val"', image="img/b.png"),  # 12: fine (another image: one image is one row)
    ]
    path = data / "ref.json"
    path.write_text("[" + ",\n".join(items) + "]")
    return path


def test_overflowing_numbers_and_bad_splits_are_rejected_one_line_each(tmp_path):
    result = import_reference_json(_overflowing_json(tmp_path / "data"), tmp_path / "out")
    reasons = dict(result.rejected)
    assert sorted(reasons) == list(range(1, 12))
    for index in (1, 2, 4):
        assert reasons[index] == "segment[0].bbox_coordinates.x1 must be a finite number, got inf" or \
            reasons[index] == "segment[0].bbox_coordinates.x1 must be a finite number, got -inf", reasons[index]
    assert reasons[3] == "segment[0].bbox_coordinates.x1 must be a finite number, got nan"
    assert reasons[5] == f"segment[0].bbox_coordinates.x1 must be within +-2147483647 pixels, got {10**30!r}"
    assert reasons[6] == f"structxlip.height must be between 0 and 2147483647, got {10**30!r}"
    assert reasons[7] == "structxlip.width must be between 0 and 2147483647, got -5"
    assert reasons[8] == "segment[0].similarity_score must be a finite number, got inf"
    assert reasons[9].startswith("segment[0].similarity_score must be a finite number, got 99999")
    assert reasons[10] == "structxlip.split must be one of train, val, test or null, got '../../evil'"
    # The newline is shown escaped: it cannot forge a second "rejected item" line.
    assert reasons[11] == \
        "structxlip.split must be one of train, val, test or null, got 'train\\nrejected item 0: forged'"
    assert all("\n" not in reason and len(reason) <= 300 for reason in reasons.values())
    assert [row["split"] for row in result.rows] == ["train", "val"]
    assert read_manifest(tmp_path / "out").num_rows == 2  # int32 columns written without overflow


def test_import_json_cli_prints_one_line_per_rejected_item(tmp_path, capsys):
    from flows.cli import main

    source = _overflowing_json(tmp_path / "data")
    assert main(["import-json", str(source), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 11 and all(line.startswith("rejected item ") for line in err), err
    assert err[9] == "rejected item 10: structxlip.split must be one of train, val, test or null, got '../../evil'"
    assert main(["import-json", str(source), "--out", str(tmp_path / "out2"), "--split", "../x"]) == 2
    assert capsys.readouterr().err.strip() == \
        "structxlip import-json: error: split must be one of train, val, test, got '../x'"


def test_an_image_listed_several_times_imports_as_one_image_with_several_captions(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 6), "red").save(tmp_path / "img" / "a.png")
    Image.new("RGB", (8, 6), "blue").save(tmp_path / "img" / "b.png")
    shutil_copy = (tmp_path / "img" / "a_copy.png")
    shutil_copy.write_bytes((tmp_path / "img" / "a.png").read_bytes())  # same bytes, another path
    records = [{"original_filename": "img/a.png", "original_caption": "a one"},
               {"original_filename": "img/b.png", "original_caption": "b one"},
               {"original_filename": "img/a.png", "original_caption": "a two"},
               {"original_filename": "img/a.png", "original_caption": "a one"},  # the same text again: once
               {"original_filename": "img/a_copy.png", "original_caption": "a three"}]
    result = import_reference_json(_write(tmp_path / "coco.json", records), tmp_path / "out")
    assert result.rejected == []
    a, b = result.rows
    assert (a["caption"], [e["caption"] for e in a["extra_captions"]]) == ("a one", ["a two", "a three"])
    assert a["duplicate_paths"] == [str(shutil_copy.resolve())]
    assert (b["caption"], b["extra_captions"], b["duplicate_paths"]) == ("b one", None, None)
    stored = {row["image_id"]: row for row in read_manifest(tmp_path / "out").to_pylist()}
    assert [e["caption"] for e in stored[a["image_id"]]["extra_captions"]] == ["a two", "a three"]

    # Export writes one record per caption (as the reference trainer expects); importing it again is exact.
    exported = tmp_path / "again.json"
    assert export_reference_json(tmp_path / "out", exported) == 4
    assert [r["original_caption"] for r in json.loads(exported.read_text())] == ["a one", "a two", "a three", "b one"]
    import_reference_json(exported, tmp_path / "out2")
    assert _ok_rows(tmp_path / "out2") == _ok_rows(tmp_path / "out")
    export_reference_json(tmp_path / "out2", tmp_path / "third.json")
    assert (tmp_path / "third.json").read_text() == exported.read_text()

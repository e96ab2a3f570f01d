"""Inputs from a hostile pass, through the real CLI (``structxlip run`` in a subprocess, the session's Prefect server):

- EXIF orientation 1-8 (TIFF's own tag included): structure maps, region boxes and crops are those of the displayed
  image, checked against an upright copy of the same displayed pixels (no EXIF) in the same folder;
- ``ingest.max_file_bytes``: a 50 GB sparse ``.jpg`` fails from its size alone, never read;
- captions: a ``captions.jsonl`` entry in decomposed Unicode (NFD) names a composed (NFC) file; problems are reported
  as ``captions.jsonl line N: ...``, an entry naming no image is named;
- the end-of-run table: the first failures are listed, the manifest row counts its failed rows;
- content-true ingest: other bytes under the same size and mtime are hashed again (a new ``image_id``); a moved
  folder is validated again while every later stage stays cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from storage.manifest import read_manifest
from tests.hardening.conftest import DATA_STAGES, run_cli, stage_parts
from tests.pipelines.test_images import _displayed

pytestmark = pytest.mark.e2e

CONFIG = """
model: {clip_model: structxlip/tiny-clip}
structure: {batch_size: 32}
regions: {method: structure, max_regions: 4}
captions: {batch_size: 16}
runtime: {chunk_size: 8, task_retries: 0, workers: 1}  # stages in the CLI process: not what is tested here
"""
CAPTION = "a red square beside a blue circle on a grey table"
HUGE_BYTES = 50 * 10**9
NFC_NAME = unicodedata.normalize("NFC", "crème brûlée.png")
# Oriented files: (format suffix, EXIF orientation). TIFF, the format whose maps came out unrotated, in all eight.
ORIENTED = [("tif", o) for o in range(1, 9)] + [("png", 6), ("webp", 8), ("jpg", 5)]
LOSSLESS = ("tif", "png", "webp")


def _stored(seed: int) -> np.ndarray:
    """A 64x48 (W x H) picture with edges to find: two filled shapes on a two-tone ground, distinct per seed."""
    rng = np.random.default_rng(seed)
    image = np.full((48, 64, 3), 40, np.uint8)
    image[:, 32:] = 170
    cv2.rectangle(image, (6 + seed % 5, 8), (26, 30 + seed % 7), tuple(int(c) for c in rng.integers(60, 255, 3)), -1)
    cv2.circle(image, (46, 24 + seed % 9), 9, tuple(int(c) for c in rng.integers(60, 255, 3)), -1)
    return image


def _save(path: Path, pixels: np.ndarray, orientation: int | None) -> None:
    image = Image.fromarray(pixels)
    if orientation is None:
        image.save(path)
    elif path.suffix == ".tif":
        image.save(path, tiffinfo={0x0112: orientation})
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, exif=exif, **({"lossless": True} if path.suffix == ".webp" else
                                       {"quality": 95} if path.suffix == ".jpg" else {}))


def _make_folder(folder: Path) -> dict:
    """Write the folder; return what the run must give: {name: expected} (sizes, controls, outcomes)."""
    folder.mkdir(parents=True)
    expected, captions = {}, []
    for n, (suffix, orientation) in enumerate(ORIENTED):
        stored = _stored(n)
        name = f"o{orientation}_{suffix}.{suffix}"
        _save(folder / name, stored, orientation)
        shown = _displayed(stored, orientation)
        expected[name] = {"size": (shown.shape[1], shown.shape[0]), "control": None}
        if suffix in LOSSLESS:  # the same displayed pixels stored upright, no EXIF: its outputs are the answer
            control = f"upright_{n}.png"
            _save(folder / control, shown, None)
            expected[name]["control"] = control
            captions.append({"file": control, "caption": CAPTION})
        captions.append({"file": name, "caption": CAPTION})
    # A fixed-size BMP, replaced later by other bytes of the same size and mtime.
    _save(folder / "fixed.bmp", _stored(100), None)
    captions.append({"file": "fixed.bmp", "caption": CAPTION})
    # A composed file name listed in decomposed form (as macOS writes names).
    _save(folder / NFC_NAME, _stored(101), None)
    captions.append({"file": unicodedata.normalize("NFD", NFC_NAME), "caption": "a green ring on a white plate"})
    with open(folder / "huge.jpg", "wb") as handle:  # sparse: no disk used; reading it would take all the memory
        handle.truncate(HUGE_BYTES)
    lines = [json.dumps(c, ensure_ascii=False) for c in captions]
    lines.insert(2, '{"file": "broken.png", "caption": ')  # line 3: invalid JSON
    lines.append(json.dumps({"file": "ghost.png", "caption": "nobody"}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return expected


def _run(env, images: Path, out: Path, config: Path):
    done = run_cli(env, "run", str(images), "--out", str(out), "--config", str(config),
                   "--stages", ",".join(DATA_STAGES))
    assert done.returncode == 0, f"CLI failed ({done.returncode}):\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}"
    assert "Traceback" not in done.stderr + done.stdout and "MemoryError" not in done.stderr
    report = json.loads(max((out / "runs").glob("*.json")).read_text())
    return done, {s["stage"]: s for s in report["stages"]}


def _rows(out: Path) -> dict[str, dict]:
    return {Path(r["source_path"]).name: r for r in read_manifest(out).to_pylist()}


def _regions(out: Path) -> dict[str, list[dict]]:
    """Every proposed region by image id, from the regions stage's rows (the manifest keeps the captioned ones)."""
    import pyarrow.parquet as pq

    return {row["image_id"]: row["segments"] or [] for part in stage_parts(out, "regions")
            for row in pq.read_table(part).to_pylist()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cli_env):
    root = tmp_path_factory.mktemp("inputs")
    images, out, config = root / "images", root / "out", root / "config.yaml"
    expected = _make_folder(images)
    config.write_text(CONFIG)
    done, summary = _run(cli_env, images, out, config)
    return root, images, out, config, expected, done, summary


def test_oriented_images_give_the_displayed_image_s_maps_boxes_and_crops(first_run):
    root, images, out, config, expected, done, summary = first_run
    rows, regions = _rows(out), _regions(out)
    for name, want in expected.items():
        row = rows[name]
        assert row["status"] == "ok", f"{name}: {row['error']}"
        assert (row["width"], row["height"]) == want["size"], name
        structure = cv2.imread(str(out / row["structure_path"]), cv2.IMREAD_GRAYSCALE)
        assert structure.shape == want["size"][::-1], name  # long side 64 < 512: the map is at full size
        if want["control"] is None:  # JPEG: lossy, so sizes only
            continue
        control = rows[want["control"]]
        np.testing.assert_array_equal(
            structure, cv2.imread(str(out / control["structure_path"]), cv2.IMREAD_GRAYSCALE), err_msg=name)
        segments, twins = regions[row["image_id"]], regions[control["image_id"]]
        boxes = [tuple(s["bbox"][k] for k in ("x1", "y1", "x2", "y2")) for s in segments]
        assert boxes and boxes == [tuple(s["bbox"][k] for k in ("x1", "y1", "x2", "y2")) for s in twins], name
        for segment, twin in zip(segments, twins):
            crop = cv2.imread(str(out / segment["crop_path"]))
            assert np.abs(crop.astype(int) - cv2.imread(str(out / twin["crop_path"])).astype(int)).max() <= 2, name


def test_a_file_over_max_file_bytes_fails_from_its_size_and_the_run_goes_on(first_run):
    root, images, out, config, expected, done, summary = first_run
    row = _rows(out)["huge.jpg"]
    assert row["status"] == "failed"
    assert row["error"] == f"ingest: file too large ({HUGE_BYTES} bytes > ingest.max_file_bytes=268435456) (huge.jpg)"


def test_a_lower_max_file_bytes_from_the_command_line_refuses_normal_files(first_run, cli_env):
    root, images, out, config, expected, done, summary = first_run
    small = run_cli(cli_env, "run", str(images), "--out", str(root / "out-small"), "--config", str(config),
                    "--stages", "ingest", "--set", "ingest.max_file_bytes=100")
    assert small.returncode == 0, small.stderr[-3000:]
    report = json.loads(max((root / "out-small" / "runs").glob("*.json")).read_text())
    ingest = report["stages"][0]
    assert ingest["failed"] == len(list(p for p in images.iterdir() if p.suffix != ".jsonl"))
    size = (images / "fixed.bmp").stat().st_size
    reasons = {f["file"]: f["reason"] for f in ingest["failures"]}
    assert reasons["fixed.bmp"] == f"file too large ({size} bytes > ingest.max_file_bytes=100) (fixed.bmp)"


def test_captions_match_across_unicode_forms_and_problems_read_as_file_and_line(first_run):
    root, images, out, config, expected, done, summary = first_run
    row = _rows(out)[NFC_NAME]
    assert row["caption"] == "a green ring on a white plate" and row["caption_source"] == "jsonl"
    problems = [line for line in done.stderr.splitlines() if "captions.jsonl" in line]
    assert any("captions.jsonl line 3: invalid JSON" in line for line in problems), done.stderr[-3000:]
    assert any('1 caption(s) name no scanned image: line ' in line and '"ghost.png"' in line
               for line in problems), done.stderr[-3000:]
    assert not any("{'source'" in line or "'line':" in line for line in done.stderr.splitlines())


def test_the_table_lists_first_failures_and_counts_failed_manifest_rows(first_run):
    root, images, out, config, expected, done, summary = first_run
    failed_rows = sum(r["status"] == "failed" for r in read_manifest(out).to_pylist())
    assert failed_rows >= 1 and summary["manifest"]["failed"] == failed_rows
    table = done.stdout.splitlines()
    manifest_line = next(line for line in table if line.startswith("manifest "))
    assert manifest_line.split()[3] == str(failed_rows)
    after_manifest = table[table.index(manifest_line) + 1]
    assert after_manifest.startswith("  x huge.jpg: ingest: file too large (")
    for line in table:  # never a count of more failures without the first ones listed above it
        if line.startswith("  x ... "):
            assert table[table.index(line) - 1].startswith("  x ")


def test_same_size_and_mtime_new_bytes_are_hashed_again_and_a_moved_folder_stays_cached(first_run, cli_env):
    root, images, out, config, expected, done, summary = first_run
    assert summary["ingest"]["processed"] + summary["ingest"]["failed"] == len(
        [p for p in images.iterdir() if p.suffix != ".jsonl"])
    bmp = images / "fixed.bmp"
    before = bmp.stat()
    old_id = _rows(out)["fixed.bmp"]["image_id"]
    replacement = root / "replacement.bmp"
    _save(replacement, _stored(200), None)  # other pixels, the same uncompressed size
    assert replacement.stat().st_size == before.st_size
    os.replace(replacement, bmp)
    os.utime(bmp, ns=(before.st_atime_ns, before.st_mtime_ns))  # what cp -p, rsync -t and tar do
    assert (bmp.stat().st_size, bmp.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    _, changed = _run(cli_env, images, out, config)
    assert changed["ingest"]["processed"] == 1 and changed["structure"]["processed"] == 1, changed["ingest"]
    new_id = _rows(out)["fixed.bmp"]["image_id"]
    assert new_id == hashlib.sha256(bmp.read_bytes()).hexdigest()[:32] != old_id

    moved = root / "moved-images"
    images.rename(moved)
    _, after_move = _run(cli_env, moved, out, config)
    files = len([p for p in moved.iterdir() if p.suffix != ".jsonl"])
    ingest = after_move["ingest"]
    assert ingest["processed"] + ingest["failed"] == files and ingest["cached"] == 0  # every file validated again
    for stage in ("structure", "regions", "captions", "filter"):
        assert after_move[stage]["processed"] == 0 and after_move[stage]["cached"] > 0, (stage, after_move[stage])
    rows = _rows(out)
    assert rows["fixed.bmp"]["image_id"] == new_id
    assert all(Path(r["source_path"]).parent == moved for r in read_manifest(out).to_pylist())

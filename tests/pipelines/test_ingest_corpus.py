"""The ingest stage (scan + captions + ingest) against every expectation of the bad-input corpus, and on the
bundled sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs.schema import IngestConfig
from pipelines.steps.ingest import ingest_images, read_captions, scan_images
from storage.filenames import storable_path
from tests.corpus import CAPTIONS_FILE, IMAGES_DIR, NON_UTF8_KEY, NON_UTF8_NAME, make_bad_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSIONS = IngestConfig().extensions  # GIF is among them: the corpus has an animated one
MAX_PIXELS = IngestConfig().max_pixels


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest-corpus")
    expected = make_bad_corpus(root)
    folder = (root / IMAGES_DIR).absolute()
    scan = scan_images(folder, extensions=EXTENSIONS, follow_symlinks=True)
    captions = read_captions(folder, scan.files)
    records = ingest_images(scan.files, max_pixels=MAX_PIXELS)
    by_name = {Path(r["source_path"]).relative_to(folder).as_posix(): r for r in records}
    return folder, expected, scan, captions, by_name


def _images(expected):
    return {name: e for name, e in expected.items() if e.kind == "image"}


def test_scan_lists_every_image_exactly_once_and_reports_the_loop(ingested):
    folder, expected, scan, _, by_name = ingested
    listed = [storable_path(Path(f.path).relative_to(folder).as_posix()) for f in scan.files]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(_images(expected))
    skipped = [name for name, e in expected.items() if e.kind == "skipped"]
    for name in skipped:
        assert not any(path.startswith(name + "/") for path in listed), f"{name} was followed"
        assert any(Path(p["path"]).as_posix().endswith(name) and "loop" in p["error"] for p in scan.problems), \
            f"no scan problem recorded for {name}: {scan.problems}"


def test_every_image_outcome(ingested):
    _, expected, _, _, by_name = ingested
    mismatches = []
    for image, outcome in _images(expected).items():
        record = by_name[image]
        if record["status"] != outcome.status:
            mismatches.append(f"{image}: status {record['status']!r} ({record['error']}), expected {outcome.status!r}")
            continue
        if outcome.status == "failed":
            if outcome.reason.lower() not in (record["error"] or "").lower():
                mismatches.append(f"{image}: error {record['error']!r} lacks {outcome.reason!r}")
            if "\n" in (record["error"] or ""):
                mismatches.append(f"{image}: error is not one line")
        elif (record["width"], record["height"]) != (outcome.width, outcome.height):
            mismatches.append(f"{image}: size {record['width']}x{record['height']}, "
                              f"expected {outcome.width}x{outcome.height}")
        if outcome.ingest_note and outcome.ingest_note.lower() not in (record["note"] or "").lower():
            mismatches.append(f"{image}: note {record['note']!r} lacks {outcome.ingest_note!r}")
        if outcome.duplicate_of and record["image_id"] != by_name[outcome.duplicate_of]["image_id"]:
            mismatches.append(f"{image}: image_id differs from its duplicate {outcome.duplicate_of}")
    assert not mismatches, "\n".join(mismatches)


def test_failed_records_still_have_unique_ids(ingested):
    _, _, _, _, by_name = ingested
    ids = [r["image_id"] for name, r in by_name.items() if name != "dup_b.jpg"]
    assert all(ids) and len(ids) == len(set(ids))


def test_every_caption_outcome(ingested):
    folder, expected, _, captions, _ = ingested
    problems = [f"{p['source']} line {p['line']}: {p['error']}" for p in captions.problems]
    mismatches = []
    for name, outcome in expected.items():
        if outcome.kind == "captions":
            if not any(outcome.caption_problem.lower() in p.lower() and p.startswith(name) for p in problems):
                mismatches.append(f"{name}: no problem mentioning {outcome.caption_problem!r} in {problems}")
            continue
        if outcome.kind != "image":
            continue
        entry = captions.get(str(folder / name))
        caption, note = (entry.caption, entry.note) if entry else (None, None)
        if outcome.has_caption is not None and (caption is not None) != outcome.has_caption:
            mismatches.append(f"{name}: caption {caption!r}, expected has_caption={outcome.has_caption}")
        if outcome.caption_contains and outcome.caption_contains not in (caption or ""):
            mismatches.append(f"{name}: caption {caption!r} lacks {outcome.caption_contains!r}")
        if outcome.caption_problem and outcome.caption_problem.lower() not in (note or "").lower():
            mismatches.append(f"{name}: note {note!r} lacks {outcome.caption_problem!r}")
        for text in outcome.caption_lacks:
            if text in (caption or ""):
                mismatches.append(f"{name}: caption {caption!r} still holds {text!r}")
    assert not mismatches, "\n".join(mismatches)
    long_caption = captions.get(str(folder / "caption_long.jpg")).caption
    assert len(long_caption) > 10_000  # the 20,000-character caption is kept (the tokenizer truncates later)
    assert "<b>" not in captions.get(str(folder / "caption_html.jpg")).caption


def test_bundled_sample_is_fully_ingested_with_a_caption_each():
    folder = REPO_ROOT / "sample" / "images"
    scan = scan_images(folder, extensions=IngestConfig().extensions)
    assert len(scan.files) >= 12 and not scan.problems
    records = ingest_images(scan.files, max_pixels=MAX_PIXELS)
    assert [r["status"] for r in records] == ["ok"] * len(records), [r["error"] for r in records if r["error"]]
    captions = read_captions(folder, scan.files)
    assert not captions.problems
    sources = {Path(path).name: captions.get(path).caption_source for path in captions}
    assert all(sources.values()), sources
    assert {"sidecar", "jsonl"} == set(sources.values())
    assert (folder / CAPTIONS_FILE).is_file()


def test_a_non_utf8_file_name_is_one_image_stored_readably_and_opened_again(ingested):
    import json
    import os

    import pyarrow as pa

    from pipelines.steps.images import load_rgb
    from storage.filenames import source_file

    folder, _, scan, captions, by_name = ingested
    record = by_name[NON_UTF8_KEY]
    assert record["source_path"] == f"{folder}/{NON_UTF8_KEY}"  # readable: caf\xe9_\xff.jpg
    assert record["status"] == "ok" and (record["width"], record["height"]) == (64, 48)
    # Valid UTF-8 everywhere a record goes: Parquet, JSON, logs.
    pa.Table.from_pylist([record])
    json.dumps(record, ensure_ascii=False).encode("utf-8")
    # ... and the stored form leads back to the very file (the bytes name), for the later stages.
    assert os.fsencode(source_file(record["source_path"])) == os.fsencode(folder) + b"/" + NON_UTF8_NAME
    assert load_rgb(record["source_path"], max_pixels=MAX_PIXELS).shape == (48, 64, 3)
    assert captions.get(record["source_path"]).caption.startswith("A chair by a window")
    source = next(f for f in scan.files if os.fsencode(f.path).endswith(NON_UTF8_NAME))
    assert source.file_key == record["file_key"] and source.source_path == record["source_path"]


def test_the_animated_gif_is_its_first_frame_with_the_animation_noted(ingested):
    _, _, _, _, by_name = ingested
    gif = by_name["animated.gif"]
    assert gif["status"] == "ok" and gif["note"] == "animated image: 3 frames, the first frame is used"
    assert by_name["png_named.jpg"]["note"] is None


def test_the_invalid_utf8_jsonl_line_is_reported_with_its_line(ingested):
    _, _, _, captions, _ = ingested
    bad = [p for p in captions.problems if p["source"] == CAPTIONS_FILE and "UTF-8" in p["error"]]
    lines = len((ingested[0] / CAPTIONS_FILE).read_bytes().rstrip(b"\n").split(b"\n"))
    assert [p["line"] for p in bad] == [lines]  # the Latin-1 line is the last one
    entry = captions.get(str(ingested[0] / "caption_jsonl_latin1.jpg"))
    assert entry.caption == "A caf\ufffd chair." and "not valid UTF-8" in entry.note

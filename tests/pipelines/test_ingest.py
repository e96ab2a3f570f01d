"""pipelines.ingest: folder scanning, caption sources and cleaning, content ids and per-file failures."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.ingest import SourceImage, clean_caption, ingest_images, read_captions, scan_images
from storage.hashing import content_key
from tests.pipelines.conftest import png_header_only, save_rgb

EXTENSIONS = ["jpg", "jpeg", "png", "webp"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _tiny(path: Path, colour=(200, 10, 10), size=(3, 2)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_scan_recursive_sorted_case_insensitive_hidden_skipped(tmp_path):
    for name in ["b.png", "A.JPG", "sub/c.jpeg", "sub/deeper/d.WebP", "notes.txt", ".hidden.png", ".cache/e.png",
                 "sub/f.gif"]:
        _tiny(tmp_path / name) if not name.endswith(".txt") else (tmp_path / name).write_text("x")
    result = scan_images(tmp_path, extensions=EXTENSIONS)
    relative = [p.path.relative_to(tmp_path).as_posix() for p in result.files]
    assert relative == ["A.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.WebP"]
    assert result.problems == []
    first = result.files[0]
    assert first.path.is_absolute() and first.size == (tmp_path / "A.JPG").stat().st_size
    assert first.file_key == content_key(str(first.path), first.size, first.mtime_ns)
    # Extensions given with dots or in capitals mean the same.
    assert len(scan_images(tmp_path, extensions=[".GIF"]).files) == 1


def test_file_key_changes_when_the_file_changes(tmp_path):
    path = _tiny(tmp_path / "a.png")
    before = scan_images(tmp_path, extensions=EXTENSIONS).files[0]
    os.utime(path, ns=(before.mtime_ns + 10**9, before.mtime_ns + 10**9))
    after = scan_images(tmp_path, extensions=EXTENSIONS).files[0]
    assert before.file_key != after.file_key


def test_scan_survives_symlink_loops_and_broken_links(tmp_path):
    _tiny(tmp_path / "sub" / "a.png")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "alias.png").symlink_to(tmp_path / "sub" / "a.png")
    result = scan_images(tmp_path, extensions=EXTENSIONS)
    assert [p.path.name for p in result.files] == ["alias.png", "a.png"]
    errors = {Path(p["path"]).name: p["error"] for p in result.problems}
    assert errors["dangling.png"] == "broken symbolic link"
    assert "symbolic link loop" in errors["loop"]
    no_links = scan_images(tmp_path, extensions=EXTENSIONS, follow_symlinks=False)
    assert [p.path.name for p in no_links.files] == ["a.png"] and no_links.problems == []


@pytest.mark.skipif(IS_ROOT, reason="root reads every folder regardless of permissions")
def test_scan_records_unreadable_folder(tmp_path):
    _tiny(tmp_path / "ok.png")
    locked = tmp_path / "locked"
    _tiny(locked / "x.png")
    locked.chmod(0)
    try:
        result = scan_images(tmp_path, extensions=EXTENSIONS)
    finally:
        locked.chmod(0o755)
    assert [p.path.name for p in result.files] == ["ok.png"]
    assert result.problems[0]["path"] == str(locked) and "cannot list folder" in result.problems[0]["error"]


def test_scan_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        scan_images(tmp_path / "missing", extensions=EXTENSIONS)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="expected a folder of images, got a file"):
        scan_images(tmp_path / "file.png", extensions=EXTENSIONS)
    (tmp_path / "empty").mkdir()
    assert scan_images(tmp_path / "empty", extensions=EXTENSIONS).files == []


# ---- captions ---------------------------------------------------------------------------------------------------


def test_clean_caption():
    assert clean_caption("  A <b>red</b>\n\tcar &amp; a  dog<br>on a <i>mat</i>. ") == "A red car & a dog on a mat."
    assert clean_caption(" \n\t ") is None and clean_caption("<br/>") is None and clean_caption(None) is None
    long = "word " * 5000
    assert clean_caption(long) == long.strip()  # long captions are kept: the tokenizer truncates later


def test_caption_sources_and_priority(tmp_path):
    for name in ["a.png", "b.png", "c.png", "d.png", "sub/e.png", "f.png"]:
        _tiny(tmp_path / name)
    (tmp_path / "a.txt").write_text("Sidecar <i>wins</i>.", encoding="utf-8")
    (tmp_path / "d.txt").write_text("   ", encoding="utf-8")  # empty sidecar: falls through to the jsonl
    lines = [
        json.dumps({"file": "a.png", "caption": "jsonl loses to the sidecar"}),
        json.dumps({"file_name": "b.png", "text": "From   the jsonl."}),
        "{not json",
        json.dumps({"image": "sub/e.png", "caption": "Nested by relative path."}),
        json.dumps({"file": "d.png", "caption": "Empty sidecar, jsonl caption."}),
        json.dumps(["a", "list"]),
        json.dumps({"file": "b.png", "caption": "duplicate"}),
        json.dumps({"file": "ghost.png", "caption": "no such image"}),
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "captions.csv").write_text('file,caption\nc.png,"From the CSV, with a comma."\nb.png,csv loses\n')
    files = scan_images(tmp_path, extensions=EXTENSIONS).files
    index = read_captions(tmp_path, files)
    by_name = {Path(k).name: index[k] for k in index}
    assert by_name["a.png"] == ("Sidecar wins.", "sidecar", None)
    assert by_name["b.png"] == ("From the jsonl.", "jsonl", None)
    assert index.captions(tmp_path / "b.png") == ["From the jsonl.", "duplicate"]  # a second line: a second caption
    assert by_name["c.png"] == ("From the CSV, with a comma.", "csv", None)
    assert by_name["d.png"].caption == "Empty sidecar, jsonl caption." and "d.txt is empty" in by_name["d.png"].note
    assert by_name["e.png"] == ("Nested by relative path.", "jsonl", None)
    assert by_name["f.png"] == (None, None, None)
    problems = {(p["source"], p["line"]): p["error"] for p in index.problems}
    assert problems[("captions.jsonl", 3)].startswith("invalid JSON")
    assert problems[("captions.jsonl", 6)] == "expected a JSON object, got list"
    assert ("captions.jsonl", 7) not in problems
    assert problems[("captions.jsonl", None)] == "1 caption(s) name no scanned image"
    assert index.get(tmp_path / "nope.png") is None


def test_invalid_utf8_sidecar_is_kept_with_a_note(tmp_path):
    _tiny(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("Caf\xe9 au lait".encode("latin-1"))
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    entry = index[tmp_path / "a.png"]
    assert entry.caption == "Caf\ufffd au lait" and entry.caption_source == "sidecar"
    assert "not valid UTF-8" in entry.note


def test_csv_without_expected_header_is_a_problem(tmp_path):
    _tiny(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text("name,words\na.png,hello\n")
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert index[tmp_path / "a.png"].caption is None
    assert "expected a header with file and caption columns" in index.problems[0]["error"]


# ---- ingest -----------------------------------------------------------------------------------------------------


def _source(path: Path) -> SourceImage:
    info = path.stat()
    return SourceImage(path=path.absolute(), size=info.st_size, mtime_ns=info.st_mtime_ns)


def test_ingest_ids_sizes_and_failures(tmp_path):
    good = save_rgb(tmp_path / "good.jpg", np.full((5, 7, 3), 90, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise: 7x5 stored, 5x7 displayed
    Image.new("RGB", (7, 5), (1, 2, 3)).save(tmp_path / "rotated.jpg", exif=exif)
    one = save_rgb(tmp_path / "one.png", np.zeros((1, 1, 3), np.uint8))
    liar = tmp_path / "liar.jpg"
    Image.new("RGB", (4, 3)).save(liar, format="PNG")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good.read_bytes()[:-40])
    (tmp_path / "bomb.png").write_bytes(png_header_only(60000, 60000))
    names = ["good.jpg", "rotated.jpg", "one.png", "liar.jpg", "empty.png", "text.png", "trunc.jpg", "bomb.png"]
    files = [_source(tmp_path / n) for n in names]
    out = ingest_images(files, max_pixels=10_000_000)
    by_name = {Path(r["source_path"]).name: r for r in out}
    assert [Path(r["source_path"]).name for r in out] == names
    for name in names:
        row = by_name[name]
        assert row["image_id"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()[:32]
        assert row["source_path"] == str(tmp_path / name) and row["file_key"] == files[names.index(name)].file_key
    assert (by_name["good.jpg"]["width"], by_name["good.jpg"]["height"], by_name["good.jpg"]["status"]) == (7, 5, "ok")
    assert (by_name["rotated.jpg"]["width"], by_name["rotated.jpg"]["height"]) == (5, 7)
    assert by_name["one.png"]["status"] == "ok" and by_name["liar.jpg"]["status"] == "ok"
    expected_errors = {
        "empty.png": "cannot decode image: empty file (empty.png)",
        "text.png": "cannot decode image: not a recognised image format (text.png)",
    }
    for name, error in expected_errors.items():
        assert by_name[name]["status"] == "failed" and by_name[name]["error"] == error
        assert by_name[name]["width"] is None
    truncated_error = by_name["trunc.jpg"]["error"]
    assert "truncated" in truncated_error.lower() and truncated_error.endswith("(trunc.jpg)")
    assert by_name["bomb.png"]["error"].startswith("image too large")


def test_jpegs_truncated_anywhere_fail_as_a_full_decode_says(tmp_path):
    """Ingest validates by a reduced decode; a JPEG cut at 50/90/99% or just before its end marker still fails,
    with the message of PIL's full-size decode of the same bytes."""
    import cv2

    noise = np.random.default_rng(11).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg", cv2.GaussianBlur(noise, (5, 5), 1.0), [cv2.IMWRITE_JPEG_QUALITY, 85])
    data = encoded.tobytes()
    cuts = {"half.jpg": len(data) // 2, "ninety.jpg": len(data) * 9 // 10, "ninety_nine.jpg": len(data) * 99 // 100,
            "no_eoi.jpg": len(data) - 2}
    (tmp_path / "whole.jpg").write_bytes(data)
    expected = {}
    for name, cut in cuts.items():
        (tmp_path / name).write_bytes(data[:cut])
        try:
            Image.open(tmp_path / name).load()
        except OSError as exc:
            expected[name] = f"cannot decode image: {exc} ({name})"
    assert sorted(expected) == sorted(cuts)  # every cut is an error of a full decode
    rows = {Path(r["source_path"]).name: r for r in ingest_images([_source(tmp_path / n) for n in ["whole.jpg", *cuts]],
                                                                  max_pixels=10_000_000)}
    assert (rows["whole.jpg"]["status"], rows["whole.jpg"]["width"], rows["whole.jpg"]["height"]) == ("ok", 400, 300)
    for name, error in expected.items():
        assert "truncated" in error
        assert (rows[name]["status"], rows[name]["error"], rows[name]["width"]) == ("failed", error, None)
        assert rows[name]["image_id"] == hashlib.sha256(data[: cuts[name]]).hexdigest()[:32]


def test_unreadable_file_is_a_failure_with_a_stable_id(tmp_path, monkeypatch):
    path = _tiny(tmp_path / "secret.png")
    source = _source(path)
    original = os.open

    def denied(file, *args, **kwargs):
        if os.fspath(file).endswith("secret.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return original(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    (row,) = ingest_images([source], max_pixels=10_000)
    assert row["status"] == "failed" and row["error"] == "cannot read image: permission denied (secret.png)"
    assert len(row["image_id"]) == 32 and row["image_id"] == ingest_images([source], max_pixels=10_000)[0]["image_id"]


@pytest.mark.skipif(IS_ROOT, reason="root reads every file regardless of permissions")
def test_unreadable_file_really_chmod(tmp_path):
    path = _tiny(tmp_path / "secret.png")
    path.chmod(0)
    try:
        (row,) = ingest_images([_source(path)], max_pixels=10_000)
    finally:
        path.chmod(0o644)
    assert row["error"] == "cannot read image: permission denied (secret.png)"


# ---- issue 14 / issue 10 ingest coverage: inputs nobody planned for -------------------------------------------------
def test_an_output_folder_inside_the_image_folder_is_not_scanned(tmp_path):
    _tiny(tmp_path / "photo.png")
    out = tmp_path / "out"
    _tiny(out / "maps" / "structure" / "ab" / "abc.png")  # what a previous run wrote
    _tiny(out / "crops" / "ab" / "abc_0.jpg")
    both = scan_images(tmp_path, extensions=EXTENSIONS)
    assert len(both.files) == 3  # without exclude the outputs feed back in as new images
    only_inputs = scan_images(tmp_path, extensions=EXTENSIONS, exclude=[out, tmp_path / "not-created-yet"])
    assert [f.path.name for f in only_inputs.files] == ["photo.png"] and only_inputs.problems == []
    # The same folder reached through a symlink is still excluded (compared by device + inode, not by name).
    (tmp_path / "link-to-out").symlink_to(out, target_is_directory=True)
    assert [f.path.name for f in scan_images(tmp_path, extensions=EXTENSIONS, exclude=[out]).files] == ["photo.png"]


def test_every_name_with_an_image_extension_gets_a_row(tmp_path):
    _tiny(tmp_path / "real.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "album.jpg").mkdir()
    _tiny(tmp_path / "album.jpg" / "inside.png")
    (tmp_path / "notes.txt").write_text("ignored as before")
    files = scan_images(tmp_path, extensions=EXTENSIONS).files
    assert [f.path.relative_to(tmp_path).as_posix() for f in files] == \
        ["album.jpg", "album.jpg/inside.png", "pipe.png", "real.png"]
    rows = {Path(r["source_path"]).name: r for r in ingest_images(files, max_pixels=10_000)}
    # The FIFO is never opened for reading (that would block this test forever).
    assert rows["pipe.png"]["error"] == "not an image file: a FIFO (named pipe) named like an image (pipe.png)"
    assert rows["album.jpg"]["error"] == "not an image file: a folder named like an image (album.jpg)"
    assert rows["pipe.png"]["image_id"] != rows["album.jpg"]["image_id"]  # failed rows keep unique ids
    assert rows["inside.png"]["status"] == rows["real.png"]["status"] == "ok"


def test_extreme_aspect_ratio_is_refused_with_the_reason_and_configurable(tmp_path):
    strip = _tiny(tmp_path / "strip.png", size=(1, 65_000))
    banner = _tiny(tmp_path / "banner.png", size=(200, 10))  # 20:1, exactly at the default limit
    rows = ingest_images([_source(strip), _source(banner)], max_pixels=10**8)
    assert rows[0]["status"] == "failed" and rows[0]["error"] == (
        "extreme aspect ratio: 1x65000 is 6.5e+04:1, above max_aspect_ratio=20 (CLIP sees a centre square of it) "
        "(strip.png)")
    assert rows[1]["status"] == "ok"
    assert ingest_images([_source(strip)], max_pixels=10**8, max_aspect_ratio=None)[0]["status"] == "ok"
    assert ingest_images([_source(banner)], max_pixels=10**8, max_aspect_ratio=19.5)[0]["status"] == "failed"


def test_a_non_utf8_name_is_scanned_ingested_and_captioned(tmp_path):
    from storage.filenames import source_file

    raw = os.fsencode(tmp_path) + b"/sn\xf6w.png"
    Image.new("RGB", (4, 3), (1, 2, 3)).save(os.fsdecode(raw))
    with open(os.fsencode(tmp_path) + b"/sn\xf6w.txt", "wb") as sidecar:
        sidecar.write(b"Snow on a roof.")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "sn\\xf6w.png", "caption": "ignored: sidecar wins"}))
    files = scan_images(tmp_path, extensions=EXTENSIONS).files
    (row,) = ingest_images(files, max_pixels=10_000)
    assert row["source_path"] == f"{tmp_path}/sn\\xf6w.png" and row["status"] == "ok"
    assert os.fsencode(source_file(row["source_path"])) == raw
    index = read_captions(tmp_path, files)
    assert index.get(row["source_path"]).caption == "Snow on a roof." and not index.problems


def test_jsonl_lines_end_at_newline_only_and_spaced_names_match(tmp_path):
    for name in ("lamp.png", " lead.png", "trail .png", "padded.png"):
        _tiny(tmp_path / name)
    records = [
        {"file": "lamp.png", "caption": "A lamp\u2028on a desk\u2029by a window\u0085at night."},
        {"file": " lead.png", "caption": "Leading space."},
        {"file": "trail .png", "caption": "Trailing space."},
        {"file": "  padded.png  ", "caption": "Padded reference."},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                             encoding="utf-8")
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert not index.problems
    assert index.get(str(tmp_path / "lamp.png")).caption == "A lamp on a desk by a window at night."
    assert index.get(str(tmp_path / " lead.png")).caption == "Leading space."
    assert index.get(str(tmp_path / "trail .png")).caption == "Trailing space."
    assert index.get(str(tmp_path / "padded.png")).caption == "Padded reference."


def test_invalid_utf8_in_captions_files_is_reported_like_a_sidecar(tmp_path):
    _tiny(tmp_path / "a.png")
    _tiny(tmp_path / "b.png")
    (tmp_path / "captions.jsonl").write_bytes(b'{"file": "a.png", "caption": "Fine."}\n'
                                              b'{"file": "b.png", "caption": "Na\xefve art."}\n')
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert index.problems == [{"source": "captions.jsonl", "line": 2, "error":
                               "not valid UTF-8 (captions.jsonl line 2); undecodable bytes replaced with U+FFFD"}]
    assert index.get(str(tmp_path / "b.png")) == ("Na\ufffdve art.", "jsonl", "captions.jsonl line 2 is not valid "
                                                  "UTF-8; undecodable bytes replaced with U+FFFD")
    assert index.get(str(tmp_path / "a.png")).note is None
    (tmp_path / "captions.jsonl").unlink()
    (tmp_path / "captions.csv").write_bytes(b"file,caption\na.png,Fine.\nb.png,Caf\xe9.\n")
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert [(p["source"], p["line"]) for p in index.problems] == [("captions.csv", 3)]
    assert index.get(str(tmp_path / "b.png")).caption == "Caf\ufffd."


@pytest.mark.parametrize("raw, expected", [
    ("&lt;img src=x onerror=alert(1)&gt;A cat.", "A cat."),  # escaped tag: decoded first, then removed
    ("A <script>alert('x')</script>dog.", "A dog."),
    ("<STYLE type='text/css'>p {color: red}</STYLE>A bird.", "A bird."),
    ("A fox <script>never closed", "A fox"),
    ("Salt &amp; pepper &lt; 3 grams", "Salt & pepper < 3 grams"),  # no closing ">": not a tag, kept
    ("Tom &amp; Jerry<br>run", "Tom & Jerry run"),
])
def test_clean_caption_decodes_entities_before_removing_tags(raw, expected):
    assert clean_caption(raw) == expected


def test_sockets_and_devices_named_like_images_are_never_read(tmp_path):
    import socket

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "socket.png"))
    (tmp_path / "zeros.png").symlink_to("/dev/zero")  # reading it would never end
    try:
        files = scan_images(tmp_path, extensions=EXTENSIONS).files
        rows = {Path(r["source_path"]).name: r["error"] for r in ingest_images(files, max_pixels=10_000)}
    finally:
        server.close()
    assert rows == {"socket.png": "not an image file: a socket named like an image (socket.png)",
                    "zeros.png": "not an image file: a character device named like an image (zeros.png)"}


def test_several_captions_per_image_from_lines_lists_and_rows(tmp_path):
    for name in ["a.png", "b.png", "c.png"]:
        _tiny(tmp_path / name)
    lines = [json.dumps({"file": "a.png", "caption": "A first."}),
             json.dumps({"file": "b.png", "caption": ["B one.", "", "B two.", "B one."]}),
             json.dumps({"file": "a.png", "caption": "A <b>second</b>."})]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "captions.csv").write_text("file,caption\nc.png,C one.\nc.png,C two.\na.png,csv loses\n")
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert index.captions(tmp_path / "a.png") == ["A first.", "A second."]
    assert index[tmp_path / "a.png"] == ("A first.", "jsonl", None)
    assert index.captions(tmp_path / "b.png") == ["B one.", "B two."]  # empty dropped, repeated text once
    assert "empty caption at captions.jsonl line 2" in index[tmp_path / "b.png"].note
    assert index.captions(tmp_path / "c.png") == ["C one.", "C two."]
    assert index[tmp_path / "c.png"].caption_source == "csv"

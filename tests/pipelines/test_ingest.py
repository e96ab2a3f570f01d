"""pipelines.steps.ingest: folder scanning, caption sources and cleaning, content ids and per-file failures."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.steps.ingest import SourceImage, clean_caption, ingest_images, read_captions, scan_images
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
    info = (tmp_path / "A.JPG").stat()
    # git's stat rule: path, size, mtime, ctime, device, inode.
    assert first.file_key == content_key(str(first.path), info.st_size, info.st_mtime_ns, info.st_ctime_ns,
                                         info.st_dev, info.st_ino)
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
    assert problems[("captions.jsonl", None)] == '1 caption(s) name no scanned image: line 8 "ghost.png"'
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


def test_csv_rows_with_more_fields_than_the_header_are_problems(tmp_path):
    """An unquoted comma in the last column (the caption) is joined back; a quote left open on an earlier line makes
    the next rows one field and is reported, never silently."""
    for name in ("a.png", "b.png", "c.png", "d.png"):
        _tiny(tmp_path / name)
    (tmp_path / "captions.csv").write_text(
        'file,caption\na.png,A cat,with,extra fields\nb.png,"an open quote\nc.png,A man\n"d.png",A dog\n')
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert index[tmp_path / "a.png"].caption == "A cat,with,extra fields"
    problems = {p["line"]: p["error"] for p in index.problems if p["source"] == "captions.csv"}
    assert problems[2] == "2 more field(s) than the header, joined to the caption (quote a caption that holds commas)"
    assert any(line >= 3 and error.startswith("1 more field(s)") for line, error in problems.items()), problems
    (tmp_path / "captions.csv").write_text("caption,file\nA cat,with commas,a.png\n")
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert index.problems[0]["error"].startswith("1 more field(s) than the header, ignored")


# ---- ingest -----------------------------------------------------------------------------------------------------


def _source(path: Path) -> SourceImage:
    info = path.stat()
    return SourceImage(str(path.absolute()), size=info.st_size, mtime_ns=info.st_mtime_ns)


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
                               "not valid UTF-8; undecodable bytes replaced with U+FFFD"}]
    assert [str(p) for p in index.problems] == [
        "captions.jsonl line 2: not valid UTF-8; undecodable bytes replaced with U+FFFD"]
    assert index.get(str(tmp_path / "b.png")) == ("Na\ufffdve art.", "jsonl", "captions.jsonl line 2 is not valid "
                                                  "UTF-8; undecodable bytes replaced with U+FFFD")
    assert index.get(str(tmp_path / "a.png")).note is None
    (tmp_path / "captions.jsonl").unlink()
    (tmp_path / "captions.csv").write_bytes(b"file,caption\na.png,Fine.\nb.png,Caf\xe9.\n")
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert [(p["source"], p["line"]) for p in index.problems] == [("captions.csv", 3)]
    assert index.get(str(tmp_path / "b.png")).caption == "Caf\ufffd."


@pytest.mark.parametrize("tail", [b"", b'{"file": "c.png", "caption": "Bad \xff byte."}\n'])
def test_byte_order_marks_open_any_line_of_a_jsonl(tmp_path, tail):
    # Two files concatenated: each starts with a byte order mark. Valid UTF-8 throughout is decoded in one go, a file
    # with a bad byte line by line: the marks are dropped the same way.
    for name in ("a.png", "b.png", "c.png"):
        _tiny(tmp_path / name)
    bom = b"\xef\xbb\xbf"
    (tmp_path / "captions.jsonl").write_bytes(bom + b'{"file": "a.png", "caption": "First."}\n'
                                              + bom + b'{"file": "b.png", "caption": "Second."}\n' + tail)
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert index.get(str(tmp_path / "a.png")).caption == "First."
    assert index.get(str(tmp_path / "b.png")).caption == "Second."
    assert [p["line"] for p in index.problems] == ([3] if tail else [])


def test_sidecars_are_found_by_name_through_links_and_beside_dotted_names(tmp_path):
    for name in ("a.b.png", "plain.png", "linked.png", "nosidecar.png"):
        _tiny(tmp_path / "sub" / name)
    (tmp_path / "sub" / "a.b.txt").write_text("Dotted name.", encoding="utf-8")
    (tmp_path / "sub" / "plain.txt").write_text("Plain name.", encoding="utf-8")
    (tmp_path / "elsewhere.txt").write_text("Through a link.", encoding="utf-8")
    (tmp_path / "sub" / "linked.txt").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "sub" / "nosidecar.txt").mkdir()  # a folder is no sidecar
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    captions = {Path(path).name: entry.caption for path, entry in index.entries.items()}
    assert captions == {"a.b.png": "Dotted name.", "plain.png": "Plain name.", "linked.png": "Through a link.",
                        "nosidecar.png": None}


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


# ---- content-true keys (git's stat rule), size limit before reading, caption messages -----------------------------


def _scan_one(folder: Path) -> SourceImage:
    files = scan_images(folder, extensions=["bmp"]).files
    assert len(files) == 1
    return files[0]


def test_other_bytes_with_the_same_size_and_mtime_get_a_new_key_and_id(tmp_path):
    # What `cp -p`, `rsync -t` or a tar extraction do: new bytes, same length, the old modification time.
    path = tmp_path / "a.bmp"
    save_rgb(path, np.full((4, 6, 3), 10, np.uint8))
    before = _scan_one(tmp_path)
    first = ingest_images([before], max_pixels=10**6)[0]
    replacement = tmp_path / "replacement.bin"
    save_rgb(tmp_path / "new.bmp", np.full((4, 6, 3), 250, np.uint8))
    (tmp_path / "new.bmp").rename(replacement)
    assert replacement.stat().st_size == path.stat().st_size  # an uncompressed 4x6 BMP: same size, other colour
    replacement.replace(path)  # the same name, a new inode
    os.utime(path, ns=(before.mtime_ns, before.mtime_ns))
    after = _scan_one(tmp_path)
    assert (after.size, after.mtime_ns) == (before.size, before.mtime_ns)
    assert after.file_key != before.file_key
    second = ingest_images([after], max_pixels=10**6)[0]
    assert second["image_id"] == hashlib.sha256(path.read_bytes()).hexdigest()[:32] != first["image_id"]


def test_bytes_rewritten_in_place_change_the_ctime_and_so_the_key(tmp_path):
    path = tmp_path / "a.bmp"
    save_rgb(path, np.full((4, 6, 3), 10, np.uint8))
    stat_before = path.stat()
    before = SourceImage.from_stat(path, stat_before)
    data = bytearray(path.read_bytes())
    with open(path, "r+b") as handle:  # same inode, same size, then the old mtime put back
        handle.write(bytes(data))
    os.utime(path, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    stat_after = path.stat()
    after = SourceImage.from_stat(path, stat_after)
    assert (stat_after.st_ino, stat_after.st_size, stat_after.st_mtime_ns) == \
        (stat_before.st_ino, stat_before.st_size, stat_before.st_mtime_ns)
    if stat_after.st_ctime_ns == stat_before.st_ctime_ns:
        pytest.skip("this file system's ctime did not move between two writes (coarse clock)")
    assert after.file_key != before.file_key


def test_every_stat_field_of_git_s_rule_tells_versions_apart():
    from types import SimpleNamespace

    base = dict(st_size=10, st_mtime_ns=4 * 10**9, st_ctime_ns=5 * 10**9, st_dev=3, st_ino=7)
    key = SourceImage.from_stat(Path("/x/a.png"), SimpleNamespace(**base)).file_key
    assert SourceImage.from_stat(Path("/x/a.png"), SimpleNamespace(**base)).file_key == key  # same stat, same key
    for field in base:
        changed = SimpleNamespace(**{**base, field: base[field] + 1})
        assert SourceImage.from_stat(Path("/x/a.png"), changed).file_key != key, field
    assert SourceImage.from_stat(Path("/y/a.png"), SimpleNamespace(**base)).file_key != key


def test_a_moved_folder_is_hashed_again_and_keeps_its_image_ids(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for n in range(3):
        save_rgb(old / f"{n}.png", np.full((4, 6, 3), 40 * n, np.uint8))
    before = scan_images(old, extensions=EXTENSIONS).files
    ids_before = [r["image_id"] for r in ingest_images(before, max_pixels=10**6)]
    old.rename(new)
    after = scan_images(new, extensions=EXTENSIONS).files
    assert not {f.file_key for f in before} & {f.file_key for f in after}  # every file is validated again
    rows = ingest_images(after, max_pixels=10**6)
    assert [r["image_id"] for r in rows] == ids_before
    assert [r["source_path"] for r in rows] == [str(new / f"{n}.png") for n in range(3)]


def test_a_file_over_max_file_bytes_fails_from_its_size_without_being_read(tmp_path, monkeypatch):
    big = tmp_path / "huge.jpg"
    with open(big, "wb") as handle:  # 50 GB, sparse: reading it would take minutes and all the memory
        handle.truncate(50 * 10**9)
    exact = save_rgb(tmp_path / "exact.png", np.full((4, 6, 3), 10, np.uint8))
    limit = exact.stat().st_size
    over = save_rgb(tmp_path / "over.png", np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8))
    assert over.stat().st_size > limit
    files = scan_images(tmp_path, extensions=["jpg", "png"]).files
    by_name = {f.path.name: f for f in files}

    default = ingest_images([by_name["huge.jpg"]], max_pixels=10**6)[0]
    assert default["status"] == "failed"
    assert default["error"] == "file too large (50000000000 bytes > ingest.max_file_bytes=268435456) (huge.jpg)"
    assert default["image_id"] and default["width"] is None

    limited = {r["source_path"]: r for r in ingest_images(files, max_pixels=10**6, max_file_bytes=limit)}
    assert limited[str(exact)]["status"] == "ok"  # at the limit: accepted
    assert limited[str(over)]["error"] == (f"file too large ({over.stat().st_size} bytes > "
                                           f"ingest.max_file_bytes={limit}) (over.png)")


def test_caption_entries_match_file_names_in_either_unicode_form(tmp_path):
    import unicodedata

    composed = "caf\u00e9.png"  # NFC, as most tools write names
    decomposed = "zoe\u0308.png"  # NFD, as macOS writes names: "zoë" with a combining diaeresis
    _tiny(tmp_path / composed)
    _tiny(tmp_path / decomposed)
    _tiny(tmp_path / "sub" / "\u00e5.png")
    lines = [{"file": unicodedata.normalize("NFD", composed), "caption": "A coffee cup."},
             {"file": unicodedata.normalize("NFC", decomposed), "caption": "A child drawing."},
             {"file": unicodedata.normalize("NFD", "sub/\u00e5.png"), "caption": "A ring."},
             {"file": "missing.png", "caption": "Nothing."},
             {"file": unicodedata.normalize("NFD", "na\u00efve.png"), "caption": "Nothing either."}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert index.get(str(tmp_path / composed)).caption == "A coffee cup."
    assert index.get(str(tmp_path / decomposed)).caption == "A child drawing."
    assert index.get(str(tmp_path / "sub" / "\u00e5.png")).caption == "A ring."
    # What still matches nothing is named: the line, the entry, and its decomposed form spelled out.
    assert [str(p) for p in index.problems] == [
        'captions.jsonl: 2 caption(s) name no scanned image: line 4 "missing.png", line 5 "na\u0069\u0308ve.png" '
        '(decomposed Unicode: "nai\\u0308ve.png")']


def test_caption_problems_read_as_file_and_line(tmp_path):
    _tiny(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "Fine."}\n\n{oops\n[1, 2]\n')
    (tmp_path / "captions.csv").write_text("name,text\n")
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert [str(p) for p in index.problems] == [
        "captions.jsonl line 3: invalid JSON: Expecting property name enclosed in double quotes",
        "captions.jsonl line 4: expected a JSON object, got list",
        "captions.csv line 1: expected a header with file and caption columns, got ['name', 'text']"]
    for many in range(7):
        (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"file": f"gone{n}.png", "caption": "x"}) + "\n"
                                                         for n in range(many)))
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert str(index.problems[0]) == ('captions.jsonl: 6 caption(s) name no scanned image: line 1 "gone0.png", '
                                      'line 2 "gone1.png", line 3 "gone2.png" (+3 more)')


def test_oversized_sidecar_and_captions_files_are_reported_not_read(tmp_path, monkeypatch):
    import pipelines.steps.ingest as ingest

    _tiny(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x" * 101)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "From the jsonl."}) + "\n")
    monkeypatch.setattr(ingest, "MAX_SIDECAR_BYTES", 100)
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert index.get(str(tmp_path / "a.png")).caption == "From the jsonl."  # the sidecar is skipped, not truncated
    assert str(index.problems[0]) == "a.txt: cannot read sidecar a.txt: file too large (101 bytes > 100)"
    monkeypatch.setattr(ingest, "MAX_CAPTIONS_FILE_BYTES", 10)
    index = read_captions(tmp_path, scan_images(tmp_path, extensions=EXTENSIONS).files)
    assert "captions.jsonl: cannot read: file too large (" in str(index.problems[0])


def test_a_source_image_keeps_its_file_key_and_travels_to_workers():
    import pickle

    # Literal keys from before SourceImage held its path as a string (git 35eaeba): a catalogue's cache survives.
    plain = SourceImage("/data/x.png", 10, 5, 6, 7, 8)
    assert plain.file_key == "1dbb4ae7e37c12cd" and plain.path == Path("/data/x.png")
    undecodable = SourceImage("/data/caf\udce9.png", 10, 5, 6, 7, 8)
    assert undecodable.file_key == "f7b106f9bad73c85" and undecodable.source_path == "/data/caf\\xe9.png"
    assert pickle.loads(pickle.dumps(undecodable)) == undecodable
    assert SourceImage.from_stat(Path("/data/x.png"), os.stat_result((0, 8, 7, 1, 0, 0, 10, 0, 0, 0)),
                                 size=0).location == "/data/x.png"


def test_jsonl_lines_are_read_as_json_loads_reads_them(tmp_path):
    # Each line's record or error is exactly json.loads' (the compiled scanner reads most lines; the rest, and every
    # error message, come from json.loads itself).
    from pipelines.steps.ingest import _read_jsonl

    lines = ['{"file": "a.png", "caption": "plain"}', '  {"file": "b.png", "caption": "spaces"}  ',
             '{"file": "c.png", "caption": "crlf"}\r', '{"file": "d.png", "caption": "x"} trailing',
             '{"file": "e.png", "caption": "x"}{"file": "f.png"}', '{"file": "g.png", "caption": }', '[1, 2]',
             '{"file": "h.png", "caption": "caf\\u00e9 \\ud83d\\ude00"}', '"text"', '{"file": "i.png"', 'nan',
             '{"file": "j.png", "caption": ["one", "two"]}', '{"file": "k.png", "caption": "a", "caption": "b"}',
             '', '   ', '{"file": "l.png", "caption": "the last line, without a newline"}']
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    problems: list[dict] = []
    rows = list(_read_jsonl(path, problems))
    expected_rows, expected_problems = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():  # blank lines are skipped
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            expected_problems.append((number, f"invalid JSON: {exc.msg}"))
            continue
        if not isinstance(record, dict):
            expected_problems.append((number, f"expected a JSON object, got {type(record).__name__}"))
            continue
        captions = record.get("caption")
        for caption in captions if isinstance(captions, list) else [captions]:
            expected_rows.append((number, record["file"], caption))
    assert rows == expected_rows
    assert [(p["line"], p["error"]) for p in problems] == expected_problems
    assert len(expected_problems) == 7  # trailing, two objects, missing value, list, string, unclosed, NaN


def test_a_scan_held_as_columns_gives_back_each_file_exactly():
    # Negative times (before 1970) and inode or device numbers above 2**63 come back as the same Python ints, so
    # every file key is the one the file had before.
    from pipelines.steps.ingest import ScanResult

    files = [SourceImage("/d/a.png", 5, -(10**18), 3, 2**64 - 1, 2**63 + 5), SourceImage("/d/b.png", 0, 0, 0, 0, 0),
             SourceImage("/d/caf\udce9.png", 2**40, 1765000000123456789, 1765000000123456790, 2049, 7)]
    scan = ScanResult(files, [])
    assert len(scan) == 3 and scan.locations == [f.location for f in files]
    assert scan.files == files and [f.file_key for f in scan.iter_files()] == [f.file_key for f in files]
    assert scan.file_keys() == [f.file_key for f in files]
    assert all(type(value) is int for f in scan.files for value in f[1:])
    assert len(ScanResult()) == 0 and ScanResult().files == []


@pytest.mark.parametrize("text", ["", "\n", "a", "a\n", "a\nb", "a\n\nb\n", "\n\na", "x\r\ny\u2028z\n", "\ufeffa\n\ufeffb"])
def test_lines_are_split_at_newlines_only_as_str_split_does(text):
    from pipelines.steps.ingest import _lines

    expected = text.split("\n")
    if expected[-1] == "":
        expected.pop()
    assert list(_lines(text)) == expected

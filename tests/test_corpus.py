"""The generated corpora are what they claim: each bad-input file really has the defect it is named for."""

from __future__ import annotations

import json
import os
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from storage.filenames import storable_path
from tests.corpus import (
    CAPTIONS_FILE,
    EXTREME_ASPECT,
    NON_UTF8_NAME,
    HUGE_SIDE,
    IMAGES_DIR,
    LONG_CAPTION_CHARS,
    huge_png_bytes,
    make_bad_corpus,
    make_generated_images,
    png_chunk,
    read_png_ihdr,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root / IMAGES_DIR, make_bad_corpus(root)


def test_png_chunk_crc_matches_a_png_written_by_pil(tmp_path):
    # PIL writes the IHDR of a 3x2 8-bit RGB image; our chunk builder must produce the identical bytes.
    Image.new("RGB", (3, 2)).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    assert data[8:33] == png_chunk(b"IHDR", bytes([0, 0, 0, 3, 0, 0, 0, 2, 8, 2, 0, 0, 0]))


def test_huge_png_header_claims_60000_squared_and_is_tiny(corpus):
    folder, _ = corpus
    data = (folder / "huge_header.png").read_bytes()
    assert read_png_ihdr(data) == {"width": HUGE_SIDE, "height": HUGE_SIDE, "bit_depth": 8, "color_type": 2}
    assert len(data) < 10_000
    assert data.endswith(png_chunk(b"IEND", b"")) and data[-4:] == zlib.crc32(b"IEND").to_bytes(4, "big")
    # PIL refuses it from the header alone (its bomb check runs at open, before any pixel buffer exists).
    with pytest.raises(Image.DecompressionBombError, match="3600000000 pixels"):
        Image.open(folder / "huge_header.png")
    assert huge_png_bytes(7, 5)[16:24] == bytes([0, 0, 0, 7, 0, 0, 0, 5])


def test_undecodable_files(corpus):
    folder, expected = corpus
    assert (folder / "zero_bytes.jpg").stat().st_size == 0
    assert not (folder / "text_named.png").read_bytes().startswith(b"\x89PNG")
    truncated = (folder / "truncated.jpg").read_bytes()
    assert truncated.startswith(b"\xff\xd8") and not truncated.rstrip(b"\x00").endswith(b"\xff\xd9")
    with Image.open(folder / "truncated.jpg") as image, pytest.raises(OSError, match="truncated"):
        image.load()
    for name in ("zero_bytes.jpg", "truncated.jpg", "text_named.png", "huge_header.png"):
        assert expected[name].status == "failed" and expected[name].reason


def test_awkward_images_have_the_claimed_format_mode_and_size(corpus):
    folder, expected = corpus
    claims = {  # name: (PIL format, PIL mode)
        "png_named.jpg": ("PNG", "RGB"),
        "cmyk.jpg": ("JPEG", "CMYK"),
        "grey16.png": ("PNG", "I;16"),
        "rgba.png": ("PNG", "RGBA"),
        "palette.png": ("PNG", "P"),
        "one_pixel.png": ("PNG", "RGB"),
        "animated.gif": ("GIF", "P"),
        "animated.webp": ("WEBP", "RGBA"),  # PIL decodes animated WebP as RGBA
    }
    for name, (fmt, mode) in claims.items():
        with Image.open(folder / name) as image:
            assert (image.format, image.mode) == (fmt, mode), name
            assert image.size == (expected[name].width, expected[name].height), name
    assert read_png_ihdr((folder / "grey16.png").read_bytes())["bit_depth"] == 16
    grey16 = cv2.imread(str(folder / "grey16.png"), cv2.IMREAD_UNCHANGED)
    assert grey16.dtype == np.uint16 and grey16.max() > 255  # really uses the 16-bit range
    rgba = np.asarray(Image.open(folder / "rgba.png"))
    assert rgba[0, 0, 3] == 0 and rgba[0, -1, 3] == 255  # alpha ramps from transparent to opaque


def test_animations_have_three_frames(corpus):
    folder, _ = corpus
    for name in ("animated.gif", "animated.webp"):
        with Image.open(folder / name) as image:
            assert image.is_animated and image.n_frames == 3, name


def test_exif_rotated_jpeg_is_stored_landscape_and_displays_portrait(corpus):
    folder, expected = corpus
    with Image.open(folder / "exif_rotated.jpg") as image:
        assert image.size == (64, 32)
        assert image.getexif()[0x0112] == 6
    assert (expected["exif_rotated.jpg"].width, expected["exif_rotated.jpg"].height) == (32, 64)


def test_file_system_cases(corpus):
    folder, expected = corpus
    assert (folder / "name with spaces.jpg").is_file() and (folder / "ünïcødé_名前.jpg").is_file()
    loop = folder / "loop" / "parent"
    assert loop.is_symlink() and loop.resolve() == folder.resolve()
    assert (loop / "loop" / "parent" / "loop" / "inner.jpg").is_file()  # the loop really loops
    assert (folder / "dup_a.jpg").read_bytes() == (folder / "dup_b.jpg").read_bytes()
    assert expected["dup_b.jpg"].duplicate_of == "dup_a.jpg"
    assert os.stat(folder / "unreadable.jpg").st_mode & 0o777 == 0
    unreadable = expected["unreadable.jpg"]
    if os.geteuid() == 0:
        assert unreadable.status == "ok"
    else:
        assert unreadable.status == "failed" and unreadable.reason == "permission denied"


def test_caption_cases(corpus):
    folder, expected = corpus
    assert (folder / "caption_empty.txt").read_bytes() == b""
    assert (folder / "caption_whitespace.txt").read_text().strip() == ""
    assert len((folder / "caption_long.txt").read_text(encoding="utf-8")) == LONG_CAPTION_CHARS
    assert "<b>" in (folder / "caption_html.txt").read_text(encoding="utf-8")
    with pytest.raises(UnicodeDecodeError):
        (folder / "caption_bad_utf8.txt").read_bytes().decode("utf-8")
    lines = [line.decode("utf-8", errors="replace") for line in (folder / CAPTIONS_FILE).read_bytes().split(b"\n")]
    parsed = {}
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            assert number == 3  # the one broken line, as the expectation says
            continue
        parsed[row["file"]] = row["caption"]
    assert expected[CAPTIONS_FILE].caption_problem == "line 3"
    for name, caption in parsed.items():
        name = name if (folder / name).is_file() else name.strip()  # one reference is padded with spaces
        assert (folder / name).is_file()
        assert expected[name].has_caption and expected[name].caption_contains in " ".join(caption.split())
    assert "🐶" in parsed["caption_emoji.jpg"] and "木桌" in parsed["caption_chinese.jpg"]


def test_every_expected_image_exists_and_every_image_is_expected(corpus):
    folder, expected = corpus
    on_disk = {storable_path(p.relative_to(folder).as_posix()) for p in folder.rglob("*")
               if p.suffix in {".jpg", ".png", ".gif", ".webp"} and "parent" not in p.relative_to(folder).parts}
    images = {name for name, e in expected.items() if e.kind == "image"}
    assert on_disk == images
    for name in images:
        outcome = expected[name]
        assert outcome.status in ("ok", "failed")
        assert (outcome.status == "failed") == (outcome.reason is not None), name
        if outcome.status == "ok":
            assert outcome.width and outcome.height, name


def test_generated_images_are_deterministic_prefix_stable_and_captioned(tmp_path):
    first = make_generated_images(tmp_path / "a", 4, size=(96, 64), seed=3)
    again = make_generated_images(tmp_path / "b", 6, size=(96, 64), seed=3)
    other = make_generated_images(tmp_path / "c", 2, size=(96, 64), seed=4)
    assert [p.name for p in first] == [f"gen_{i:05d}.jpg" for i in range(4)]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again[:4]]
    assert first[0].read_bytes() != other[0].read_bytes()
    extra = make_generated_images(tmp_path / "a", 2, size=(96, 64), seed=3, start=4)
    assert [p.read_bytes() for p in extra] == [p.read_bytes() for p in again[4:]]
    rows = [json.loads(line) for line in (tmp_path / "a" / CAPTIONS_FILE).read_text().splitlines()]
    assert [r["file"] for r in rows] == [f"gen_{i:05d}.jpg" for i in range(6)]  # merged, not overwritten
    for row in rows:
        assert len(row["caption"].split()) >= 30
    image = cv2.imread(str(first[0]))
    assert image.shape == (64, 96, 3)


def test_generated_images_have_edges_for_canny(tmp_path):
    for path in make_generated_images(tmp_path, 5, seed=0):
        grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        assert grey.shape == (480, 640)
        edge_fraction = (cv2.Canny(grey, 100, 200) > 0).mean()
        assert 0.002 < edge_fraction < 0.2, (path.name, edge_fraction)


def test_generated_images_reject_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n >= 0"):
        make_generated_images(tmp_path, -1)
    with pytest.raises(ValueError, match="size"):
        make_generated_images(tmp_path, 1, size=(4000, 10))


def test_inputs_nobody_planned_for_really_are_what_they_claim(corpus):
    import stat

    folder, expected = corpus
    with pytest.raises(UnicodeDecodeError):
        NON_UTF8_NAME.decode("utf-8")
    assert NON_UTF8_NAME in os.listdir(os.fsencode(folder))
    assert stat.S_ISFIFO(os.stat(folder / "pipe.jpg").st_mode)
    assert (folder / "folder.png").is_dir() and (folder / "folder.png" / "inside.jpg").is_file()
    with Image.open(folder / "strip_1x65000.png") as strip:
        assert strip.size == EXTREME_ASPECT
    assert (folder / " spaced name .jpg").is_file()
    raw = (folder / CAPTIONS_FILE).read_bytes()
    for separator in ("\u2028", "\u2029", "\u0085"):
        assert separator.encode("utf-8") in raw  # raw, as json.dumps(ensure_ascii=False) writes them
    assert b"caf\xe9 chair" in raw
    assert (folder / "caption_markup.txt").read_bytes().startswith(b"&lt;img src=x onerror")
    assert expected["caption_only_colours.jpg"].final_failure == "no content word"

"""Generated test inputs: a corpus of bad and awkward images/captions with their expected outcomes, and fast
deterministic photo-like JPEGs with captions for benchmarks and stage tests.

Nothing here is committed as data: every file is written on demand into a folder the caller owns (``tmp_path``).

    expectations = make_bad_corpus(tmp_path)          # {relative path: Expected}
    paths = make_generated_images(tmp_path / "gen", 20, seed=0)
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

IMAGES_DIR = "images"
CAPTIONS_FILE = "captions.jsonl"
HUGE_SIDE = 60_000  # 3.6e9 pixels: far above any sane max_pixels, and ~10 GB if someone allocated it
LONG_CAPTION_CHARS = 20_000


@dataclass(frozen=True)
class Expected:
    """The outcome the ingest stage should record for one corpus entry.

    ``kind``: "image" (a file the scan should list, then ingest), "skipped" (a path the scan must not list as an
    image, e.g. a symlink loop), "captions" (a problem with a caption file itself, e.g. a broken captions.jsonl line).
    """

    kind: Literal["image", "skipped", "captions"] = "image"
    status: Literal["ok", "failed"] | None = "ok"
    reason: str | None = None  # substring (case-insensitive) of the recorded error when status == "failed"
    width: int | None = None  # expected size after EXIF orientation, when status == "ok"
    height: int | None = None
    has_caption: bool | None = False  # None: either is acceptable
    caption_contains: str | None = None  # substring the read caption must contain
    caption_problem: str | None = None  # substring (case-insensitive) of a reported caption problem for this entry
    duplicate_of: str | None = None  # another entry with identical bytes (same image_id)
    caption_lacks: tuple[str, ...] = ()  # substrings the read caption must not contain (markup, script bodies)
    final_failure: str | None = None  # an image ingested fine whose manifest row fails later: substring of its error
    ingest_note: str | None = None  # substring (case-insensitive) of the ingest record's note
    note: str = ""


# Keys of the corpus are relative paths as stored in records (storage.filenames.storable_path): a name with bytes
# that are not UTF-8 appears with each such byte as \xNN.
NON_UTF8_NAME = b"caf\xe9_\xff.jpg"  # Latin-1 "cafe" + a byte that is never UTF-8
NON_UTF8_KEY = "caf\\xe9_\\xff.jpg"
EXTREME_ASPECT = (1, 65_000)  # width, height


# ---- byte-level helpers ----------------------------------------------------------------------------------------
def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """Return one PNG chunk: length, type, payload and the CRC-32 of type + payload."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def huge_png_bytes(width: int = HUGE_SIDE, height: int = HUGE_SIDE) -> bytes:
    """Return a small, well-formed PNG header that claims ``width`` x ``height`` RGB pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no filter, no interlace
    # One scanline's worth of zero data is enough for every header-only reader; decoding would fail, not allocate.
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 1024)))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def read_png_ihdr(data: bytes) -> dict[str, int]:
    """Return the IHDR fields of PNG bytes (width, height, bit_depth, color_type), checking the signature and CRC."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("expected the PNG signature at byte 0")
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise ValueError(f"expected a 13-byte IHDR chunk first, got {kind!r} of {length} bytes")
    payload = data[16:29]
    (crc,) = struct.unpack(">I", data[29:33])
    if crc != zlib.crc32(kind + payload) & 0xFFFFFFFF:
        raise ValueError("IHDR CRC mismatch")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", payload[:10])
    return {"width": width, "height": height, "bit_depth": bit_depth, "color_type": color_type}


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """Return a small (H, W, 3) uint8 RGB test picture with a gradient and a few shapes (edges to find)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xs / max(width - 1, 1) * 255, ys / max(height - 1, 1) * 255,
                      np.full_like(xs, float(rng.integers(0, 256)))], axis=2).astype(np.uint8)
    image = np.ascontiguousarray(image)
    if min(width, height) >= 8:
        cv2.rectangle(image, (width // 8, height // 8), (width // 2, height // 2), (255, 255, 255), -1)
        cv2.circle(image, (3 * width // 4, 3 * height // 4), max(min(width, height) // 6, 1), (10, 20, 200), -1)
    return image


def _encode(image: np.ndarray, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **params)
    return buffer.getvalue()


def _jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return _encode(_photo(width, height, seed), "JPEG", quality=90)


def _permission_denied(path: Path) -> bool:
    """Return True when this process really cannot open ``path`` (root and some file systems ignore mode 000)."""
    try:
        with open(path, "rb"):
            return False
    except PermissionError:
        return True


# ---- the bad-input corpus --------------------------------------------------------------------------------------
def make_bad_corpus(root: Path) -> dict[str, Expected]:
    """Write the corpus under ``root/images`` and return {path relative to that folder (POSIX): Expected}."""
    folder = Path(root) / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}

    def write(name: str, data: bytes, outcome: Expected) -> Path:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[name] = outcome
        return path

    # -- undecodable files -----------------------------------------------------------------------------------
    write("zero_bytes.jpg", b"", Expected(status="failed", reason="empty"))
    full = _jpeg(64, 48, seed=1)
    write("truncated.jpg", full[: len(full) // 2], Expected(status="failed", reason="truncated"))
    write("text_named.png", b"this is plain text, not a PNG image\n" * 4,
          Expected(status="failed", reason="image format", note="text content under an image extension"))
    write("huge_header.png", huge_png_bytes(),
          Expected(status="failed", reason="too large",
                   note=f"IHDR claims {HUGE_SIDE}x{HUGE_SIDE}; must be refused from the header, never allocated"))

    # -- awkward but valid images: decoded by content, first frame, orientation applied ----------------------
    write("png_named.jpg", _encode(_photo(40, 30, 2), "PNG"), Expected(width=40, height=30, note="PNG bytes, .jpg"))
    cmyk = Image.fromarray(_photo(48, 32, 3)).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, "JPEG", quality=90)
    write("cmyk.jpg", buffer.getvalue(), Expected(width=48, height=32))
    ramp = (np.arange(24 * 36, dtype=np.uint32).reshape(24, 36) * 75).astype(np.uint16)  # spans 0..64725
    ok, grey16 = cv2.imencode(".png", ramp)
    assert ok
    write("grey16.png", grey16.tobytes(), Expected(width=36, height=24))
    rgba = np.dstack([_photo(30, 20, 4), np.tile(np.linspace(0, 255, 30, dtype=np.uint8), (20, 1))])
    write("rgba.png", _encode(rgba, "PNG"), Expected(width=30, height=20))
    palette = Image.fromarray(_photo(33, 22, 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    write("palette.png", buffer.getvalue(), Expected(width=33, height=22))
    write("one_pixel.png", _encode(np.full((1, 1, 3), 128, np.uint8), "PNG"), Expected(width=1, height=1))

    frames = [Image.fromarray(_photo(40, 24, 10 + i)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    write("animated.gif", buffer.getvalue(), Expected(width=40, height=24, note="3 frames; first frame is used"))
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    write("animated.webp", buffer.getvalue(), Expected(width=40, height=24, note="3 frames; first frame is used"))

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 64x32 landscape, displayed 32x64 portrait
    buffer = io.BytesIO()
    Image.fromarray(_photo(64, 32, 6)).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    write("exif_rotated.jpg", buffer.getvalue(), Expected(width=32, height=64, note="EXIF orientation 6"))

    # -- file-system cases ------------------------------------------------------------------------------------
    locked = write("unreadable.jpg", _jpeg(seed=7), Expected())
    os.chmod(locked, 0)
    if _permission_denied(locked):
        expected["unreadable.jpg"] = Expected(status="failed", reason="permission denied", note="mode 000")
    else:
        expected["unreadable.jpg"] = Expected(width=64, height=48, note="mode 000, but this process (root) reads it")
    write("name with spaces.jpg", _jpeg(seed=8), Expected(width=64, height=48, has_caption=True,
                                                           caption_contains="spaces in its file name"))
    write("ünïcødé_名前.jpg", _jpeg(seed=9), Expected(width=64, height=48, note="non-ASCII file name"))
    write("loop/inner.jpg", _jpeg(seed=11), Expected(width=64, height=48, note="must be listed exactly once"))
    os.symlink("..", folder / "loop" / "parent", target_is_directory=True)
    expected["loop/parent"] = Expected(kind="skipped", status=None, has_caption=None,
                                       note="directory symlink to its parent: following it must not loop or "
                                            "list the same file twice")
    duplicate = _jpeg(seed=12)
    write("dup_a.jpg", duplicate, Expected(width=64, height=48))
    write("dup_b.jpg", duplicate, Expected(width=64, height=48, duplicate_of="dup_a.jpg"))

    # -- caption cases: each a valid image; the sidecar is <stem>.txt, the rest come from captions.jsonl -------
    def captioned(stem: str, outcome: Expected, sidecar: bytes | None = None) -> None:
        write(f"{stem}.jpg", _jpeg(seed=sum(map(ord, stem))), outcome)
        if sidecar is not None:
            (folder / f"{stem}.txt").write_bytes(sidecar)

    captioned("caption_empty", Expected(width=64, height=48, has_caption=False), sidecar=b"")
    captioned("caption_whitespace", Expected(width=64, height=48, has_caption=False), sidecar=b"  \n\t \r\n ")
    long_caption = ("A long caption about a wooden table. " * (LONG_CAPTION_CHARS // 37 + 1))[:LONG_CAPTION_CHARS]
    captioned("caption_long", Expected(width=64, height=48, has_caption=True,
                                       caption_contains="A long caption about a wooden table."),
              sidecar=long_caption.encode("utf-8"))
    captioned("caption_html", Expected(width=64, height=48, has_caption=True, caption_contains="bicycle",
                                       note="tags may be kept or stripped; the words must survive"),
              sidecar=b"<p>A <b>red</b> bicycle leans on a <i>stone</i> wall &amp; a gate.</p>")
    captioned("caption_bad_utf8", Expected(width=64, height=48, has_caption=None, caption_problem="utf-8",
                                           note="invalid UTF-8 in the sidecar: reported (and either skipped or "
                                                "decoded with replacement characters)"),
              sidecar=b"A caf\xe9 table with \xff\xfe broken bytes.")
    # Markup: entities are decoded before tags are removed, so an escaped tag goes too; script/style bodies go.
    captioned("caption_markup", Expected(width=64, height=48, has_caption=True,
                                         caption_contains="A dog runs on a beach.",
                                         caption_lacks=("<", ">", "onerror", "alert", "color"),
                                         note="escaped <img onerror>, <script> and <style> around real words"),
              sidecar=b"&lt;img src=x onerror=alert(1)&gt;A <script>alert('x')</script>dog "
                      b"<style>p {color: red}</style>runs on a beach.")
    # No content word: a failed row at the filter stage, not a training pair.
    captioned("caption_only_colours", Expected(width=64, height=48, has_caption=True, caption_contains="Red, blue",
                                               final_failure="no content word",
                                               note="only colour words, nothing left after filtering"),
              sidecar=b"Red, blue and green.")
    captioned("caption_only_punctuation", Expected(width=64, height=48, has_caption=True, caption_contains="?!",
                                                   final_failure="no content word"),
              sidecar=b"... ?! -- !!")

    # -- file names and file kinds nobody planned for --------------------------------------------------------------
    path = folder / os.fsdecode(NON_UTF8_NAME)
    path.write_bytes(_jpeg(seed=21))
    path.with_suffix(".txt").write_bytes("A chair by a window, named in Latin-1.".encode())
    expected[NON_UTF8_KEY] = Expected(width=64, height=48, has_caption=True, caption_contains="chair by a window",
                                      note="file name bytes are not UTF-8: one image like any other")
    os.mkfifo(folder / "pipe.jpg")
    expected["pipe.jpg"] = Expected(status="failed", reason="fifo", note="a named pipe: never opened for reading")
    write("folder.png/inside.jpg", _jpeg(seed=22), Expected(width=64, height=48, note="inside a folder named .png"))
    expected["folder.png"] = Expected(status="failed", reason="folder named like an image")
    width, height = EXTREME_ASPECT
    write("strip_1x65000.png", _encode(np.full((height, width, 3), 90, np.uint8), "PNG"),
          Expected(status="failed", reason="aspect ratio", note="1x65000: refused at ingest with the reason"))
    write(" spaced name .jpg", _jpeg(seed=23), Expected(width=64, height=48, has_caption=True,
                                                         caption_contains="leading and trailing spaces"))
    write("padded_reference.jpg", _jpeg(seed=24), Expected(width=64, height=48, has_caption=True,
                                                             caption_contains="padded reference"))

    jsonl_captions = {
        "caption_chinese": "一只橙色的猫坐在木桌上，旁边有两个白色的杯子。",
        "caption_arabic": "قطة برتقالية تجلس على طاولة خشبية بجانب كوبين أبيضين.",
        "caption_emoji": "A dog 🐶 runs across green grass 🌱 toward a red ball ⚽.",
    }
    for stem, text in jsonl_captions.items():
        captioned(stem, Expected(width=64, height=48, has_caption=True, caption_contains=text))
    lines = [json.dumps({"file": f"{stem}.jpg", "caption": text}, ensure_ascii=False)
             for stem, text in jsonl_captions.items()]
    lines.insert(2, '{"file": "caption_broken_line.jpg", "caption": "this line is cut o')  # line 3
    lines.append(json.dumps({"file": "name with spaces.jpg", "caption": "A test image with spaces in its file name."}))
    captioned("caption_broken_line", Expected(width=64, height=48, has_caption=False,
                                              note="its only caption sits on the broken captions.jsonl line"))
    # U+2028 / U+2029 / U+0085 are written raw by ensure_ascii=False: a line splitter other than "\n" cuts them.
    captioned("caption_line_separators", Expected(width=64, height=48, has_caption=True,
                                                  caption_contains="A lamp on a desk beside a window at night."))
    lines.append(json.dumps({"file": "caption_line_separators.jpg",
                             "caption": "A lamp\u2028on a desk\u2029beside a window\u0085at night."},
                            ensure_ascii=False))
    lines.append(json.dumps({"file": " spaced name .jpg", "caption": "A name with leading and trailing spaces."}))
    lines.append(json.dumps({"file": "  padded_reference.jpg ", "caption": "A padded reference still matches."}))
    text = "\n".join(lines) + "\n"
    captioned("caption_jsonl_latin1", Expected(width=64, height=48, has_caption=True, caption_contains="chair",
                                               caption_problem="utf-8",
                                               note="its captions.jsonl line has a Latin-1 byte: reported"))
    latin1_line = b'{"file": "caption_jsonl_latin1.jpg", "caption": "A caf\xe9 chair."}\n'
    (folder / CAPTIONS_FILE).write_bytes(text.encode("utf-8") + latin1_line)
    expected[CAPTIONS_FILE] = Expected(kind="captions", status=None, has_caption=None, caption_problem="line 3",
                                       note="line 3 is not valid JSON: reported; the other lines are used")
    return expected


# ---- generated photo-like images -------------------------------------------------------------------------------
_COLOURS = {  # name -> RGB
    "red": (200, 30, 30), "green": (40, 160, 60), "blue": (30, 60, 200), "yellow": (230, 210, 40),
    "orange": (240, 140, 20), "purple": (130, 50, 160), "white": (245, 245, 245), "black": (15, 15, 15),
    "grey": (128, 128, 128), "brown": (120, 80, 40), "pink": (240, 150, 180), "teal": (20, 140, 140),
}
_SHAPES = ("circle", "square", "triangle", "ellipse", "stripe")
_MIN_CONTRAST = 60.0  # grey levels between a shape and the background behind it
_NOISE_SIDE = 1024  # one noise tile per call, cut at a random offset per image (drawing fresh noise is the slow part)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114)


def _where(cx: float, cy: float, width: int, height: int) -> str:
    vertical = "top" if cy < height / 3 else "bottom" if cy > 2 * height / 3 else "middle"
    horizontal = "left" if cx < width / 3 else "right" if cx > 2 * width / 3 else "centre"
    if vertical == "middle":
        return "centre" if horizontal == "centre" else f"{horizontal} edge"
    return f"{vertical} edge" if horizontal == "centre" else f"{vertical} {horizontal} corner"


def _generated_image(index: int, seed: int, size: tuple[int, int], noise: np.ndarray) -> tuple[np.ndarray, str]:
    """Return one photo-like (H, W, 3) uint8 RGB image and a caption naming its shapes, colours and places."""
    width, height = size
    rng = np.random.default_rng([seed, index])
    names = list(_COLOURS)
    top, bottom = (np.array(_COLOURS[names[i]], np.float32) for i in rng.choice(len(names), 2, replace=False))
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    image = np.ascontiguousarray(np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).astype(np.uint8))
    count = int(rng.integers(3, 7))
    described = []
    for _ in range(count):
        shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
        cx = int(rng.integers(width // 10, width - width // 10))
        cy = int(rng.integers(height // 10, height - height // 10))
        # A colour that stands out from the background at the shape's row: a grey step of >= 60 levels makes a
        # Sobel response above Canny's high threshold (200), so edges do not hinge on resampling details.
        background = _luma(top + (bottom - top) * (cy / max(height - 1, 1)))
        contrast = {name: abs(_luma(np.array(rgb, np.float32)) - background) for name, rgb in _COLOURS.items()}
        choices = [name for name in names if contrast[name] >= _MIN_CONTRAST] or [max(contrast, key=contrast.get)]
        colour = choices[int(rng.integers(len(choices)))]
        rgb = _COLOURS[colour]
        r = int(rng.integers(min(size) // 14, min(size) // 5))
        if shape == "circle":
            cv2.circle(image, (cx, cy), r, rgb, -1, cv2.LINE_AA)
        elif shape == "square":
            cv2.rectangle(image, (cx - r, cy - r), (cx + r, cy + r), rgb, -1)
        elif shape == "triangle":
            points = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
            cv2.fillPoly(image, [points], rgb, cv2.LINE_AA)
        elif shape == "ellipse":
            angle = float(rng.integers(0, 180))
            cv2.ellipse(image, (cx, cy), (r, max(r // 2, 1)), angle, 0, 360, rgb, -1, cv2.LINE_AA)
        else:
            cv2.line(image, (cx - 2 * r, cy - r), (cx + 2 * r, cy + r), rgb, max(r // 4, 2), cv2.LINE_AA)
        described.append((shape, colour, cx, cy))
    oy, ox = int(rng.integers(0, _NOISE_SIDE - height + 1)), int(rng.integers(0, _NOISE_SIDE - width + 1))
    # Sensor-like grain: gives Canny weak texture to reject, as real photos do.
    image = np.clip(image.astype(np.int16) + noise[oy:oy + height, ox:ox + width], 0, 255).astype(np.uint8)
    sentences = [f"A synthetic photo with {count} flat shapes on a smooth background that fades from "
                 f"{_gradient_names(top, bottom)} at the bottom, covered with fine grain."]
    for shape, colour, cx, cy in described:
        sentences.append(f"A {colour} {shape} lies near the {_where(cx, cy, width, height)} of the picture.")
    first, last = described[0], described[-1]
    relation = "above" if first[3] < last[3] else "below"
    sentences.append(f"The {first[1]} {first[0]} is {relation} the {last[1]} {last[0]}, and the shapes have sharp, "
                     f"clean edges.")
    return image, " ".join(sentences)


def _gradient_names(top: np.ndarray, bottom: np.ndarray) -> str:
    def nearest(rgb: np.ndarray) -> str:
        return min(_COLOURS, key=lambda name: float(np.sum((np.array(_COLOURS[name]) - rgb) ** 2)))

    return f"{nearest(top)} at the top to {nearest(bottom)}"


def make_generated_images(folder: Path, n: int, size: tuple[int, int] = (640, 480), seed: int = 0, *,
                          start: int = 0, quality: int = 90) -> list[Path]:
    """Write ``n`` deterministic photo-like JPEGs ``gen_<index>.jpg`` (index from ``start``) and their captions.

    Image ``i`` depends only on (seed, i), so a later call with ``start=n`` adds new images without changing the
    first ones. Captions (30+ words naming colours, shapes and places) are merged into ``folder/captions.jsonl``.
    Returns the image paths, in index order.
    """
    if n < 0 or start < 0:
        raise ValueError(f"expected n >= 0 and start >= 0, got n={n}, start={start}")
    width, height = size
    if not (16 <= width <= _NOISE_SIDE and 16 <= height <= _NOISE_SIDE):
        raise ValueError(f"expected a size between 16 and {_NOISE_SIDE} px per side, got {size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng([seed, 2**31]).normal(0.0, 6.0, (_NOISE_SIDE, _NOISE_SIDE, 1)).astype(np.int16)
    captions_path = folder / CAPTIONS_FILE
    rows: dict[str, str] = {}
    if captions_path.exists():
        for line in captions_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["file"]] = row["caption"]
    paths = []
    for index in range(start, start + n):
        image, caption = _generated_image(index, seed, (width, height), noise)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise OSError(f"JPEG encoding failed for generated image {index}")
        path = folder / f"gen_{index:05d}.jpg"
        path.write_bytes(encoded.tobytes())
        rows[path.name] = caption
        paths.append(path)
    with open(captions_path, "w", encoding="utf-8") as handle:
        for name in sorted(rows):
            handle.write(json.dumps({"file": name, "caption": rows[name]}) + "\n")
    return paths

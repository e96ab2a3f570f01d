"""Image decoding shared by the stages: validated RGB loading and the fast grey path of the structure stage.

Every decode error becomes one ``ImageLoadError`` whose message is one line: what failed, why, and the file name,
e.g. ``cannot decode image: image file is truncated (cat.jpg)``.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from storage.filenames import display_path, source_file

VERSION = "2"

# Formats OpenCV decodes itself on the fast grey path; anything else (GIF, CMYK, 16-bit, alpha...) goes through PIL.
_CV2_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF"}
_CV2_MODES = {"L", "RGB"}
# Reduced JPEG decoding (DCT scaling) factors OpenCV offers, largest first.
_REDUCED_GREY = (
    (8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
    (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
)
# OpenCV's colour decode of a JPEG at 1/factor (DCT scaling), by factor (1: full size).
REDUCED_COLOR = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}
# Transparent pixels are shown over white, as an image viewer on a white page does.
_BACKGROUND = (255, 255, 255)


class ImageLoadError(ValueError):
    """An image cannot be read, decoded or validated; the message is one line naming the file."""


# ---- EXIF orientation: the one definition every loader uses ------------------------------------------------------

ORIENTATION_TAG = 0x0112
# EXIF orientation -> the PIL transpose that turns the stored pixels into the displayed image (as exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# The same transposes on (H, W) or (H, W, C) arrays (e.g. an OpenCV decode told to ignore the orientation).
_TRANSPOSE_ARRAY = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}
# EXIF orientations whose display is the stored image turned by 90 degrees (width and height swap).
_QUARTER_TURNS = (5, 6, 7, 8)


@lru_cache(maxsize=None)
def _decoder_orients(fmt: str | None) -> bool:
    """Return whether PIL's decoder of ``fmt`` already returns displayed pixels (and reports the displayed size at
    open), as Pillow >= 11 does for TIFF; probed once per format on a 2x1 image with orientation 6."""
    if fmt not in ("TIFF",):  # the only format Pillow orients itself; others keep the stored pixels
        return False
    buffer = io.BytesIO()
    try:
        Image.new("L", (2, 1)).save(buffer, fmt, tiffinfo={ORIENTATION_TAG: 6})
        with Image.open(io.BytesIO(buffer.getvalue())) as probe:
            return probe.size == (1, 2)
    except Exception:  # noqa: BLE001 - a Pillow that cannot write the probe orients nothing itself
        return False


class Orientation(NamedTuple):
    """How the pixels of an image file become the displayed image (EXIF orientation, as viewers show it)."""

    code: int  # the file's EXIF orientation, 1-8 (1: displayed as stored; anything else in the tag counts as 1)
    stored_size: tuple[int, int]  # (width, height) of the pixels as stored in the file
    size: tuple[int, int]  # (width, height) as displayed: stored_size swapped for orientations 5-8
    decoded_oriented: bool  # PIL's decoder returns the displayed pixels itself (TIFF): nothing left to apply

    @property
    def pending(self) -> int:
        """The orientation still to apply to the pixels PIL decodes (1: none)."""
        return 1 if self.decoded_oriented else self.code


def image_orientation(image: Image.Image) -> Orientation:
    """Return the orientation of an opened PIL image; call before ``load()`` (Pillow drops a TIFF's tag on load)."""
    code = image.getexif().get(ORIENTATION_TAG, 1)
    code = code if isinstance(code, int) and code in _TRANSPOSE else 1
    decoded_oriented = code != 1 and _decoder_orients(image.format)
    width, height = image.size
    turned = (height, width) if code in _QUARTER_TURNS else (width, height)
    if decoded_oriented:  # PIL reports the displayed size already
        return Orientation(code, turned, (width, height), True)
    return Orientation(code, (width, height), turned, False)


def orient_image(image: Image.Image, orientation: Orientation) -> Image.Image:
    """Return the decoded (loaded) PIL image turned into the displayed image (the image itself when nothing to do)."""
    method = _TRANSPOSE.get(orientation.pending)
    return image if method is None else image.transpose(method)


def orient_array(pixels: np.ndarray, code: int) -> np.ndarray:
    """Return stored pixels ``(H, W)`` or ``(H, W, C)`` as displayed for EXIF orientation ``code`` (contiguous)."""
    transpose = _TRANSPOSE_ARRAY.get(code)
    return pixels if transpose is None else np.ascontiguousarray(transpose(pixels))


def displayed_box(box: tuple[int, int, int, int], orientation: Orientation) -> tuple[int, int, int, int]:
    """Return a box ``(x1, y1, x2, y2)`` (pixel corners, x2/y2 exclusive) of the displayed image as a box of the
    pixels PIL decodes (the stored pixels, or the displayed ones when the decoder orients them itself)."""
    w, h = orientation.size if orientation.decoded_oriented else orientation.stored_size
    inverse = {
        2: lambda u, v: (w - u, v),  # FLIP_LEFT_RIGHT
        3: lambda u, v: (w - u, h - v),  # ROTATE_180
        4: lambda u, v: (u, h - v),  # FLIP_TOP_BOTTOM
        5: lambda u, v: (v, u),  # TRANSPOSE
        6: lambda u, v: (v, h - u),  # ROTATE_270 (clockwise): stored (x, y) -> displayed (h - y, x)
        7: lambda u, v: (w - v, h - u),  # TRANSVERSE
        8: lambda u, v: (w - v, u),  # ROTATE_90: stored (x, y) -> displayed (y, w - x)
    }.get(orientation.pending)
    if inverse is None:
        return box
    x1, y1, x2, y2 = box
    (a, b), (c, d) = inverse(x1, y1), inverse(x2, y2)
    return min(a, c), min(b, d), max(a, c), max(b, d)


def _fail(what: str, cause: object, name: str) -> ImageLoadError:
    text = " ".join(str(cause).split()) or type(cause).__name__
    return ImageLoadError(f"{what}: {text} ({name})")


def read_source(path: str | os.PathLike) -> tuple[Path, bytes]:
    """Return the source file ``path`` names (``source_file``) and its bytes; raises ``ImageLoadError`` (one line
    naming the file) when it cannot be read."""
    path = source_file(path)
    name = display_path(path.name)
    try:
        return path, path.read_bytes()
    except OSError as exc:
        raise _read_error(exc, name) from None


def _read_error(exc: OSError, name: str) -> ImageLoadError:
    """Return the one-line error of a file that cannot be read (missing, not readable, a folder, an I/O error)."""
    for kind, why in ((FileNotFoundError, "file not found"), (PermissionError, "permission denied"),
                      (IsADirectoryError, "is a directory")):
        if isinstance(exc, kind):
            return ImageLoadError(f"cannot read image: {why} ({name})")
    return _fail("cannot read image", exc.strerror or exc, name)


def _open_checked(path: str | os.PathLike, data: bytes | None, max_pixels: int) -> tuple[Image.Image, str]:
    """Return a lazily opened PIL image (header parsed, pixels not decoded) after the size checks, and its name."""
    path = source_file(path)
    name = display_path(path.name)
    if data is not None and len(data) == 0:
        raise ImageLoadError(f"cannot decode image: empty file ({name})")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        # The caller allows larger images than PIL's own guard would open: lift PIL's guard to ours.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        if data is None and os.path.getsize(path) == 0:
            raise ImageLoadError(f"cannot decode image: empty file ({name})")
        with no_bomb_warnings():  # our own max_pixels check below decides; PIL still refuses > 2x its limit at open
            image = Image.open(io.BytesIO(data) if data is not None else path)
    except ImageLoadError:
        raise
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise _read_error(exc, name) from None
    except Image.DecompressionBombError as exc:
        # PIL refuses > 2x its own limit while parsing the header, before we see the size.
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        count = pixels.group(1) if pixels else "too many"
        raise ImageLoadError(f"image too large: {count} pixels exceeds max_pixels={max_pixels} ({name})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"cannot decode image: not a recognised image format ({name})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise _fail("cannot decode image", exc, name) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"cannot decode image: invalid size {width}x{height} ({name})")
    if width * height > max_pixels:
        image.close()
        raise ImageLoadError(
            f"image too large: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} ({name})"
        )
    return image, name


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Return a single-channel integer/float image scaled to uint8: 16-bit by /257, floats in [0, 1] by *255."""
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if np.issubdtype(array.dtype, np.floating):
        if low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        else:  # arbitrary float data (depth maps, HDR): stretch its range
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    elif low >= 0 and high <= 255 and array.dtype != np.uint16:
        scaled = values
    elif low >= 0 and high <= 65535:
        scaled = values / 257.0  # 65535 -> 255 exactly
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.nan_to_num(np.rint(scaled)), 0, 255).astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Return any PIL mode as an (H, W, 3) uint8 RGB array (alpha composited over white)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = _to_uint8(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def load_rgb(
    path: str | os.PathLike, *, max_pixels: int, data: bytes | None = None, validated: bool = False
) -> np.ndarray:
    """Return the image at ``path`` (or its already-read bytes ``data``) as (H, W, 3) uint8 RGB, EXIF-oriented.

    Animated images give their first frame. Raises ``ImageLoadError`` (one line naming the file) on any problem.
    ``validated``: the file passed ``validate_image`` (ingest): a complete 8-bit JPEG is then decoded by OpenCV, to
    the same pixels, faster. Not for unchecked files: PIL refuses some corrupt streams that libjpeg, as OpenCV runs
    it, decodes with a warning (``validate_image`` refuses them too).
    """
    if data is None:
        path, data = read_source(path)
    image, name = _open_checked(path, data, max_pixels)
    try:
        with image:
            image.seek(0)
            orientation = image_orientation(image)
            rgb = _opencv_rgb(image, orientation, data) if validated else None
            if rgb is None:
                image.load()  # full decode now, so truncation surfaces here and not in a later stage
                rgb = _pil_to_rgb(orient_image(image, orientation))
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise _fail("cannot decode image", exc, name) from None
    except MemoryError:
        raise ImageLoadError(f"cannot decode image: out of memory ({name})") from None
    return np.ascontiguousarray(rgb)


# OpenCV >= 4.10 decodes straight to RGB; older ones give BGR, turned here.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def _opencv_rgb(image: Image.Image, orientation: Orientation, data: bytes, *, factor: int = 1,
                oriented: bool = True) -> np.ndarray | None:
    """Return the RGB pixels of a complete 8-bit grey or colour JPEG decoded by OpenCV at 1/``factor`` (1, 2, 4 or 8:
    libjpeg's DCT scaling, as PIL's ``draft``), displayed (``oriented``) or as stored; or None where PIL must decode
    (other formats and modes, a stream without its end marker, anything OpenCV returns at another size).

    Both libraries decode with libjpeg-turbo's defaults, so the pixels are PIL's (tests compare them over
    subsamplings, progressive and restart-marker streams, grey, every EXIF orientation and every factor); OpenCV's
    decode returns a writable array, where PIL's costs two more copies of the image (~0.5 ms at 640x480, a third of
    the decode).
    """
    if image.format != "JPEG" or image.mode not in _CV2_MODES or not _jpeg_complete(data):
        return None
    flag = REDUCED_COLOR[factor]
    if _IMREAD_RGB is not None:
        flag = flag & ~cv2.IMREAD_COLOR | _IMREAD_RGB
    pixels = _opencv_decode(data, flag, orientation, factor=factor, channels=3, oriented=oriented)
    if pixels is not None and _IMREAD_RGB is None:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    return pixels


def _opencv_decode(data: bytes, flag: int, orientation: Orientation, *, factor: int = 1,
                   channels: int | None = None, oriented: bool = True) -> np.ndarray | None:
    """Return OpenCV's decode of ``data`` with ``flag`` (the orientation ignored: ours is applied, as for every
    loader), turned as displayed (``oriented``) or as stored; or None when it is not 8-bit at the stored size reduced
    by ``factor`` with ``channels`` (None: one, no channel axis), so that PIL decides."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    stored_w, stored_h = orientation.stored_size
    shape = (-(-stored_h // factor), -(-stored_w // factor)) + ((channels,) if channels else ())
    if pixels is None or pixels.dtype != np.uint8 or pixels.shape != shape:
        return None
    return orient_array(pixels, orientation.code) if oriented else pixels


class ImageInfo(NamedTuple):
    """What ingest records of a valid image: its displayed (EXIF-oriented) size and its number of frames."""

    width: int
    height: int
    frames: int


def validate_image(path: str | os.PathLike, *, max_pixels: int, data: bytes) -> ImageInfo:
    """Return the oriented size and frame count of encoded image bytes after decoding all their pixel data.

    Accepts and rejects exactly what ``load_rgb`` does, with the same messages, without building the RGB array:
    a JPEG is decoded at 1/8 scale (libjpeg still reads the whole entropy-coded stream, so truncated or corrupt
    data fails as in a full decode), other formats go through ``load_rgb``. Raises ``ImageLoadError``.
    """
    image, name = _open_checked(path, data, max_pixels)
    if image.format != "JPEG":  # PNG, GIF, WebP, TIFF, MPO...: no reduced decode; frame_count opens them again
        image.close()
        height, width = load_rgb(path, max_pixels=max_pixels, data=data).shape[:2]
        return ImageInfo(int(width), int(height), frame_count(data))
    try:
        with image:
            width, height = image.size
            # load_rgb's steps on a draft: seek(0), orientation, decode (no RGB array: JPEG modes all convert).
            image.seek(0)
            orientation = image_orientation(image)
            image.draft("L" if image.mode == "RGB" else image.mode, ((width + 7) // 8, (height + 7) // 8))
            image.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise _fail("cannot decode image", exc, name) from None
    except MemoryError:
        raise ImageLoadError(f"cannot decode image: out of memory ({name})") from None
    width, height = orientation.size
    return ImageInfo(width, height, 1)  # a JPEG (not MPO) has one frame


@contextmanager
def no_bomb_warnings():
    """Silence PIL's DecompressionBombWarning (opening, or cropping, more pixels than PIL's own guard): the config's
    ``max_pixels`` check is the one that decides, and the warning would only reach the user's terminal as noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def frame_count(data: bytes) -> int:
    """Return the number of frames of encoded image bytes (1 for still images; header-level, no full decode)."""
    with no_bomb_warnings(), Image.open(io.BytesIO(data)) as image:
        return int(getattr(image, "n_frames", 1) or 1)


def thumbnail_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """Return the (width, height) PIL's ``thumbnail((long_side, long_side))`` gives: aspect kept, never upscaled."""
    if width <= long_side and height <= long_side:
        return width, height
    aspect = width / height
    # Same rounding as PIL: of floor/ceil, take the one whose aspect ratio is closer to the original.
    if aspect <= 1:  # portrait or square: the height hits the box
        candidates = (math.floor(long_side * aspect), math.ceil(long_side * aspect))
        new_w = max(min(candidates, key=lambda n: abs(aspect - n / long_side)), 1)
        return new_w, long_side
    candidates = (math.floor(long_side / aspect), math.ceil(long_side / aspect))
    new_h = max(min(candidates, key=lambda n: 0 if n == 0 else abs(aspect - long_side / n)), 1)
    return long_side, new_h


def _bicubic(t: float, a: float = -0.5) -> float:
    # PIL's bicubic filter (a = -0.5; OpenCV's INTER_CUBIC uses -0.75).
    t = abs(t)
    if t < 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return (((t - 5) * t + 8) * t - 4) * a
    return 0.0


@lru_cache(maxsize=64)
def _antialias_kernel(scale: float) -> np.ndarray:
    """Return the (n, 1) float32 low-pass kernel of a ``scale``x bicubic downsizing: PIL's filter widened by it."""
    if scale <= 1.0:
        return np.ones((1, 1), np.float32)
    radius = math.ceil(2 * scale) - 1  # the filter is 0 from |t| = 2 * scale on: no taps there
    weights = np.array([_bicubic(t / scale) for t in range(-radius, radius + 1)], np.float64)
    return (weights / weights.sum()).astype(np.float32).reshape(-1, 1)


def resize_like_pil(grey: np.ndarray, width: int, height: int) -> np.ndarray:
    """Return a (height, width) uint8 downsizing of a grey image that approximates PIL's antialiased bicubic.

    As PIL's ``thumbnail`` (reducing_gap=2): a box reduction by floor(scale / 2) per axis first when that is > 1,
    then the bicubic filter widened by the remaining scale, applied at the source resolution and followed by
    OpenCV's cubic interpolation. Its Canny maps are within ~1.5% IoU of PIL's (``INTER_AREA`` alone: ~3.5%, and
    4x slower at non-integer factors).
    """
    h, w = grey.shape
    factor_x, factor_y = max(int(w / width / 2), 1), max(int(h / height / 2), 1)
    if factor_x > 1 or factor_y > 1:
        grey = cv2.resize(
            grey, (max(round(w / factor_x), width), max(round(h / factor_y), height)), interpolation=cv2.INTER_AREA
        )
        h, w = grey.shape
    scale_x, scale_y = w / width, h / height
    if min(scale_x, scale_y) < 1.0:  # not a downsizing (never from thumbnail sizes)
        return cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)
    # Keys rounded so that a few sizes share one cached kernel; the kernel changes negligibly below 1e-3.
    kernel_x, kernel_y = _antialias_kernel(round(scale_x, 3)), _antialias_kernel(round(scale_y, 3))
    if kernel_x.size > 1 or kernel_y.size > 1:
        grey = cv2.sepFilter2D(grey, -1, kernel_x, kernel_y, borderType=cv2.BORDER_REFLECT_101)
    return cv2.resize(grey, (width, height), interpolation=cv2.INTER_CUBIC)


def _jpeg_complete(data: bytes) -> bool:
    # libjpeg pads a truncated stream with grey and only warns, so a missing end-of-image marker sends the file to
    # PIL, which raises on truncation (files with trailing bytes after the marker are rare and still decode there).
    return data.rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9")


def load_grey_resized(
    path: str | os.PathLike,
    *,
    long_side: int,
    max_pixels: int = 178_956_970,
    data: bytes | None = None,
    validated: bool = False,
) -> np.ndarray:
    """Return the image as (h, w) uint8 grey whose size equals PIL ``thumbnail((long_side, long_side))``'s.

    ``validated`` (the file passed ``validate_image``, as every source ingest passes on): OpenCV decodes (reduced-size
    DCT decoding for large JPEGs, EXIF orientation applied); formats or modes OpenCV does not handle the same way go
    through ``load_rgb``. Unvalidated files always go through ``load_rgb``, which refuses corrupt JPEG streams that
    libjpeg, as OpenCV runs it, decodes with a warning. Either way the grey image is downsized with
    ``resize_like_pil`` (from the full-size decode without ``validated``: slower on large JPEGs, near-equal pixels).
    """
    if data is None:
        path, data = read_source(path)
    image, name = _open_checked(path, data, max_pixels)
    try:
        with image:
            fmt, mode = image.format, image.mode
            animated = getattr(image, "n_frames", 1) > 1
            orientation = image_orientation(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise _fail("cannot decode image", exc, name) from None
    width, height = orientation.size
    target_w, target_h = thumbnail_size(width, height, long_side)

    grey = None
    # OpenCV's TIFF decoder orients by the tag even when told to ignore it (and not on a reduced decode): an
    # oriented TIFF goes through PIL.
    cv2_orients_unreliably = fmt == "TIFF" and orientation.code != 1
    if (validated and fmt in _CV2_FORMATS and mode in _CV2_MODES and not animated and not cv2_orients_unreliably
            and (fmt != "JPEG" or _jpeg_complete(data))):
        flag, factor = cv2.IMREAD_GRAYSCALE, 1
        if fmt == "JPEG":
            # PIL's thumbnail drafts the JPEG at the largest 1/a scale that keeps both sides >= 2x the box
            # (reducing_gap=2); the same rule keeps our edges equal to a PIL-thumbnail baseline's.
            scale = min(width // (2 * long_side), height // (2 * long_side))
            factor, flag = next(((f, reduced) for f, reduced in _REDUCED_GREY if scale >= f), (1, flag))
        grey = _opencv_decode(data, flag, orientation, factor=factor)  # None: PIL decides
    if grey is None:
        grey = cv2.cvtColor(load_rgb(path, max_pixels=max_pixels, data=data), cv2.COLOR_RGB2GRAY)
    if grey.shape != (target_h, target_w):
        grey = resize_like_pil(grey, target_w, target_h)
    return grey

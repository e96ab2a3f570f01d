"""pipelines.steps.images: every mode to RGB, EXIF orientation, size guard, clear errors; the fast grey path's sizes."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.steps.images import (ImageInfo, ImageLoadError, load_grey_resized, load_rgb, thumbnail_size,
                                    validate_image)
from tests.pipelines.conftest import png_header_only, save_rgb

MAX = 10_000_000


def test_rgb_png_roundtrip_exact(tmp_path, rng):
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    out = load_rgb(save_rgb(tmp_path / "a.png", rgb), max_pixels=MAX)
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, rgb)


def test_grey_and_palette_modes(tmp_path):
    grey = np.array([[0, 100], [200, 255]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "l.png", max_pixels=MAX), np.repeat(grey[:, :, None], 3, 2))

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "p.png", max_pixels=MAX), [[[10, 20, 30], [200, 100, 50]]])


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png", max_pixels=MAX).astype(int)
    # Fully transparent -> white; opaque -> itself; half blue over white -> (127, 127, 255) by a*c + (1-a)*255.
    expected_half = [round(255 * (1 - 128 / 255)), round(255 * (1 - 128 / 255)), 255]
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert np.abs(out[0, 2] - expected_half).max() <= 1

    la = np.array([[[0, 0], [0, 255]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png", max_pixels=MAX)[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    out = load_rgb(tmp_path / "c.jpg", max_pixels=MAX).astype(int)
    assert np.abs(out - [255, 0, 0]).max() <= 3  # cyan/magenta/yellow/black 0/100/100/0 % is red


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = load_rgb(tmp_path / "deep.png", max_pixels=MAX)
    assert out[0, :, 0].tolist() == [0, 100, 255] and (out[..., 0] == out[..., 2]).all()


def test_float_and_int32_tiff(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(tmp_path / "f.tif")
    assert load_rgb(tmp_path / "f.tif", max_pixels=MAX)[0, :, 1].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0, 1000, 65535]], np.int32), "I").save(tmp_path / "i.tif")
    assert load_rgb(tmp_path / "i.tif", max_pixels=MAX)[0, :, 1].tolist() == [0, round(1000 / 257), 255]


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    out = load_rgb(tmp_path / "anim.gif", max_pixels=MAX)
    assert out.shape == (4, 4, 3) and out[0, 0].tolist() == [255, 0, 0]


def _oriented_jpeg(path, orientation=6):
    # 20 wide, 10 high, white block top-left; EXIF 6 means "rotate 90 degrees clockwise to display".
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[:5, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, exif=exif, quality=100)
    return path


def test_exif_orientation_applied(tmp_path):
    out = load_rgb(_oriented_jpeg(tmp_path / "rot.jpg"), max_pixels=MAX)
    assert out.shape == (20, 10, 3)
    # After a clockwise turn the top-left block sits top-right.
    assert out[:5, -5:].mean() > 200 and out[:5, :5].mean() < 50


def test_decompression_bomb_header_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(60000, 60000))
    tracemalloc.start()
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path, max_pixels=MAX)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Refused before decoding: the peak memory shows it (a wall-time bound would fail by chance on a loaded machine).
    assert peak < 50_000_000  # 60000^2 RGB would be 10.8 GB
    message = str(info.value)
    assert message.startswith("image too large: 3600000000 pixels exceeds max_pixels=10000000") and "\n" not in message
    assert message.endswith("(bomb.png)")
    # Below PIL's own guard, our max_pixels decides, and the message names the size.
    path.write_bytes(png_header_only(4000, 3000))
    with pytest.raises(ImageLoadError, match=r"too large: 4000x3000 = 12000000 pixels exceeds max_pixels=10000000"):
        load_rgb(path, max_pixels=MAX)


@pytest.mark.parametrize(
    "name, payload, cause",
    [
        ("empty.jpg", b"", "empty file"),
        ("notes.png", b"just some text, not an image\n", "not a recognised image format"),
    ],
)
def test_bad_bytes_give_one_line_errors(tmp_path, name, payload, cause):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(ImageLoadError, match=f"{cause}.*{name}"):
        load_rgb(tmp_path / name, max_pixels=MAX)


def test_truncated_jpeg(tmp_path, rng):
    path = save_rgb(tmp_path / "cat.jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path, max_pixels=MAX)
    assert str(info.value).startswith("cannot decode image:") and "truncated" in str(info.value)
    assert str(info.value).endswith("(cat.jpg)")
    with pytest.raises(ImageLoadError, match="truncated"):
        load_grey_resized(path, long_side=32, validated=True)  # libjpeg would pad silently; the fast path must not
    with pytest.raises(ImageLoadError, match="truncated"):
        load_grey_resized(path, long_side=32)


def _pil_displayed_rgb(path) -> np.ndarray:
    """PIL's own decode of ``path``, EXIF-oriented (``ImageOps.exif_transpose``), as RGB: the reference."""
    from PIL import ImageOps

    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _photo_like(height: int, width: int, seed: int = 5) -> np.ndarray:
    """Smooth gradients with noise and hard edges: every JPEG block type, and chroma that subsampling changes."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], axis=2)
    rgb = rgb + rng.integers(-20, 21, (height, width, 3))
    rgb[height // 3:height // 2, width // 4:width // 2] = (250, 10, 40)
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("variant", ["444", "422", "420", "progressive", "restart", "grey", "odd-size", "rotated",
                                     "transposed", "opencv-written"])
def test_jpeg_pixels_equal_pils_decode(tmp_path, variant, monkeypatch):
    # load_rgb decodes complete 8-bit JPEGs with OpenCV: the pixels must be PIL's, exactly, for every kind of stream.
    import pipelines.steps.images as images

    height, width = (37, 53) if variant == "odd-size" else (96, 128)
    rgb = _photo_like(height, width)
    path = tmp_path / f"{variant}.jpg"
    options = {"quality": 85, "subsampling": {"444": 0, "422": 1}.get(variant, 2)}
    if variant == "progressive":
        options["progressive"] = True
    if variant in ("rotated", "transposed"):
        exif = Image.Exif()
        exif[0x0112] = 6 if variant == "rotated" else 5
        options["exif"] = exif
    if variant == "restart" or variant == "opencv-written":
        params = [cv2.IMWRITE_JPEG_QUALITY, 90] + ([cv2.IMWRITE_JPEG_RST_INTERVAL, 2] if variant == "restart" else [])
        assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    elif variant == "grey":
        Image.fromarray(rgb).convert("L").save(path, quality=85)
    else:
        Image.fromarray(rgb).save(path, **options)
    decoded_by = []
    original = images._opencv_rgb
    monkeypatch.setattr(images, "_opencv_rgb", lambda *a: decoded_by.append(original(*a)) or decoded_by[-1])

    loaded = load_rgb(path, max_pixels=MAX, validated=True)
    assert decoded_by and decoded_by[0] is not None  # OpenCV decoded it: the comparison below is of its pixels
    np.testing.assert_array_equal(loaded, _pil_displayed_rgb(path))
    assert loaded.flags.writeable and loaded.flags.c_contiguous
    np.testing.assert_array_equal(load_rgb(path, max_pixels=MAX), loaded)  # unvalidated: PIL, the same pixels
    assert len(decoded_by) == 1


def _corrupted(data: bytes, seed: int) -> bytes:
    """``data`` (a JPEG) with bytes flipped, cut out or inserted inside its entropy-coded data; its end marker kept."""
    rng = np.random.default_rng(seed)
    damaged, n = bytearray(data), len(data)
    at = int(rng.integers(n // 4, n // 2))
    if seed % 3 == 0:
        for position in rng.integers(n // 4, n - 10, 5):
            damaged[position] ^= 0xFF
        return bytes(damaged)
    if seed % 3 == 1:
        return bytes(damaged[:at] + damaged[at + 2000:])
    return bytes(damaged[:at]) + rng.integers(0, 256, 500, dtype=np.uint8).tobytes() + bytes(damaged[at:])


def test_corrupt_jpegs_are_refused_unless_validated_and_validated_ones_decode_as_pil(tmp_path):
    # OpenCV's libjpeg decodes some corrupt streams with only a warning where PIL refuses them: load_rgb and
    # load_grey_resized refuse them as PIL does; validate_image (ingest) refuses the same ones, so a validated file's fast decode is PIL's decode.
    from pathlib import Path

    data = (Path(__file__).resolve().parents[2] / "sample" / "images" / "chelsea.jpg").read_bytes()
    refused = accepted = 0
    for seed in range(30):
        damaged = _corrupted(data, seed)
        try:
            validate_image("damaged.jpg", max_pixels=MAX, data=damaged)
        except ImageLoadError:
            refused += 1
            with pytest.raises(ImageLoadError, match=r"^cannot decode image: .*\(damaged\.jpg\)$"):
                load_rgb("damaged.jpg", max_pixels=MAX, data=damaged)
            with pytest.raises(ImageLoadError, match=r"^cannot decode image: .*\(damaged\.jpg\)$"):
                load_grey_resized("damaged.jpg", long_side=512, data=damaged)
            continue
        accepted += 1
        np.testing.assert_array_equal(load_rgb("damaged.jpg", max_pixels=MAX, data=damaged, validated=True),
                                      load_rgb("damaged.jpg", max_pixels=MAX, data=damaged))
    assert refused >= 5 and accepted >= 5  # both kinds of damage occurred


def test_jpegs_opencv_does_not_decode_as_pil_go_through_pil(tmp_path, rng, monkeypatch):
    # CMYK, a stream without its end marker (libjpeg would pad it with grey) and MPO stay PIL's.
    import pipelines.steps.images as images

    decoded_by = []
    original = images._opencv_rgb
    monkeypatch.setattr(images, "_opencv_rgb", lambda *a: decoded_by.append(original(*a)) or decoded_by[-1])
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(_photo_like(32, 48)).convert("CMYK").save(cmyk, quality=90)
    np.testing.assert_array_equal(load_rgb(cmyk, max_pixels=MAX, validated=True), _pil_displayed_rgb(cmyk))
    trailing = tmp_path / "trailing.jpg"  # bytes after the end marker: PIL decodes it
    trailing.write_bytes(save_rgb(tmp_path / "t.jpg", _photo_like(32, 48), quality=90).read_bytes() + b"junk")
    np.testing.assert_array_equal(load_rgb(trailing, max_pixels=MAX, validated=True), _pil_displayed_rgb(trailing))
    assert decoded_by == [None, None]


def test_png_named_jpg_decodes_by_content(tmp_path, rng):
    rgb = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "liar.jpg", format="PNG")
    np.testing.assert_array_equal(load_rgb(tmp_path / "liar.jpg", max_pixels=MAX), rgb)


def test_bytes_argument_and_missing_file(tmp_path, rng):
    rgb = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    data = save_rgb(tmp_path / "x.png", rgb).read_bytes()
    np.testing.assert_array_equal(load_rgb(tmp_path / "gone.png", max_pixels=MAX, data=data), rgb)
    with pytest.raises(ImageLoadError, match="file not found.*gone.png"):
        load_rgb(tmp_path / "gone.png", max_pixels=MAX)


# ---- validation without a full-size decode (ingest) --------------------------------------------------------------


def _noisy_jpeg_bytes(width: int, height: int, seed: int = 3) -> bytes:
    """Return a JPEG encoded by OpenCV (not PIL, whose decoder is under test) of blurred noise (dense scan data)."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".jpg", cv2.GaussianBlur(noise, (5, 5), 1.0), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def test_validate_image_decodes_a_jpeg_at_one_eighth_scale(tmp_path, monkeypatch):
    from PIL import ImageFile

    data = _noisy_jpeg_bytes(800, 600)
    decoded_sizes = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    assert validate_image(tmp_path / "big.jpg", max_pixels=MAX, data=data) == ImageInfo(800, 600, 1)
    assert decoded_sizes and set(decoded_sizes) == {(100, 75)}  # never the 800x600 pixels


@pytest.mark.parametrize("orientation, displayed", [(1, (20, 10)), (2, (20, 10)), (3, (20, 10)), (4, (20, 10)),
                                                    (5, (10, 20)), (6, (10, 20)), (7, (10, 20)), (8, (10, 20))])
def test_validate_image_gives_the_exif_oriented_size(tmp_path, orientation, displayed):
    path = _oriented_jpeg(tmp_path / "rot.jpg", orientation)  # 20 wide, 10 high as stored
    info = validate_image(path, max_pixels=MAX, data=path.read_bytes())
    assert (info.width, info.height) == displayed
    assert load_rgb(path, max_pixels=MAX).shape[:2] == displayed[::-1]


@pytest.mark.parametrize("mode, suffix, save_args, frames", [
    ("L", ".jpg", {}, 1), ("CMYK", ".jpg", {}, 1), ("RGB", ".png", {}, 1), ("RGBA", ".webp", {}, 1),
    ("I;16", ".png", {}, 1), ("F", ".tif", {}, 1), ("RGB", ".gif", {"save_all": True}, 3),
])
def test_validate_image_other_modes_and_formats(tmp_path, mode, suffix, save_args, frames):
    image = Image.new(mode, (9, 4))
    path = tmp_path / f"x{suffix}"
    extra = [Image.new(mode, (9, 4), (80 * (i + 1), 0, 0)) for i in range(frames - 1)]
    image.save(path, append_images=extra, **save_args) if extra else image.save(path, **save_args)
    assert validate_image(path, max_pixels=MAX, data=path.read_bytes()) == ImageInfo(9, 4, frames)


@pytest.mark.parametrize("cut", ["50%", "90%", "99%", "no end-of-image marker", "one byte short"])
def test_validate_image_rejects_a_truncated_jpeg_as_a_full_decode_does(tmp_path, cut):
    data = _noisy_jpeg_bytes(320, 240)
    assert data.endswith(b"\xff\xd9")
    cut_at = {"50%": len(data) // 2, "90%": len(data) * 9 // 10, "99%": len(data) * 99 // 100,
              "no end-of-image marker": len(data) - 2, "one byte short": len(data) - 1}[cut]
    truncated = data[:cut_at]
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated)
    # The expectation: PIL's own full-size decode of the same bytes, as ingest did it before.
    with pytest.raises(OSError) as full_decode:
        Image.open(path).load()
    expected = f"cannot decode image: {full_decode.value} (cut.jpg)"
    assert "truncated" in expected
    with pytest.raises(ImageLoadError) as reduced:
        validate_image(path, max_pixels=MAX, data=truncated)
    assert str(reduced.value) == expected
    with pytest.raises(ImageLoadError) as loaded:
        load_rgb(path, max_pixels=MAX)
    assert str(loaded.value) == expected


def test_validate_image_keeps_the_header_checks(tmp_path):
    for name, payload, message in [
        ("empty.jpg", b"", "cannot decode image: empty file (empty.jpg)"),
        ("notes.jpg", b"not an image", "cannot decode image: not a recognised image format (notes.jpg)"),
    ]:
        with pytest.raises(ImageLoadError) as info:
            validate_image(tmp_path / name, max_pixels=MAX, data=payload)
        assert str(info.value) == message
    with pytest.raises(ImageLoadError, match=r"^image too large: 800x600 = 480000 pixels exceeds max_pixels=1000 \(b"):
        validate_image(tmp_path / "b.jpg", max_pixels=1000, data=_noisy_jpeg_bytes(800, 600))


# ---- fast grey path ---------------------------------------------------------------------------------------------


def test_thumbnail_size_matches_pil(rng):
    sizes = [(1, 1), (512, 512), (513, 100), (100, 513), (3000, 2), (2, 3000), (640, 480), (1023, 767)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(60)]
    for width, height in sizes:
        image = Image.new("1", (width, height))
        image.thumbnail((512, 512))
        assert thumbnail_size(width, height, 512) == image.size, (width, height)


@pytest.mark.parametrize("validated", [True, False])
@pytest.mark.parametrize(
    "size, suffix", [((2100, 1100), ".jpg"), ((640, 480), ".jpg"), ((300, 200), ".png"), ((5000, 1200), ".jpg")]
)
def test_grey_resized_size_is_pil_thumbnail_size(tmp_path, rng, size, suffix, validated):
    width, height = size
    rgb = cv2.resize(rng.integers(0, 256, (height // 50 + 1, width // 50 + 1, 3), dtype=np.uint8), (width, height))
    path = save_rgb(tmp_path / f"img{suffix}", rgb)
    grey = load_grey_resized(path, long_side=512, validated=validated)
    pil = Image.open(path)
    pil.thumbnail((512, 512))
    assert grey.dtype == np.uint8 and grey.ndim == 2
    assert (grey.shape[1], grey.shape[0]) == pil.size
    # Same picture: the grey levels agree with PIL's thumbnail on these smooth images.
    assert np.abs(grey.astype(int) - np.asarray(pil.convert("L"), int)).mean() < 6


@pytest.mark.parametrize("validated", [True, False])
def test_grey_resized_respects_exif_and_falls_back_for_gif(tmp_path, validated):
    grey = load_grey_resized(_oriented_jpeg(tmp_path / "rot.jpg"), long_side=512, validated=validated)
    assert grey.shape == (20, 10) and grey[:5, -5:].mean() > 200
    Image.new("RGB", (1000, 10), (255, 255, 255)).save(tmp_path / "wide.gif")
    out = load_grey_resized(tmp_path / "wide.gif", long_side=100)
    assert out.shape == (1, 100) and out.min() == 255  # PIL thumbnail's size: 1000x10 -> 100x1


@pytest.mark.parametrize("validated", [True, False])
def test_grey_resized_edges_match_pil_baseline(tmp_path, validated):
    """The structure benchmark's check: Canny on our resize vs PIL thumbnail, IoU >= 0.9 after 1-pixel dilation."""
    rng = np.random.default_rng(3)
    rgb = np.full((1200, 1600, 3), 128, np.uint8)
    for _ in range(20):
        x, y = int(rng.integers(0, 1600)), int(rng.integers(0, 1200))
        cv2.circle(rgb, (x, y), int(rng.integers(20, 250)), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    rgb = cv2.GaussianBlur(rgb, (0, 0), 2.5)
    path = save_rgb(tmp_path / "scene.jpg", rgb, quality=92)
    pil = Image.open(path)
    pil.thumbnail((512, 512))
    baseline = cv2.Canny(np.asarray(pil.convert("L")), 100, 200)
    ours = cv2.Canny(load_grey_resized(path, long_side=512, validated=validated), 100, 200)
    kernel = np.ones((3, 3), np.uint8)
    a, b = cv2.dilate(baseline, kernel) > 0, cv2.dilate(ours, kernel) > 0
    assert a.sum() > 500
    assert (a & b).sum() / (a | b).sum() >= 0.9


def test_antialias_kernel_is_pils_bicubic_widened_by_the_scale():
    from pipelines.steps.images import _antialias_kernel

    # By hand, bicubic (a = -0.5) at t / 1.25 for t = 0, 1, 2: 1, 0.168, -0.048; normalised by their sum 1.24.
    expected = np.array([-0.048, 0.168, 1.0, 0.168, -0.048]) / 1.24
    np.testing.assert_allclose(_antialias_kernel(1.25).ravel(), expected, atol=1e-6)
    assert _antialias_kernel(1.0).ravel().tolist() == [1.0]  # no downsizing: no filter
    wide = _antialias_kernel(3.0).ravel()
    assert wide.size == 11 and abs(wide.sum() - 1) < 1e-6 and np.allclose(wide, wide[::-1])


@pytest.mark.parametrize("size", [(640, 480), (1000, 750), (2600, 1900)])
def test_resize_like_pil_edges_closer_to_pil_than_area(size):
    """PIL's thumbnail (bicubic; box-reduce first past 4x) is the reference; INTER_AREA is the simple alternative."""
    from pipelines.steps.images import resize_like_pil

    width, height = size
    rng = np.random.default_rng(7)
    grey = np.full((height, width), 120, np.uint8)
    for _ in range(40):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        cv2.circle(grey, (x, y), int(rng.integers(5, width // 6)), int(rng.integers(0, 256)), -1)
    grey = cv2.GaussianBlur(grey, (0, 0), 0.8)
    pil = Image.fromarray(grey)
    pil.thumbnail((512, 512))
    reference = cv2.Canny(np.asarray(pil), 100, 200)
    target = pil.size

    def iou(edges: np.ndarray) -> float:
        kernel = np.ones((3, 3), np.uint8)
        a, b = cv2.dilate(reference, kernel) > 0, cv2.dilate(edges, kernel) > 0
        return (a & b).sum() / (a | b).sum()

    ours = resize_like_pil(grey, *target)
    assert ours.shape == (target[1], target[0]) and ours.dtype == np.uint8
    area = cv2.resize(grey, target, interpolation=cv2.INTER_AREA)
    assert iou(cv2.Canny(ours, 100, 200)) >= max(0.95, iou(cv2.Canny(area, 100, 200)) - 0.01)


# ---- EXIF orientation 1-8 in every format that can carry it: one definition for every loader ----------------------

# The displayed pixel (y, x) of a stored (H, W) image, written out from the EXIF specification's orientation table
# (not from any transpose code): 2 mirror, 3 turn 180, 4 flip, 5 transpose, 6 turn 90 clockwise, 7 transverse,
# 8 turn 90 anticlockwise.
_DISPLAYED_FROM_STORED = {
    1: lambda y, x, h, w: (y, x),
    2: lambda y, x, h, w: (y, w - 1 - x),
    3: lambda y, x, h, w: (h - 1 - y, w - 1 - x),
    4: lambda y, x, h, w: (h - 1 - y, x),
    5: lambda y, x, h, w: (x, y),
    6: lambda y, x, h, w: (h - 1 - x, y),
    7: lambda y, x, h, w: (h - 1 - x, w - 1 - y),
    8: lambda y, x, h, w: (x, w - 1 - y),
}


def _displayed(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The image a viewer shows for ``stored`` pixels with EXIF ``orientation``, pixel by pixel."""
    h, w = stored.shape[:2]
    out_h, out_w = (w, h) if orientation >= 5 else (h, w)
    out = np.empty((out_h, out_w) + stored.shape[2:], stored.dtype)
    for y in range(out_h):
        for x in range(out_w):
            out[y, x] = stored[_DISPLAYED_FROM_STORED[orientation](y, x, h, w)]
    return out


def _blocks(height: int = 32, width: int = 48, seed: int = 3) -> np.ndarray:
    """A stored RGB image of 8x8 blocks of distinct colours: no two orientations of it look alike (JPEG-safe)."""
    colours = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(colours, 8, axis=0), 8, axis=1)


def _save_oriented(path, stored: np.ndarray, orientation: int):
    image = Image.fromarray(stored)
    if path.suffix in (".tif", ".tiff"):
        image.save(path, tiffinfo={0x0112: orientation})  # the TIFF tag itself, as cameras and scanners write it
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options = {".jpg": {"quality": 100, "subsampling": 0}, ".webp": {"lossless": True}}.get(path.suffix, {})
        image.save(path, exif=exif, **options)
    return path


_ORIENTED_FORMATS = ("jpg", "png", "webp", "tif")


@pytest.mark.parametrize("suffix", _ORIENTED_FORMATS)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_loader_shows_the_displayed_image(tmp_path, suffix, orientation):
    from pipelines.steps.captions import load_source_crops, load_thumbnail
    from structxlip.data import open_rgb

    stored = _blocks()
    expected = _displayed(stored, orientation).astype(int)
    tolerance = 6 if suffix == "jpg" else 0  # JPEG at quality 100 is near, not exactly, lossless
    path = _save_oriented(tmp_path / f"o{orientation}.{suffix}", stored, orientation)
    displayed_hw = (48, 32) if orientation >= 5 else (32, 48)
    assert expected.shape[:2] == displayed_hw

    rgb = load_rgb(path, max_pixels=MAX)
    assert rgb.shape[:2] == displayed_hw
    assert np.abs(rgb.astype(int) - expected).mean() <= tolerance
    assert validate_image(path, max_pixels=MAX, data=path.read_bytes())[:2] == displayed_hw[::-1]

    grey = load_grey_resized(path, long_side=512, validated=True)  # no resizing at this size: the decode is compared
    expected_grey = cv2.cvtColor(expected.astype(np.uint8), cv2.COLOR_RGB2GRAY).astype(int)
    assert grey.shape == displayed_hw
    assert np.abs(grey.astype(int) - expected_grey).mean() <= tolerance + 1

    # A crop box in displayed pixels is that part of the displayed image (captions' decode-once loader).
    box = (8, 16, 24, 32)  # x1, y1, x2, y2: two 8x8 blocks wide, two high
    pixels = load_source_crops(path, [box], long_side=448)
    assert pixels.full_image.shape[:2] == displayed_hw
    assert np.abs(pixels.crops[0].astype(int) - expected[16:32, 8:24]).mean() <= tolerance
    assert np.abs(load_thumbnail(path, long_side=448).astype(int) - expected).mean() <= tolerance
    assert np.abs(np.asarray(open_rgb(path)).astype(int) - expected).mean() <= tolerance


def test_the_orientation_pattern_tells_every_orientation_apart():
    # The loaders' test above could not fail if two orientations of the pattern looked alike.
    stored = _blocks()
    shown = {o: _displayed(stored, o) for o in range(1, 9)}
    for a in range(1, 9):
        for b in range(a + 1, 9):
            if shown[a].shape == shown[b].shape:
                assert np.abs(shown[a].astype(int) - shown[b].astype(int)).mean() > 20, (a, b)


@pytest.mark.parametrize("suffix", ["bmp", "gif"])
def test_formats_without_orientation_are_shown_as_stored(tmp_path, suffix):
    stored = _blocks()
    path = tmp_path / f"plain.{suffix}"
    Image.fromarray(stored).save(path)
    expected = np.asarray(Image.open(path).convert("RGB"))  # GIF: its palette's colours
    np.testing.assert_array_equal(load_rgb(path, max_pixels=MAX), expected)
    assert load_grey_resized(path, long_side=512).shape == (32, 48)

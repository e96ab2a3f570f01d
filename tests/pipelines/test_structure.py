"""pipelines.steps.structure: hand-checkable maps, the stage's files and records, pool == serial, OpenCV ~ kornia."""

from __future__ import annotations

import errno
import math
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.steps.structure import (
    KorniaExtractor,
    StructureParams,
    canny_map,
    compute_maps,
    extract_structure,
    log_map,
    scribble_map,
    sobel_map,
    torch_maps,
)
from pipelines.steps.images import load_grey_resized
from storage.layout import OutputLayout
from tests.pipelines.conftest import save_rgb


def square_image(size=80, x1=20, x2=60) -> np.ndarray:
    grey = np.zeros((size, size), np.uint8)
    grey[x1:x2, x1:x2] = 255
    return grey


def border_ring(size=80, x1=20, x2=60) -> np.ndarray:
    ring = np.zeros((size, size), bool)
    ring[x1:x2, x1:x2] = True
    ring[x1 + 1 : x2 - 1, x1 + 1 : x2 - 1] = False
    return ring


def within(mask: np.ndarray, target: np.ndarray, radius: int) -> bool:
    """Every pixel of ``mask`` lies within ``radius`` (chessboard) of a pixel of ``target``."""
    grown = cv2.dilate(target.astype(np.uint8), np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)) > 0
    return bool((mask & ~grown).sum() == 0)


@pytest.mark.parametrize("edge_map", [canny_map, lambda g: log_map(g, 1.5)], ids=["canny", "log"])
def test_white_square_edges_lie_on_its_border(edge_map):
    edges = edge_map(square_image()) > 0
    ring = border_ring()
    assert edges.dtype == bool and edges.any()
    assert within(edges, ring, 1)  # no edge away from the border
    assert within(ring, edges, 1)  # and the whole border is traced


def test_sobel_of_square_peaks_on_border_and_is_zero_inside():
    sobel = sobel_map(square_image())
    assert sobel.dtype == np.uint8 and sobel.max() == 255
    assert (sobel[25:55, 25:55] == 0).all() and (sobel[:15, :] == 0).all()
    assert within(sobel > 0, border_ring(), 1)
    assert sobel_map(np.full((5, 5), 9, np.uint8)).max() == 0  # a flat image has no gradient


def _kept_distances(final_sigma: float) -> int:
    """Half-width of a blurred 255 line that stays above the 4/255 level, from the 1-D Gaussian (independent)."""
    radius = math.ceil(4 * final_sigma)
    weights = [math.exp(-(d * d) / (2 * final_sigma**2)) for d in range(-radius, radius + 1)]
    total = sum(weights)
    return max(abs(d) for d, w in zip(range(-radius, radius + 1), weights) if 255 * w / total > 4)


def test_scribble_of_a_line_is_a_thick_line_and_drops_isolated_dots():
    edges = np.zeros((60, 80), np.uint8)
    edges[30, 10:70] = 255
    dots = [(8, 5), (50, 75), (10, 40)]
    for y, x in dots:
        edges[y, x] = 255
    # A dot blurred by sigma 3 peaks at 1/(sqrt(2 pi) * 3) ~ 0.133 of a long line's peak: a threshold of 0.3 drops it.
    assert 1 / (math.sqrt(2 * math.pi) * 3) < 0.3
    scribble = scribble_map(edges, sigma=3.0, threshold=0.3, final_sigma=1.0)
    assert scribble.dtype == np.uint8 and set(np.unique(scribble)) == {0, 255}
    half = _kept_distances(1.0)
    assert half == 2
    middle = scribble[:, 20:60] > 0
    assert middle[30 - half : 30 + half + 1].all()  # full thickness along the line's middle
    assert not middle[: 30 - half].any() and not middle[30 + half + 1 :].any()
    for y, x in dots:
        assert scribble[max(0, y - 3) : y + 4, max(0, x - 3) : x + 4].max() == 0
    # With a low threshold the same dots survive: it is the threshold that removes them.
    assert scribble_map(edges, sigma=3.0, threshold=0.05, final_sigma=1.0)[8, 5] == 255


def test_scribble_of_empty_map_is_empty():
    assert scribble_map(np.zeros((10, 12), np.uint8)).max() == 0


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32)])
def test_map_functions_reject_non_grey(bad):
    with pytest.raises(ValueError, match=r"expected a grey image as a uint8 \(H, W\) array"):
        canny_map(bad)


# ---- the stage ---------------------------------------------------------------------------------------------------


def _scene(seed: int, width: int = 160, height: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.zeros((height, width, 3), np.uint8)
    for _ in range(4):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        colour = tuple(int(c) for c in rng.integers(60, 256, 3))
        if rng.random() < 0.5:
            cv2.circle(rgb, (x, y), int(rng.integers(8, 40)), colour, -1)
        else:
            cv2.rectangle(rgb, (x, y), (x + int(rng.integers(10, 60)), y + int(rng.integers(10, 50))), colour, -1)
    cv2.line(rgb, (0, int(rng.integers(0, height))), (width - 1, int(rng.integers(0, height))), (255, 255, 255), 2)
    return rgb


@pytest.fixture
def records(tmp_path):
    rows = []
    for i in range(3):
        path = save_rgb(tmp_path / "in" / f"img{i}.png", _scene(i, width=700 if i == 0 else 160))
        rows.append({"image_id": f"{i:02d}" + "ab" * 15, "source_path": str(path)})
    return rows


def test_extract_structure_writes_grey_pngs_of_thumbnail_size(tmp_path, records):
    layout = OutputLayout(tmp_path / "out")
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not a png")
    rows = records + [
        {"image_id": "ff" * 16, "source_path": str(broken)},
        {"image_id": "ee" * 16, "source_path": str(broken), "status": "failed", "error": "cannot decode"},
    ]
    out = extract_structure(rows, layout=layout, stage_key="k1", backend="opencv", extra_maps=["sobel"])
    assert [r["image_id"] for r in out] == [r["image_id"] for r in rows]
    for record, result in zip(records, out[:3]):
        assert result["status"] == "ok" and result["error"] is None and result["log_path"] is None
        expected = Image.open(record["source_path"])
        expected.thumbnail((512, 512))
        for key, kind in {"structure_path": "canny", "scribble_path": "scribble", "sobel_path": "sobel"}.items():
            assert result[key] == f"maps/k1/{record['image_id'][:2]}/{record['image_id']}.{kind}.png"
            png = Image.open(layout.resolve(result[key]))
            assert png.mode == "L" and png.size == expected.size
    assert out[3]["status"] == "failed" and "broken.png" in out[3]["error"] and out[3]["structure_path"] is None
    assert out[4]["status"] == "failed" and out[4]["error"].startswith("skipped")
    # The Canny PNG is exactly cv2.Canny of the resized grey image.
    grey = load_grey_resized(records[0]["source_path"], long_side=512, validated=True)
    written = cv2.imread(str(layout.resolve(out[0]["structure_path"])), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(written, cv2.Canny(grey, 100, 200))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failing_disk_fails_the_chunk_instead_of_recording_bad_images(tmp_path, records, monkeypatch, code):
    # A bad image is a cached per-item failure; a full disk must raise, so nothing is cached and a re-run retries.
    def no_space(path, data, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr("pipelines.steps.structure.atomic_write_bytes", no_space)
    with pytest.raises(OSError) as info:
        extract_structure(records, layout=OutputLayout(tmp_path / "out"), stage_key="k", backend="opencv")
    assert info.value.errno == code


def test_bad_arguments_are_one_line_errors(tmp_path, records):
    layout = OutputLayout(tmp_path / "out")
    with pytest.raises(ValueError, match="unknown extra structure maps"):
        extract_structure(records, layout=layout, stage_key="k", extra_maps=["hed"])
    with pytest.raises(ValueError, match="unknown structure backend"):
        extract_structure(records, layout=layout, stage_key="k", backend="cuda-magic")


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of a's white pixels that have a white pixel of b within 1 pixel."""
    grown = cv2.dilate(b, np.ones((3, 3), np.uint8)) > 0
    return float(((a > 0) & grown).sum() / max((a > 0).sum(), 1))


def test_opencv_and_kornia_backends_agree(tmp_path):
    params = StructureParams(extra_maps=("log", "sobel"))
    scenes = [cv2.cvtColor(_scene(seed), cv2.COLOR_RGB2GRAY) for seed in range(4)]
    stack = np.stack(scenes)
    torch_result = torch_maps(stack, params)
    for index, grey in enumerate(scenes):
        cv_result = compute_maps(grey, params)
        for kind in ("canny", "scribble", "log"):
            a, b = cv_result[kind], torch_result[kind][index]
            assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
            assert (a > 0).sum() > 50, kind
            assert _agreement(a, b) >= 0.9 and _agreement(b, a) >= 0.9, (kind, index)
        assert np.abs(cv_result["sobel"].astype(int) - torch_result["sobel"][index]).max() <= 1


def test_kornia_backend_through_the_stage(tmp_path, records):
    layout_cv, layout_k = OutputLayout(tmp_path / "cv"), OutputLayout(tmp_path / "k")
    # Two 160x120 images share a batch; the 700-wide one is its own group (512x384).
    cv_out = extract_structure(records, layout=layout_cv, stage_key="k", backend="opencv")
    kornia = KorniaExtractor(device="cpu", batch_size=2)
    k_out = extract_structure(records, layout=layout_k, stage_key="k", backend=kornia)
    assert [r["status"] for r in k_out] == ["ok"] * 3
    for a, b in zip(cv_out, k_out):
        assert a["structure_path"] == b["structure_path"]
        map_cv = cv2.imread(str(layout_cv.resolve(a["structure_path"])), cv2.IMREAD_UNCHANGED)
        map_k = cv2.imread(str(layout_k.resolve(b["structure_path"])), cv2.IMREAD_UNCHANGED)
        assert map_cv.shape == map_k.shape and map_k.ndim == 2
        assert _agreement(map_cv, map_k) >= 0.9 and _agreement(map_k, map_cv) >= 0.9


def _scribble_reference(edges: np.ndarray, sigma: float, threshold: float, final_sigma: float) -> np.ndarray:
    """Slow per-pixel scribble written from the docstring's rule (dense, float64 blur, Python loops)."""
    k = 2 * math.ceil(4 * sigma) + 1
    x = cv2.GaussianBlur(edges.astype(np.float64), (k, k), sigma, borderType=cv2.BORDER_REFLECT_101)
    h, w = x.shape
    padded = np.pad(x, 1)  # constant 0 frame
    pairs = [((0, -1), (0, 1), 1.0), ((-1, 0), (1, 0), 1.0), ((-1, -1), (1, 1), 0.5), ((-1, 1), (1, -1), 0.5)]
    strokes = np.zeros((h, w))
    for y in range(h):
        for x0 in range(w):
            v = padded[y + 1, x0 + 1]
            curvatures, maxima = [], []
            for (ay, ax), (by, bx), scale in pairs:
                n1, n2 = padded[y + 1 + ay, x0 + 1 + ax], padded[y + 1 + by, x0 + 1 + bx]
                curvatures.append((n1 + n2 - 2 * v) * scale)
                maxima.append(v >= n1 and v >= n2)
            across = int(np.argmin(curvatures))
            bend = curvatures[across]
            if maxima[across] and bend < -1e-3 * v and -bend >= max(curvatures) and v > threshold * x.max():
                strokes[y, x0] = 255
    kf = 2 * math.ceil(4 * final_sigma) + 1
    blurred = cv2.GaussianBlur(strokes, (kf, kf), final_sigma, borderType=cv2.BORDER_REFLECT_101)
    return np.where(blurred > 4, 255, 0).astype(np.uint8)


@pytest.mark.parametrize("seed", range(3))
def test_scribble_matches_a_slow_dense_reference(seed):
    edges = canny_map(cv2.cvtColor(_scene(seed, width=64, height=48), cv2.COLOR_RGB2GRAY))
    assert (edges > 0).sum() > 50
    for sigma, threshold in ((3.0, 0.1), (1.5, 0.3)):
        ours = scribble_map(edges, sigma=sigma, threshold=threshold, final_sigma=1.0)
        reference = _scribble_reference(edges, sigma, threshold, 1.0)
        # float32 vs float64 may only flip exact ties: allow a couple of pixels.
        assert (ours != reference).sum() <= 2, (sigma, threshold)
        assert (ours > 0).sum() > 100


def test_binary_maps_are_plain_8_bit_grey_pngs(tmp_path, records):
    layout = OutputLayout(tmp_path / "out")
    out = extract_structure(records[:1], layout=layout, stage_key="k", backend="opencv")
    grey = load_grey_resized(records[0]["source_path"], long_side=512, validated=True)
    maps = compute_maps(grey, StructureParams())
    for key, kind in (("structure_path", "canny"), ("scribble_path", "scribble")):
        path = layout.resolve(out[0][key])
        assert path.read_bytes()[24:26] == bytes([8, 0])  # IHDR: bit depth 8, colour type 0 (grey)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), maps[kind])

"""Captions decode each source once: draft-scale choice, crops cut by bbox (EXIF orientation, tiny boxes, clipping),
one-line errors, crop-file fallback, and grouped CLIP passes equal to one pass."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.steps.captions import (
    CaptionInputError,
    ClipScorer,
    draft_scale,
    load_source_crops,
    score_local_captions,
)
from pipelines.steps.filtering import load_spacy
from pipelines.steps.images import load_rgb, thumbnail_size
from storage.atomic import write_jpeg, write_png
from storage.layout import OutputLayout
from storage.manifest import bbox

MAX_PIXELS = 10**9


def _thumbnailed(array: np.ndarray, long_side: int = 448) -> np.ndarray:
    """The stage's shrink step: OpenCV area averaging to the size PIL's ``thumbnail`` gives."""
    image = Image.fromarray(np.ascontiguousarray(array))
    image.thumbnail((long_side, long_side))  # only for its size
    if image.size == (array.shape[1], array.shape[0]):
        return np.ascontiguousarray(array)
    return cv2.resize(np.ascontiguousarray(array), image.size, interpolation=cv2.INTER_AREA)


def _smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like RGB image (low-frequency waves): reduced decoding changes it little."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fy, fx, phase = rng.uniform(1, 4, 3)
        channels.append(127 + 100 * np.sin(2 * np.pi * (fy * y / height + fx * x / width) + phase))
    return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.uint8)


# ---- draft scale (pure) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "long_sides, expected",
    [
        ([4000, 400], 1),  # a 4000x3000 JPEG with a 400x300 crop: the crop is under 448 px, so full resolution
        ([4000, 1800], 4),  # 1800 / 4 = 450 >= 448; 1800 / 8 = 225 < 448
        ([4000, 1792], 4),  # exactly 4 * 448
        ([4000, 1791], 2),  # one pixel short of 1/4: 1791 / 2 = 895.5
        ([4000], 8),  # the full image alone: 4000 / 8 = 500
        ([3583], 4),  # 3583 / 8 = 447.9 < 448
        ([896, 5000], 2),
        ([895, 5000], 1),
        ([448], 1),
        ([], 1),
    ],
)
def test_draft_scale_hand_computed(long_sides, expected):
    assert draft_scale(long_sides) == expected


def test_draft_scale_keeps_every_item_at_the_resolution_clip_got():
    rng = np.random.default_rng(0)
    for _ in range(500):
        sides = rng.integers(1, 6000, rng.integers(1, 6)).tolist()
        scale = draft_scale(sides)
        assert all(side / scale >= min(side, 448) for side in sides)
        # and no larger reduction would do
        assert scale == 8 or any(side / (2 * scale) < min(side, 448) for side in sides)


# ---- crops cut in memory ------------------------------------------------------------------------------------------
def test_crops_equal_slices_of_the_decoded_image_without_reduction(tmp_path):
    # 4000 x 3000 JPEG with a 400 x 300 crop: no reduction, so every item is the full-resolution slice, thumbnailed.
    path = tmp_path / "big.jpg"
    write_jpeg(path, _smooth(3000, 4000))
    reference = load_rgb(path, max_pixels=MAX_PIXELS)
    boxes = [(100, 200, 500, 500), (1000, 0, 3000, 2500), (3990, 2990, 4000, 3000)]
    got = load_source_crops(path, boxes)
    assert got.scale == 1
    for (x1, y1, x2, y2), crop in zip(boxes, got.crops):
        assert np.array_equal(crop, _thumbnailed(reference[y1:y2, x1:x2]))
    assert np.array_equal(got.full_image, _thumbnailed(reference))
    assert got.crops[0].shape == (300, 400, 3) and got.crops[1].shape == (448, 358, 3)
    assert got.crops[0].flags.writeable


def test_reduced_decoding_keeps_each_crop_s_resolution(tmp_path):
    path = tmp_path / "big.jpg"
    write_jpeg(path, _smooth(3000, 4000, seed=1))
    reference = load_rgb(path, max_pixels=MAX_PIXELS)
    boxes = [(0, 0, 1800, 1200), (2000, 1000, 3900, 2950), (1234, 567, 3100, 1500)]
    got = load_source_crops(path, boxes)
    assert got.scale == 4  # the smallest long side is 1800: 1800 / 4 = 450 >= 448
    for (x1, y1, x2, y2), crop in zip(boxes, got.crops):
        want = _thumbnailed(reference[y1:y2, x1:x2])
        # The long side is exactly what the full-resolution path gave; the short side within a pixel (the reduced
        # box encloses the original one).
        assert max(crop.shape[:2]) == max(want.shape[:2]) == 448
        assert abs(crop.shape[0] - want.shape[0]) <= 1 and abs(crop.shape[1] - want.shape[1]) <= 1
        h, w = min(crop.shape[0], want.shape[0]), min(crop.shape[1], want.shape[1])
        difference = np.abs(crop[:h, :w].astype(int) - want[:h, :w].astype(int))
        assert difference.mean() < 3.0  # a smooth image: reduced decoding changes it little
    full = reference
    assert got.full_image.shape[:2] == thumbnail_size(4000, 3000, 448)[::-1]
    assert np.abs(got.full_image.astype(int) - _thumbnailed(full).astype(int)).mean() < 2.0


def test_full_image_alone_is_decoded_at_the_largest_reduction(tmp_path):
    path = tmp_path / "big.jpg"
    write_jpeg(path, _smooth(3000, 4000, seed=2))
    got = load_source_crops(path, [])
    assert got.scale == 8 and got.full_image.shape == (336, 448, 3) and got.crops == []
    # no full image asked: only the crops count
    assert load_source_crops(path, [(0, 0, 3584, 100)], full_image=False).scale == 8
    assert load_source_crops(path, [(0, 0, 3583, 100)], full_image=False).scale == 4


def test_tiny_boxes_give_at_least_one_pixel(tmp_path):
    # A 1 px wide, 3600 px tall box in a 4000 x 3600 JPEG: decoded at 1/8 (3600 / 8 = 450), the box covers 1/8 of
    # a reduced pixel and still gives one.
    image = np.zeros((3600, 4000, 3), np.uint8)
    image[:, :8] = (250, 10, 10)
    path = tmp_path / "thin.jpg"
    write_jpeg(path, image, quality=95)
    got = load_source_crops(path, [(5, 0, 6, 3600), (7, 0, 9, 3600)], full_image=False)
    assert got.scale == 8
    # Pixel 5 -> reduced pixel 0 (1 x 450); pixels 7..8 -> reduced pixels 0..1 (2 x 450); then to 448 px long.
    assert got.crops[0].shape == (448, 1, 3) and thumbnail_size(1, 450, 448) == (1, 448)
    assert got.crops[1].shape == (448, 2, 3) and thumbnail_size(2, 450, 448) == (2, 448)
    assert abs(int(np.median(got.crops[0][:, 0, 0])) - 250) < 12


def test_boxes_are_clipped_like_a_slice_and_an_empty_one_is_a_one_line_error(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = tmp_path / "small.png"
    write_png(path, image)
    got = load_source_crops(path, [(35, 25, 60, 90), (-5, -5, 3, 4)], full_image=False)
    assert np.array_equal(got.crops[0], image[25:30, 35:40])
    assert np.array_equal(got.crops[1], image[0:4, 0:3])
    with pytest.raises(CaptionInputError) as info:
        load_source_crops(path, [(40, 0, 50, 10)])
    assert str(info.value) == "region box (40, 0, 50, 10) is empty inside the 40x30 image (small.png)"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_oriented_source_gives_the_oriented_image_s_crops(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    image.save(path, exif=exif.tobytes())
    oriented = load_rgb(path, max_pixels=MAX_PIXELS)
    assert oriented.shape[:2] == ((53, 37) if orientation >= 5 else (37, 53))
    boxes = [(3, 5, 20, 11), (0, 0, oriented.shape[1], oriented.shape[0]), (7, 2, 8, 30), (30, 20, 37, 37)]
    got = load_source_crops(path, boxes)
    for (x1, y1, x2, y2), crop in zip(boxes, got.crops):
        assert np.array_equal(crop, oriented[y1:y2, x1:x2])
    assert np.array_equal(got.full_image, oriented)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_oriented_jpeg_decoded_reduced_cuts_the_right_blocks(tmp_path, orientation):
    # Blocks of solid colour, 512 px each: after rotation and 1/2 decoding, each box still lands on its block.
    colours = np.array([[[200, 20, 20], [20, 200, 20]], [[20, 20, 200], [220, 220, 30]]], np.uint8)
    stored = np.repeat(np.repeat(colours, 1024, axis=0), 1024, axis=1)  # 2048 x 2048
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    oriented = load_rgb(path, max_pixels=MAX_PIXELS)
    boxes = [(100, 100, 1000, 1000), (1100, 100, 2000, 1000), (100, 1100, 1000, 2000), (1100, 1100, 2000, 2000)]
    got = load_source_crops(path, boxes)
    assert got.scale == 2  # 900 / 2 = 450 >= 448
    for (x1, y1, x2, y2), crop in zip(boxes, got.crops):
        want = oriented[(y1 + y2) // 2, (x1 + x2) // 2].astype(int)
        assert crop.shape == (448, 448, 3)
        assert np.abs(np.median(crop.reshape(-1, 3), axis=0) - want).max() <= 3


@pytest.mark.parametrize("orientation, variant", [*((o, "rgb") for o in range(1, 9)), (6, "444"), (6, "grey"),
                                                  (8, "progressive")])
def test_a_validated_jpeg_is_decoded_by_opencv_to_the_crops_pil_gives(tmp_path, monkeypatch, orientation, variant):
    """``validated``: OpenCV decodes a complete JPEG, at every draft scale, and the crops and the full image are the
    ones PIL's decode gives (``validated=False``), pixel for pixel."""
    from pipelines.steps import images

    image = Image.fromarray(_smooth(480, 640, seed=orientation))
    image = image.convert("L") if variant == "grey" else image
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    image.save(path, exif=exif.tobytes(), quality=90, subsampling=0 if variant == "444" else -1,
               progressive=variant == "progressive")
    decoded_by = []
    original = images._opencv_rgb
    monkeypatch.setattr(images, "_opencv_rgb", lambda *a, **k: decoded_by.append(original(*a, **k)) or decoded_by[-1])
    # With a 64 px long side: the full image (480 px short side) decodes at 1/8, a 300 px box at 1/4, 150 at 1/2.
    width, height = (480, 640) if orientation >= 5 else (640, 480)
    for boxes, full, scale in [([], True, 8), ([(5, 7, 305, 207)], False, 4), ([(0, 0, 150, 170), (9, 3, 300, 300)],
                               True, 2), ([(width - 100, height - 60, width, height), (1, 2, 3, 4)], True, 1)]:
        got = load_source_crops(path, boxes, full_image=full, long_side=64, validated=True)
        assert decoded_by.pop() is not None and got.scale == scale  # OpenCV decoded it, at the scale PIL drafts
        want = load_source_crops(path, boxes, full_image=full, long_side=64)
        assert not decoded_by and want.scale == scale  # PIL decoded this one
        for mine, theirs in zip([got.full_image, *got.crops], [want.full_image, *want.crops]):
            assert (mine is None) == (theirs is None) and (mine is None or np.array_equal(mine, theirs))
            assert mine is None or (mine.flags.writeable and mine.flags.c_contiguous)


def test_truncated_source_is_a_one_line_error_also_when_reduced(tmp_path):
    path = tmp_path / "cut.jpg"
    write_jpeg(path, _smooth(2000, 2000, seed=3))
    path.write_bytes(path.read_bytes()[:-3000])
    for boxes in ([], [(0, 0, 100, 100)]):  # reduced (1/4) and full resolution
        for validated in (False, True):  # no end marker: PIL decodes it, also for a validated source
            with pytest.raises(CaptionInputError) as info:
                load_source_crops(path, boxes, validated=validated)
            message = str(info.value)
            assert message.startswith("cannot decode image: ") and message.endswith("(cut.jpg)") and "\n" not in message
    with pytest.raises(CaptionInputError, match=r"^cannot read image: file not found \(gone\.jpg\)$"):
        load_source_crops(tmp_path / "gone.jpg", [])


# ---- the stage ----------------------------------------------------------------------------------------------------
class ColourScorer:
    """Embeds an image as its mean colour and a sentence by the colour it names; records the batch sizes."""

    COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "grey": (1, 1, 1)}

    def __init__(self):
        self.image_calls = []

    def embed_images(self, images):
        self.image_calls.append(len(images))
        return np.asarray([image.reshape(-1, 3).mean(axis=0) + 1e-3 for image in images], dtype=np.float32)

    def embed_texts(self, texts):
        return np.asarray([self.COLOURS[t.split()[1].rstrip(".")] for t in texts], dtype=np.float32)


def test_segment_without_bbox_reads_its_crop_file(tmp_path):
    layout = OutputLayout(tmp_path / "out")
    image = np.full((40, 60, 3), 128, np.uint8)
    image[0:10, 0:10] = (255, 0, 0)
    source = tmp_path / "a.png"
    write_png(source, image)
    crop = layout.crop("a" * 32, "rk", 1)
    write_png(crop, np.full((8, 8, 3), (0, 0, 255), np.uint8))  # only the crop file is blue
    record = {
        "image_id": "a" * 32,
        "source_path": str(source),
        "caption": "A red square. A blue square.",
        "segments": [
            {"bbox": bbox(0, 0, 10, 10), "crop_path": None, "structure_crop_path": None},
            {"bbox": None, "crop_path": layout.relative(crop), "structure_crop_path": None},
        ],
    }
    scorer = ColourScorer()
    out = score_local_captions([record], layout=layout, scorer=scorer, nlp=load_spacy("en_core_web_sm"))[0]
    assert out["status"] == "ok" and scorer.image_calls == [3]
    assert {s["caption"]: s["bbox"] for s in out["segments"]} == {
        "A red square.": bbox(0, 0, 10, 10),
        "A blue square.": None,
    }
    for s in out["segments"]:
        assert s["similarity_score"] == pytest.approx(100.0, abs=0.1)


def test_invalid_bbox_fails_its_image_alone(tmp_path):
    source = tmp_path / "a.png"
    write_png(source, np.full((40, 60, 3), 128, np.uint8))
    good = {"image_id": "a" * 32, "source_path": str(source), "caption": "A grey square.",
            "segments": [{"bbox": bbox(0, 0, 10, 10), "crop_path": None, "structure_crop_path": None}]}
    bad = {**good, "image_id": "b" * 32, "segments": [{"bbox": {"x1": 0}, "crop_path": None}]}
    a, b = score_local_captions([good, bad], layout=OutputLayout(tmp_path / "out"), scorer=ColourScorer(),
                                nlp=load_spacy("en_core_web_sm"), include_full_image=False)
    assert a["status"] == "ok" and len(a["segments"]) == 1
    assert b["status"] == "failed" and b["error"] == (
        "invalid bbox of segment 0: expected {x1, y1, x2, y2} pixels, got {'x1': 0} (a.png)"
    )


@pytest.fixture(scope="module")
def corpus_records(tmp_path_factory):
    """Twelve generated photos with 1-5 random boxes each and captions of 1-4 sentences from a small pool."""
    from tests.corpus import make_generated_images

    folder = tmp_path_factory.mktemp("corpus")
    paths = make_generated_images(folder, 12, size=(160, 120), seed=4)
    rng = np.random.default_rng(5)
    pool = ["A red house by the road.", "Two people walk a dog", "The sky is grey and low.", "A blue car.",
            "Trees line the river.", "A small boat; a bridge behind it."]
    records = []
    for n, path in enumerate(paths):
        segments = []
        for _ in range(int(rng.integers(1, 6))):
            x1, y1 = int(rng.integers(0, 150)), int(rng.integers(0, 110))
            x2, y2 = int(rng.integers(x1 + 1, 161)), int(rng.integers(y1 + 1, 121))
            segments.append({"bbox": bbox(x1, y1, x2, y2), "crop_path": None, "structure_crop_path": None})
        caption = " ".join(rng.choice(pool, int(rng.integers(1, 5)), replace=False))
        records.append({"image_id": f"{n:032d}", "source_path": str(path), "caption": caption, "segments": segments})
    return records


def test_grouped_passes_equal_one_pass(corpus_records, tiny_clip_dir, tmp_path):
    scorer = ClipScorer(str(tiny_clip_dir), device="cpu", batch_size=4)
    nlp = load_spacy("en_core_web_sm")
    layout = OutputLayout(tmp_path / "out")
    one_pass = score_local_captions(corpus_records, layout=layout, scorer=scorer, nlp=nlp, group_crops=10**6)
    for group_crops in (1, 7, 16):  # one image per group; a few images; the default for batch_size 4
        grouped = score_local_captions(corpus_records, layout=layout, scorer=scorer, nlp=nlp, group_crops=group_crops)
        assert [r["status"] for r in grouped] == ["ok"] * len(corpus_records)
        for got, want in zip(grouped, one_pass):
            assert [(s["bbox"], s["caption"]) for s in got["segments"]] == [
                (s["bbox"], s["caption"]) for s in want["segments"]
            ]
            assert [s["similarity_score"] for s in got["segments"]] == pytest.approx(
                [s["similarity_score"] for s in want["segments"]], abs=1e-3
            )
    assert sum(len(r["segments"]) for r in one_pass) >= 12  # the comparison covers real assignments


def test_groups_bound_the_crops_held_at_once(corpus_records, tmp_path):
    scorer = ColourScorer()
    records = [{**r, "caption": "A grey thing."} for r in corpus_records]
    score_local_captions(records, layout=OutputLayout(tmp_path / "out"), scorer=scorer,
                         nlp=load_spacy("en_core_web_sm"), group_crops=8)
    sizes = [1 + len(r["segments"]) for r in records]
    assert sum(scorer.image_calls) == sum(sizes)
    assert max(scorer.image_calls) <= 8 and len(scorer.image_calls) >= sum(sizes) / 8


def test_images_without_segments_are_not_decoded(tmp_path):
    # Nothing can be assigned without segments: the source is not even opened (here it does not exist).
    record = {"image_id": "a" * 32, "source_path": str(tmp_path / "gone.png"), "caption": "A grey square.",
              "segments": []}
    scorer = ColourScorer()
    out = score_local_captions([record, {**record, "image_id": "b" * 32, "segments": "oops"}],
                               layout=OutputLayout(tmp_path / "out"), scorer=scorer, nlp=load_spacy("en_core_web_sm"))
    assert out[0]["status"] == "ok" and out[0]["segments"] == [] and scorer.image_calls == []
    assert out[1] == {"image_id": "b" * 32, "status": "failed", "caption": None, "caption_source": None,
                      "segments": [], "error": "invalid segments: expected a list, got str (gone.png)"}

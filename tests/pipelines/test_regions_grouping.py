"""pipelines.steps.grouping and the regions stage's ``grouping`` proposer: exact boxes of flat shapes, the drawn shapes
through the stage, recall on generated scenes with known boxes, which proposer ``auto`` resolves to."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.steps.grouping import grouping_boxes
from pipelines.steps.regions import propose_regions, resolve_region_method, select_boxes
from pipelines.steps.structure import extract_structure
from storage.layout import OutputLayout
from tests.pipelines.conftest import save_rgb, shapes_canvas
from tests.pipelines.test_regions import SHAPES
from tests.scenes import box_recall, make_scene

SELECTION = dict(min_area_fraction=0.01, max_area_fraction=0.8, nms_iou=0.7, max_regions=16)


def iou(a, b) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize(
    ("method", "sam_model", "sam_checkpoint", "expected"),
    [
        ("auto", None, None, "grouping"),
        ("auto", "facebook/sam-vit-base", None, "sam"),
        ("auto", None, "sam_vit_b.pth", "sam"),
        ("auto", "", "", "grouping"),
        ("structure", None, None, "structure"),
        ("grouping", "facebook/sam-vit-base", None, "grouping"),
        ("sam", None, None, "sam"),  # propose_regions then says what to set
    ],
)
def test_resolve_region_method(method, sam_model, sam_checkpoint, expected):
    assert resolve_region_method(method, sam_model, sam_checkpoint) == expected


def test_resolve_region_method_rejects():
    with pytest.raises(ValueError, match="unknown regions method 'selective'"):
        resolve_region_method("selective", None, None)
    with pytest.raises(ValueError, match="not both"):
        resolve_region_method("auto", "facebook/sam-vit-base", "sam_vit_b.pth")


def test_grouping_finds_the_exact_boxes_of_flat_squares():
    image = np.full((40, 60, 3), 128, np.uint8)
    image[5:15, 5:15] = (220, 30, 30)  # box [5, 15) x [5, 15)
    image[10:30, 30:50] = (30, 30, 220)  # box [30, 50) x [10, 30)
    proposals = grouping_boxes(image, work_side=256)  # no downscaling
    boxes = proposals.boxes.tolist()
    assert [5, 5, 15, 15] in boxes and [30, 10, 50, 30] in boxes
    assert [0, 0, 60, 40] in boxes  # the last merge: everything
    np.testing.assert_allclose(proposals.area_fractions,
                               [(b[2] - b[0]) * (b[3] - b[1]) / 2400 for b in boxes])
    assert ((proposals.scores >= 0) & (proposals.scores <= 1)).all()
    kept = proposals.boxes[select_boxes(proposals.boxes, proposals.scores, proposals.area_fractions, **SELECTION)]
    # Each square is kept as its exact box: it stands out from its surroundings more than the rings the
    # segmentation leaves along its blurred outline.
    assert {(5, 5, 15, 15), (30, 10, 50, 30)} <= set(map(tuple, kept.tolist()))


def test_grouping_rejects_non_rgb():
    with pytest.raises(ValueError, match=r"expected an RGB image \(H, W, 3\) uint8, got uint8 \(4, 5\)"):
        grouping_boxes(np.zeros((4, 5), np.uint8))


def test_stage_auto_runs_grouping_and_finds_each_drawn_shape(tmp_path):
    canvas = shapes_canvas(800, 600, SHAPES + [("rect", (750, 20, 760, 30))])  # the last is < 1% of the image
    path = save_rgb(tmp_path / "shapes.png", canvas)
    layout = OutputLayout(tmp_path / "out")
    record = {"image_id": "ab" * 16, "source_path": str(path)}
    (structure,) = extract_structure([record], layout=layout, stage_key="s", backend="opencv")
    (result,) = propose_regions([{**record, **structure}], layout=layout, stage_key="r", method="auto")
    assert result["status"] == "ok" and result["region_method"] == "grouping"
    found = [(s["bbox"]["x1"], s["bbox"]["y1"], s["bbox"]["x2"], s["bbox"]["y2"]) for s in result["segments"]]
    assert len(found) <= 16
    for _, box in SHAPES:  # found at the 192 px work size: one work pixel is ~4 image pixels
        assert max(iou(box, f) for f in found) >= 0.85, (box, found)
    assert all(s["structure_crop_path"] for s in result["segments"])


def test_stage_grouping_needs_no_structure_map(tmp_path):
    path = save_rgb(tmp_path / "a.png", shapes_canvas(200, 150, [("rect", (20, 30, 100, 120))]))
    (result,) = propose_regions([{"image_id": "aa" * 16, "source_path": str(path)}],
                                layout=OutputLayout(tmp_path / "out"), stage_key="r", method="grouping")
    assert result["status"] == "ok" and result["region_method"] == "grouping"
    found = [(s["bbox"]["x1"], s["bbox"]["y1"], s["bbox"]["x2"], s["bbox"]["y2"]) for s in result["segments"]]
    assert max(iou((20, 30, 100, 120), f) for f in found) >= 0.9
    assert all(s["structure_crop_path"] is None for s in result["segments"])


def test_grouping_recalls_the_objects_of_generated_scenes():
    found = total = 0
    for seed in range(12):
        scene = make_scene(seed)
        proposals = grouping_boxes(scene.rgb)
        kept = select_boxes(proposals.boxes, proposals.scores, proposals.area_fractions, **SELECTION)
        assert len(kept) <= 16
        hits, count = box_recall(scene.boxes, proposals.boxes[kept])
        found, total = found + hits, total + count
    assert total >= 24 and found / total >= 0.8


def test_box_recall_by_hand():
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    assert box_recall(truth, np.array([[0, 0, 10, 20]])) == (1, 2)  # IoU exactly 0.5 counts
    assert box_recall(truth, np.array([[0, 0, 10, 21]])) == (0, 2)  # IoU 100/210
    assert box_recall(truth, np.zeros((0, 4))) == (0, 2)


def test_scenes_are_deterministic_with_boxes_in_the_area_range():
    first, again = make_scene(5), make_scene(5)
    np.testing.assert_array_equal(first.rgb, again.rgb)
    np.testing.assert_array_equal(first.boxes, again.boxes)
    for seed in range(6):
        scene = make_scene(seed, size=(320, 240))
        assert scene.rgb.shape == (240, 320, 3) and scene.rgb.dtype == np.uint8
        boxes = scene.boxes
        assert len(boxes) >= 1
        assert ((boxes[:, 0] >= 0) & (boxes[:, 2] <= 320) & (boxes[:, 1] >= 0) & (boxes[:, 3] <= 240)).all()
        fractions = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (320 * 240)
        assert ((fractions >= 0.01) & (fractions <= 0.8)).all()


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (4, 7), (13, 13), (7, 300), (48, 64)])
def test_grouping_handles_tiny_and_thin_images(shape):
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    proposals = grouping_boxes(rgb)
    height, width = shape
    assert [0, 0, width, height] in proposals.boxes.tolist()  # the last merge (or the only region): everything
    assert ((proposals.boxes[:, 2] > proposals.boxes[:, 0]) & (proposals.boxes[:, 3] > proposals.boxes[:, 1])).all()


def test_superpixels_label_every_pixel_once_numbered_from_zero_and_deterministically():
    from pipelines.steps.grouping import superpixels

    work = make_scene(3, size=(192, 144)).rgb
    labels = superpixels(work, 12)
    n = int(labels.max()) + 1
    assert labels.min() == 0 and len(np.unique(labels)) == n  # no gaps, no unlabelled (-1) pixel
    assert 150 <= n <= 16 * 12  # about one per seed (12 px grid on 192x144)
    np.testing.assert_array_equal(labels, superpixels(work, 12))


def test_grouping_is_deterministic():
    scene = make_scene(7)
    first, again = grouping_boxes(scene.rgb), grouping_boxes(scene.rgb)
    np.testing.assert_array_equal(first.boxes, again.boxes)
    np.testing.assert_array_equal(first.scores, again.scores)


def test_grouping_many_images_gives_each_what_it_gets_alone():
    from pipelines.steps.grouping import grouping_boxes_many

    rng = np.random.default_rng(1)
    scenes = [make_scene(seed, size=(160, 120)) for seed in range(3)]
    items = [(s.rgb, None) for s in scenes] + [(rng.integers(0, 256, (7, 30, 3), dtype=np.uint8), None)]
    items[1] = (items[1][0], np.ascontiguousarray(255 * (items[1][0][..., 0] > 128), dtype=np.uint8))
    together = grouping_boxes_many(items)
    assert len(together) == len(items) and grouping_boxes_many([]) == []
    for (rgb, structure), proposals in zip(items, together):
        alone = grouping_boxes(rgb, structure)
        np.testing.assert_array_equal(proposals.boxes, alone.boxes)
        np.testing.assert_array_equal(proposals.scores, alone.scores)
        np.testing.assert_array_equal(proposals.area_fractions, alone.area_fractions)


def test_stage_grouping_batch_records_each_failure_alone(tmp_path, monkeypatch):
    import pipelines.steps.regions as regions

    paths = [save_rgb(tmp_path / f"{i}.png", shapes_canvas(200, 150, [("rect", (20 + i, 30, 100, 120))]))
             for i in range(4)]
    rows = [{"image_id": f"{i:02d}" * 16, "source_path": str(p)} for i, p in enumerate(paths)]
    rows.insert(2, {"image_id": "ff" * 16, "source_path": str(tmp_path / "gone.png")})
    layout = OutputLayout(tmp_path / "out")
    alone = [propose_regions([row], layout=layout, stage_key="alone", method="grouping")[0] for row in rows]
    together = propose_regions(rows, layout=layout, stage_key="together", method="grouping")
    assert [r["status"] for r in together] == ["ok", "ok", "failed", "ok", "ok"]
    assert [r["segments"] and [s["bbox"] for s in r["segments"]] for r in together] == [
        r["segments"] and [s["bbox"] for s in r["segments"]] for r in alone]
    assert together[2]["error"] == alone[2]["error"] and "file not found" in together[2]["error"]

    # A proposal that fails inside a batch fails its image only, with the message it gets alone.
    failing = regions.load_rgb(str(paths[1]), max_pixels=10**8)

    def grouping_boxes(rgb, structure=None, **options):
        if rgb.shape == failing.shape and np.array_equal(rgb, failing):
            raise RuntimeError("cannot group")
        return regions.grouping_boxes.__wrapped__(rgb, structure, **options)

    def grouping_boxes_many(items, **options):
        return [grouping_boxes(rgb, structure, **options) for rgb, structure in items]

    grouping_boxes.__wrapped__ = regions.grouping_boxes
    monkeypatch.setattr(regions, "grouping_boxes", grouping_boxes)
    monkeypatch.setattr(regions, "grouping_boxes_many", grouping_boxes_many)
    out = propose_regions(rows, layout=layout, stage_key="failing", method="grouping")
    assert [r["status"] for r in out] == ["ok", "failed", "failed", "ok", "ok"]
    assert out[1]["error"] == "region proposal failed: RuntimeError: cannot group (1.png)"
    assert [s["bbox"] for s in out[3]["segments"]] == [s["bbox"] for s in alone[3]["segments"]]

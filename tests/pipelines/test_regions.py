"""pipelines.steps.regions: NMS == torchvision's, box scaling, the structure proposer finds drawn shapes, the real
SamAutomaticMaskGenerator code path on a tiny random SAM (boxes in original pixels, area filter)."""

from __future__ import annotations

from functools import partial

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.steps.regions import (
    RegionsSetupError,
    nms,
    propose_regions,
    resolve_checkpoint,
    sam_boxes,
    scale_boxes,
    select_boxes,
    structure_boxes,
)
from pipelines.steps.structure import extract_structure
from storage.layout import OutputLayout
from tests.pipelines.conftest import save_rgb, shapes_canvas


def test_nms_matches_torchvision(rng):
    import torch
    from torchvision.ops import nms as tv_nms

    for _ in range(20):
        xy = rng.integers(0, 80, (40, 2))
        wh = rng.integers(2, 40, (40, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        scores = rng.random(40)
        expected = tv_nms(torch.tensor(boxes, dtype=torch.float64), torch.tensor(scores), 0.5).numpy()
        np.testing.assert_array_equal(nms(boxes, scores, 0.5), expected)


def test_scale_boxes_by_hand():
    boxes = np.array([[10, 5, 21, 16], [0, 0, 1, 1], [99, 49, 100, 50]])
    out = scale_boxes(boxes, (100, 50), (400, 200))
    np.testing.assert_array_equal(out, [[40, 20, 84, 64], [0, 0, 4, 4], [396, 196, 400, 200]])
    # Shrinking rounds outward (floor the start, ceil the end) and never leaves an empty box.
    np.testing.assert_array_equal(scale_boxes(np.array([[3, 3, 4, 4]]), (10, 10), (4, 4)), [[1, 1, 2, 2]])
    np.testing.assert_array_equal(scale_boxes(np.array([[9, 9, 10, 10]]), (10, 10), (3, 3)), [[2, 2, 3, 3]])


def test_select_boxes_area_filter_nms_and_cap():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [0, 0, 100, 100], [50, 50, 51, 51]])
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.99])
    areas = np.array([0.01, 0.009, 0.01, 1.0, 0.0001])
    limits = dict(min_area_fraction=0.005, max_area_fraction=0.8, nms_iou=0.7)
    kept = select_boxes(boxes, scores, areas, **limits, max_regions=5)
    assert kept.tolist() == [0, 2]  # 3: too large, 4: too small, 1: IoU 0.9 with 0
    assert select_boxes(boxes, scores, areas, **limits, max_regions=1).tolist() == [0]


def test_structure_boxes_of_drawn_edges():
    edges = np.zeros((50, 60), np.uint8)
    cv2.rectangle(edges, (5, 6), (20, 30), 255, 1)  # box [5, 21) x [6, 31)
    edges[40, 40:55] = 255  # a line: box [40, 55) x [40, 41)
    boxes = sorted(structure_boxes(edges, dilation=2).tolist())
    assert boxes == [[5, 6, 21, 31], [40, 40, 55, 41]]
    assert structure_boxes(np.zeros((5, 5), np.uint8)).shape == (0, 4)


SHAPES = [
    ("rect", (60, 50, 260, 200)),
    ("ellipse", (400, 80, 700, 300)),
    ("rect", (120, 380, 520, 560)),
    ("ellipse", (600, 400, 760, 560)),
]


def test_structure_proposer_finds_each_drawn_shape(tmp_path):
    # 800x600 image, so the 512x384 structure map is scaled back by 1.5625.
    canvas = shapes_canvas(800, 600, SHAPES + [("rect", (750, 20, 760, 30))])  # the last is < 1% of the image
    path = save_rgb(tmp_path / "shapes.png", canvas)
    layout = OutputLayout(tmp_path / "out")
    record = {"image_id": "ab" * 16, "source_path": str(path)}
    (structure,) = extract_structure([record], layout=layout, stage_key="s", backend="opencv")
    (result,) = propose_regions([{**record, **structure}], layout=layout, stage_key="r", method="structure")
    assert result["status"] == "ok" and result["error"] is None and result["region_method"] == "structure"
    segments = result["segments"]
    found = [(s["bbox"]["x1"], s["bbox"]["y1"], s["bbox"]["x2"], s["bbox"]["y2"]) for s in segments]
    assert len(found) == len(SHAPES)
    for _, box in SHAPES:
        assert any(max(abs(a - b) for a, b in zip(box, f)) <= 3 for f in found), (box, found)
    areas = [s["bbox"]["width"] * s["bbox"]["height"] for s in segments]
    assert areas == sorted(areas, reverse=True)
    structure_map = cv2.imread(str(layout.resolve(structure["structure_path"])), 0)
    for index, segment in enumerate(segments):
        b = segment["bbox"]
        assert segment["crop_path"] == layout.relative(layout.crop(record["image_id"], "r", index))
        crop = np.asarray(Image.open(layout.resolve(segment["crop_path"])))
        assert crop.shape == (b["height"], b["width"], 3)
        # The crop is the image's box (JPEG: close, not exact).
        assert np.abs(crop.astype(int) - canvas[b["y1"] : b["y2"], b["x1"] : b["x2"]]).mean() < 4
        structure_crop = cv2.imread(str(layout.resolve(segment["structure_crop_path"])), cv2.IMREAD_UNCHANGED)
        sx1, sy1 = int(np.floor(b["x1"] * 512 / 800)), int(np.floor(b["y1"] * 384 / 600))
        sx2, sy2 = int(np.ceil(b["x2"] * 512 / 800)), int(np.ceil(b["y2"] * 384 / 600))
        np.testing.assert_array_equal(structure_crop, structure_map[sy1:sy2, sx1:sx2])


def test_per_image_failures_are_recorded(tmp_path):
    layout = OutputLayout(tmp_path / "out")
    good = save_rgb(tmp_path / "a.png", shapes_canvas(64, 48, [("rect", (10, 10, 40, 30))]))
    (structure,) = extract_structure(
        [{"image_id": "aa" * 16, "source_path": str(good)}], layout=layout, stage_key="s", backend="opencv"
    )
    other = save_rgb(tmp_path / "b.png", np.zeros((48, 100, 3), np.uint8))
    rows = [
        {"image_id": "bb" * 16, "source_path": str(good), "structure_path": None},
        {"image_id": "cc" * 16, "source_path": str(other), "structure_path": structure["structure_path"]},
        {"image_id": "dd" * 16, "source_path": str(tmp_path / "gone.png"), "structure_path": None},
        {"image_id": "ee" * 16, "source_path": str(good), "status": "failed", "error": "x"},
    ]
    out = propose_regions(rows, layout=layout, stage_key="r", method="structure")
    assert [r["status"] for r in out] == ["failed"] * 4 and all(r["segments"] == [] for r in out)
    assert "no structure map" in out[0]["error"] and out[0]["error"].endswith("(a.png)")
    assert "not made from this image" in out[1]["error"]
    assert "file not found" in out[2]["error"]
    assert out[3]["error"].startswith("skipped")


def test_checkpoint_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(RegionsSetupError, match="SAM checkpoint not found"):
        resolve_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(RegionsSetupError, match="hf://OWNER/REPO/FILE"):
        resolve_checkpoint("hf://only-a-repo")
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nto load this file")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RegionsSetupError) as info:
        resolve_checkpoint("hf://facebook/sam/sam_vit_b.pth")
    assert "\n" not in str(info.value) and "offline?" in str(info.value)
    with pytest.raises(RegionsSetupError, match="needs regions.sam_model .* or regions.sam_checkpoint"):
        propose_regions([{"image_id": "a", "source_path": "x"}], layout=OutputLayout(tmp_path), stage_key="r",
                        method="sam")


# ---- Segment Anything on a tiny random model ---------------------------------------------------------------------


def tiny_sam(model_type: str, checkpoint: str | None, device: str):
    """Return a randomly initialised SAM small enough to run the real mask generator on CPU in about a second."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=256, patch_size=16, embed_dim=32, depth=1, num_heads=2, out_chans=32,
                              mlp_ratio=2, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True)
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=1, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2))
    return Sam(encoder, prompt, decoder).to(device).eval()


@pytest.fixture(scope="module")
def sam_generator():
    from segment_anything import SamAutomaticMaskGenerator

    # Thresholds at 0 and no internal NMS: a random model's masks are kept, so the filters below have work to do.
    return SamAutomaticMaskGenerator(tiny_sam("vit_b", None, "cpu"), points_per_side=4, pred_iou_thresh=0.0,
                                     stability_score_thresh=0.0, box_nms_thresh=1.0)


def test_sam_area_filter_holds_on_real_generator_output(sam_generator):
    rgb = shapes_canvas(100, 75, [("rect", (10, 10, 41, 41)), ("ellipse", (55, 35, 86, 66))])
    class Recorder:  # keeps what the real generator returned, so it runs once
        def generate(self, image):
            self.annotations = sam_generator.generate(image)
            return self.annotations

    recorder = Recorder()
    boxes, scores, areas = sam_boxes(rgb, recorder, max_side=1024)
    annotations = recorder.annotations
    assert len(annotations) > 5
    np.testing.assert_allclose(sorted(areas), sorted(a["area"] / (100 * 75) for a in annotations))
    low, high = np.quantile(areas, [0.25, 0.75])
    kept = select_boxes(boxes, scores, areas, min_area_fraction=low, max_area_fraction=high, nms_iou=1.0,
                        max_regions=100)
    expected = {i for i, a in enumerate(areas) if low <= a <= high}
    assert set(kept.tolist()) == expected and 0 < len(expected) < len(areas)
    assert all(np.diff(scores[kept]) <= 0)  # best score first
    # Exclusive boxes of each mask: x2 - x1 is the mask's pixel extent.
    for annotation in annotations:
        mask = annotation["segmentation"]
        ys, xs = np.nonzero(mask)
        assert annotation["bbox"][2] + 1 == xs.max() - xs.min() + 1


def test_sam_path_boxes_in_original_pixels_for_large_images(tmp_path):
    # 400x300 image, max_side 100: masks are made at 100x75 and boxes scaled back x4.
    canvas = cv2.resize(shapes_canvas(100, 75, [("rect", (10, 10, 41, 41)), ("ellipse", (55, 35, 86, 66))]),
                        (400, 300), interpolation=cv2.INTER_NEAREST)
    path = save_rgb(tmp_path / "big.png", canvas)
    layout = OutputLayout(tmp_path / "out")
    record = {"image_id": "cd" * 16, "source_path": str(path)}
    (structure,) = extract_structure([record], layout=layout, stage_key="s", backend="opencv")
    (result,) = propose_regions(
        [{**record, **structure}], layout=layout, stage_key="r", method="auto", sam_builder=tiny_sam,
        points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, max_side=100, device="cpu",
        min_area_fraction=0.05, max_area_fraction=0.95, max_regions=5,
    )
    assert result["status"] == "ok", result["error"]
    assert result["region_method"] == "sam"
    segments = result["segments"]
    assert 0 < len(segments) <= 5
    for segment in segments:
        b = segment["bbox"]
        assert 0 <= b["x1"] < b["x2"] <= 400 and 0 <= b["y1"] < b["y2"] <= 300
        assert all(b[k] % 4 == 0 for k in ("x1", "y1", "x2", "y2"))  # scaled from the 100x75 mask image
        assert 0.05 * 400 * 300 <= b["width"] * b["height"]  # a box holds its mask, so it is >= the mask area
        crop = Image.open(layout.resolve(segment["crop_path"]))
        assert crop.size == (b["width"], b["height"])
        assert Image.open(layout.resolve(segment["structure_crop_path"])).mode == "L"
    assert max(s["bbox"]["x2"] for s in segments) > 100  # beyond the mask image's width: really in original pixels


def test_an_images_crops_replace_its_folder_whole(tmp_path, monkeypatch):
    # A run writes an image's crops together: a re-run with fewer regions leaves none of the old ones behind, and
    # an encoding failure half-way leaves the earlier crops as they were, with no staging folder.
    import pipelines.steps.regions as regions

    canvas = shapes_canvas(800, 600, SHAPES)
    path = save_rgb(tmp_path / "shapes.png", canvas)
    layout = OutputLayout(tmp_path / "out")
    record = {"image_id": "ab" * 16, "source_path": str(path)}
    (structure,) = extract_structure([record], layout=layout, stage_key="s", backend="opencv")
    folder = layout.crop(record["image_id"], "r", 0).parent
    (first,) = propose_regions([{**record, **structure}], layout=layout, stage_key="r", method="structure")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        name for s in first["segments"] for name in (s["crop_path"].rsplit("/", 1)[1],
                                                     s["structure_crop_path"].rsplit("/", 1)[1]))
    (fewer,) = propose_regions([{**record, **structure}], layout=layout, stage_key="r", method="structure",
                               max_regions=1)
    assert len(fewer["segments"]) == 1 and sorted(p.name for p in folder.iterdir()) == ["000.jpg", "000.structure.png"]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = []

    def failing(path, crop):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("PNG encoding failed (injected)")
        return original(path, crop)

    original = regions._encode_structure_crop
    monkeypatch.setattr(regions, "_encode_structure_crop", failing)
    (failed,) = propose_regions([{**record, **structure}], layout=layout, stage_key="r", method="structure")
    assert failed["status"] == "failed" and "injected" in failed["error"] and len(calls) == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no staging folder left

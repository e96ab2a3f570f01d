"""pipelines.steps.regions with SAM from transformers (``regions.sam_model``): tiny randomly initialised SAM and SAM 2
models saved with ``save_pretrained`` and loaded from their folders through the ``mask-generation`` pipeline, as a
hub id would be; mask boxes by hand; boxes in original pixels; one-line setup errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.steps.regions import (
    RegionsSetupError,
    build_sam_pipeline,
    cached_sam_pipeline,
    mask_boxes,
    propose_regions,
    sam_model_boxes,
    select_boxes,
)
from pipelines.steps.structure import extract_structure
from storage.layout import OutputLayout
from tests.pipelines.conftest import save_rgb, shapes_canvas

# Thresholds at 0 and no NMS: a random model's masks are all kept, so the filters have work to do.
KEEP_ALL = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, nms_iou=1.0)


def save_tiny_sam(folder) -> str:
    """Save a randomly initialised SamModel (hidden size 32, one layer, 256 px input) and its processor."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=256, patch_size=16, mlp_dim=64, global_attn_indexes=[0], window_size=0,
                             num_pos_feats=16)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=256, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
                                   iou_head_hidden_dim=32)
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())
    SamModel(config).eval().save_pretrained(folder)
    processor = SamImageProcessor(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256})
    SamProcessor(image_processor=processor).save_pretrained(folder)
    return str(folder)


def save_tiny_sam2(folder) -> str:
    """Save a randomly initialised Sam2Model (a 4-stage Hiera of widths 8..64, 128 px input) and its processor."""
    from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model, Sam2Processor
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    torch.manual_seed(0)
    # A global-attention block must not open a stage (a pooled stage opening divides by its window size).
    backbone = Sam2HieraDetConfig(hidden_size=8, num_attention_heads=1, image_size=[128, 128],
                                  blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                                  num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[4, 4, 4, 4],
                                  global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4])
    vision = Sam2VisionConfig(backbone_config=backbone.to_dict(), backbone_channel_list=[64, 32, 16, 8],
                              backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=32)
    prompt = Sam2PromptEncoderConfig(hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4)
    decoder = Sam2MaskDecoderConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
                                    iou_head_hidden_dim=32)
    config = Sam2Config(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                        mask_decoder_config=decoder.to_dict())
    Sam2Model(config).eval().save_pretrained(folder)
    Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": 128, "width": 128})).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["sam", "sam2"])
def tiny_model_dir(request, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return save_tiny_sam(folder) if request.param == "sam" else save_tiny_sam2(folder)


def test_mask_boxes_by_hand():
    masks = torch.zeros((3, 6, 8), dtype=torch.bool)
    masks[0, 1:4, 2:5] = True  # box x [2, 5), y [1, 4), 9 pixels
    masks[1, 5, 7] = True  # the bottom-right pixel
    boxes, areas = mask_boxes(masks)  # masks[2] is empty
    np.testing.assert_array_equal(boxes, [[2, 1, 5, 4], [7, 5, 8, 6], [0, 0, 0, 0]])
    np.testing.assert_array_equal(areas, [9, 1, 0])


def test_masks_of_the_real_pipeline_become_original_pixel_boxes(tiny_model_dir):
    rgb = shapes_canvas(100, 75, [("rect", (10, 10, 41, 41)), ("ellipse", (55, 35, 86, 66))])
    generator = cached_sam_pipeline(tiny_model_dir, "cpu")
    assert cached_sam_pipeline(tiny_model_dir, "cpu") is generator  # built once per process
    calls = {}

    def recording(image, **kwargs):  # keeps what the real pipeline returned, so it runs once
        calls["kwargs"] = kwargs
        calls["output"] = generator(image, **kwargs)
        return calls["output"]

    boxes, scores, areas = sam_model_boxes(rgb, recording, max_side=1024, points_per_side=4, points_per_batch=8,
                                           **KEEP_ALL)
    assert calls["kwargs"]["points_per_crop"] == 4 and calls["kwargs"]["points_per_batch"] == 8
    masks = [np.asarray(m, dtype=bool) for m in calls["output"]["masks"]]
    assert len(masks) > 5 and all(m.shape == (75, 100) for m in masks)
    nonempty = [m for m in masks if m.any()]
    assert len(boxes) == len(scores) == len(areas) == len(nonempty)
    np.testing.assert_allclose(sorted(areas), sorted(m.sum() / (100 * 75) for m in nonempty))
    expected_boxes = []
    for m in nonempty:
        ys, xs = np.nonzero(m)
        expected_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert sorted(map(tuple, boxes.tolist())) == sorted(map(tuple, expected_boxes))
    low, high = np.quantile(areas, [0.25, 0.75])
    kept = select_boxes(boxes, scores, areas, min_area_fraction=low, max_area_fraction=high, nms_iou=1.0,
                        max_regions=100)
    assert set(kept.tolist()) == {i for i, a in enumerate(areas) if low <= a <= high}


def test_stage_with_sam_model_boxes_in_original_pixels(tmp_path, tiny_model_dir):
    # 400x300 image, max_side 100: masks are made at 100x75 and boxes scaled back x4.
    canvas = cv2.resize(shapes_canvas(100, 75, [("rect", (10, 10, 41, 41)), ("ellipse", (55, 35, 86, 66))]),
                        (400, 300), interpolation=cv2.INTER_NEAREST)
    path = save_rgb(tmp_path / "big.png", canvas)
    layout = OutputLayout(tmp_path / "out")
    record = {"image_id": "cd" * 16, "source_path": str(path)}
    (structure,) = extract_structure([record], layout=layout, stage_key="s", backend="opencv")
    (result,) = propose_regions(
        [{**record, **structure}], layout=layout, stage_key="r", method="auto", sam_model=tiny_model_dir,
        points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, max_side=100,
        device="cpu", min_area_fraction=0.05, max_area_fraction=0.95, max_regions=5,
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
        assert Image.open(layout.resolve(segment["crop_path"])).size == (b["width"], b["height"])
    assert max(s["bbox"]["x2"] for s in segments) > 100  # beyond the mask image's width: really in original pixels


def test_sam_model_setup_errors_are_one_line(tmp_path):
    with pytest.raises(RegionsSetupError) as info:
        build_sam_pipeline(str(tmp_path / "no-such-model"), "cpu")
    message = str(info.value)
    assert "\n" not in message and "cannot load SAM model" in message and "regions.sam_model" in message
    with pytest.raises(ValueError, match="not both"):
        propose_regions([], layout=OutputLayout(tmp_path), stage_key="r", sam_model="a", sam_checkpoint="b")


@pytest.mark.gpu
def test_sam_model_runs_on_cuda(tmp_path, tiny_model_dir):
    canvas = shapes_canvas(160, 120, [("rect", (10, 10, 70, 70)), ("ellipse", (80, 40, 150, 110))])
    path = save_rgb(tmp_path / "a.png", canvas)
    (result,) = propose_regions(
        [{"image_id": "ef" * 16, "source_path": str(path)}], layout=OutputLayout(tmp_path / "out"), stage_key="r",
        sam_model=tiny_model_dir, points_per_side=8, points_per_batch=16, pred_iou_thresh=0.0,
        stability_score_thresh=0.0, device="cuda", min_area_fraction=0.01, max_area_fraction=0.95,
    )
    assert result["status"] == "ok", result["error"]
    assert cached_sam_pipeline(tiny_model_dir, "cuda").model.device.type == "cuda"
    assert 0 < len(result["segments"]) <= 16
    for segment in result["segments"]:
        b = segment["bbox"]
        assert 0 <= b["x1"] < b["x2"] <= 160 and 0 <= b["y1"] < b["y2"] <= 120


def test_config_takes_a_sam_model_or_a_checkpoint_not_both():
    from pydantic import ValidationError

    from configs.schema import RegionsConfig

    assert RegionsConfig(sam_model="facebook/sam-vit-base").sam_model == "facebook/sam-vit-base"
    assert RegionsConfig().method == "auto" and RegionsConfig(method="grouping").method == "grouping"
    with pytest.raises(ValidationError, match="not both"):
        RegionsConfig(sam_model="facebook/sam-vit-base", sam_checkpoint="hf://facebook/sam/sam_vit_b.pth")

"""The data stages' model loaders (CLIP scorer, captioner, SAM checkpoint) report a damaged model file in one
ModelLoadError line naming it, like every other reader of weights (structxlip.model_files)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from structxlip.model_files import ModelLoadError


def test_clip_scorer_names_damaged_weights(tiny_clip_dir, tmp_path):
    from pipelines.steps.captions import ClipScorer

    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    os.truncate(folder / "model.safetensors", 1000)
    with pytest.raises(ModelLoadError) as caught:
        ClipScorer(str(folder), device="cpu")
    assert str(caught.value).startswith(f"{folder / 'model.safetensors'} is corrupt or truncated (SafetensorError: ")


def test_captioner_names_a_damaged_config(tiny_clip_dir, tmp_path):
    from pipelines.steps.captions import Captioner

    folder = tmp_path / "captioner"
    shutil.copytree(tiny_clip_dir, folder)
    (folder / "config.json").write_text('{"model_type": "blip", ')  # cut mid-file
    with pytest.raises(ModelLoadError) as caught:
        Captioner(str(folder), device="cpu")
    assert str(caught.value).startswith(f"{folder / 'config.json'} is corrupt or truncated (JSONDecodeError: ")


def test_sam_checkpoint_named_when_truncated(tmp_path):
    pytest.importorskip("segment_anything")
    from pipelines.steps.regions import build_sam

    checkpoint = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1000)}, checkpoint)
    os.truncate(checkpoint, checkpoint.stat().st_size // 2)
    with pytest.raises(ModelLoadError) as caught:
        build_sam("vit_b", str(checkpoint), "cpu")
    message = str(caught.value)
    assert message.startswith(f"{checkpoint} is corrupt or truncated (") and "\n" not in message
    assert message.endswith("download it again and point regions.sam_checkpoint at it")

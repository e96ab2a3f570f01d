"""structxlip.model_files: every reader of weights turns a damaged file into one ModelLoadError line naming the file
and what to do; intact files, missing files and refused pickles keep their own errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from structxlip.checkpoint import CheckpointError, read_checkpoint_payload
from structxlip.model_files import ModelLoadError, is_damaged_file_error
from structxlip.models import export_reference_checkpoint, load_clip, load_structxlip_checkpoint


def _damaged_copy(tiny_clip_dir: Path, tmp_path: Path, how: str) -> Path:
    folder = tmp_path / f"clip-{how}"
    shutil.copytree(tiny_clip_dir, folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    if how == "truncated":
        os.truncate(weights, size // 2)
    elif how == "random":
        weights.write_bytes(os.urandom(size))
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "config":
        (folder / "config.json").write_text("{not json")
    return folder


def _assert_one_line(error: BaseException, path: Path, *words: str) -> None:
    message = str(error)
    assert isinstance(error, ModelLoadError) and isinstance(error, RuntimeError)
    assert "\n" not in message and message.startswith(f"{path} is corrupt or truncated")
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("how, names, words", [
    ("truncated", "model.safetensors", ("SafetensorError", "re-export or re-download it")),
    ("random", "model.safetensors", ("SafetensorError",)),
    ("empty", "model.safetensors", ("SafetensorError",)),
    ("config", "config.json", ("JSONDecodeError",)),
])
def test_a_damaged_clip_folder_names_the_file(tiny_clip_dir, tmp_path, how, names, words):
    folder = _damaged_copy(tiny_clip_dir, tmp_path, how)
    with pytest.raises(ModelLoadError) as caught:
        load_clip(folder)
    _assert_one_line(caught.value, folder / names, *words)
    with pytest.raises(ModelLoadError) as caught:  # export-checkpoint reads the folder through its own path
        export_reference_checkpoint(folder, tmp_path / "out.pth")
    _assert_one_line(caught.value, folder / names, *words)
    assert not (tmp_path / "out.pth").exists()


def test_damaged_weights_files_name_themselves(tmp_path):
    model = torch.nn.Linear(2, 2)
    torch.save(model.state_dict(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(ModelLoadError) as caught:
        load_structxlip_checkpoint(model, tmp_path / "cut.pth")
    _assert_one_line(caught.value, tmp_path / "cut.pth", "RuntimeError: PytorchStreamReader failed")
    with pytest.raises(ModelLoadError) as caught:
        load_structxlip_checkpoint(model, tmp_path / "noise.safetensors")
    _assert_one_line(caught.value, tmp_path / "noise.safetensors", "SafetensorError")
    assert load_structxlip_checkpoint(model, tmp_path / "good.pth") is model  # intact: loads


def test_a_damaged_training_checkpoint_is_both_kinds_and_says_what_to_do(tmp_path):
    checkpoints = tmp_path / "train" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"a": torch.zeros(100)}, checkpoints / "last.pt")
    os.truncate(checkpoints / "last.pt", 300)
    with pytest.raises(ModelLoadError) as caught:
        read_checkpoint_payload(checkpoints / "last.pt")
    assert isinstance(caught.value, CheckpointError)  # callers that pass over unusable checkpoints still do
    _assert_one_line(caught.value, checkpoints / "last.pt", "not a readable checkpoint",
                     "train without --resume to start afresh")


def test_only_damage_is_translated():
    assert not is_damaged_file_error(FileNotFoundError("model.safetensors"))
    assert not is_damaged_file_error(OSError("We couldn't connect to 'https://huggingface.co'"))
    refused = RuntimeError("Weights only load failed ... WeightsUnpickler error: Unsupported global: GLOBAL os.system")
    assert not is_damaged_file_error(refused)
    wrapped = OSError("Unable to load weights from pytorch checkpoint file")
    wrapped.__cause__ = RuntimeError("PytorchStreamReader failed reading zip archive")
    assert is_damaged_file_error(wrapped)

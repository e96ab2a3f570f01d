"""Corrupt or truncated model files through the real CLI: export-checkpoint, evaluate --checkpoint and train --resume
each end with one line naming the damaged file and what to do, exit 2, and no traceback."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import yaml

from structxlip.app.synthetic import make_synthetic_manifest
from tests.hardening.conftest import run_cli

pytestmark = pytest.mark.e2e


def _last_line_error(done, command: str, *needles: str) -> str:
    """Assert exit 2, no traceback, and a last stderr line holding every needle (model loading may print progress
    bars first); return that line."""
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"structxlip {command}: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_synthetic_manifest(tmp_path_factory.mktemp("model-files") / "data", n_images=8, image_size=32, seed=4)


@pytest.fixture
def config(tiny_clip_dir, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"clip_model": str(tiny_clip_dir)},
                                    "train": {"max_text_tokens": 77, "device": "cpu", "epochs": 1, "batch_size": 2},
                                    "evaluate": {"split": "all", "device": "cpu"}}))
    return path


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_export_and_evaluate_name_a_damaged_model_folder_s_weights(damage, tiny_clip_dir, manifest, config, tmp_path,
                                                                  no_server_env):
    folder = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncated":
        os.truncate(weights, size - 1000)
    else:
        weights.write_bytes(os.urandom(size))
    exported = run_cli(no_server_env, "export-checkpoint", str(folder), str(tmp_path / "ref.pth"), timeout=300)
    _last_line_error(exported, "export-checkpoint", f"{weights} is corrupt or truncated (SafetensorError: ",
                     "): re-export or re-download it")
    assert not (tmp_path / "ref.pth").exists()
    evaluated = run_cli(no_server_env, "evaluate", str(manifest), "--config", str(config), "--checkpoint", str(folder),
                        timeout=300)
    _last_line_error(evaluated, "evaluate", f"{weights} is corrupt or truncated (SafetensorError: ")


def test_evaluate_names_a_damaged_released_checkpoint(manifest, config, tmp_path, no_server_env):
    released = tmp_path / "structxlip.pth"
    torch.save({"text_projection.weight": torch.zeros(64, 64)}, released)
    os.truncate(released, released.stat().st_size // 2)
    done = run_cli(no_server_env, "evaluate", str(manifest), "--config", str(config), "--checkpoint", str(released),
                   timeout=300)
    _last_line_error(done, "evaluate", f"{released} is corrupt or truncated", "not a readable checkpoint",
                     "re-export or re-download it")
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(os.urandom(4096))
    done = run_cli(no_server_env, "evaluate", str(manifest), "--config", str(config), "--checkpoint", str(noise),
                   timeout=300)
    _last_line_error(done, "evaluate", f"{noise} is corrupt or truncated (SafetensorError: ")


def test_train_resume_names_a_damaged_last_checkpoint(manifest, config, tmp_path, no_server_env):
    out = tmp_path / "run"
    first = run_cli(no_server_env, "train", str(manifest), "--out", str(out), "--config", str(config),
                    "--no-progress", timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    last = out / "train" / "checkpoints" / "last.pt"
    os.truncate(last, last.stat().st_size // 3)
    resumed = run_cli(no_server_env, "train", str(manifest), "--out", str(out), "--config", str(config), "--resume",
                      "--no-progress", timeout=600)
    _last_line_error(resumed, "train", f"{last} is corrupt or truncated, not a readable checkpoint",
                     "train without --resume to start afresh")

"""Strict config through the real CLI: booleans are not numbers, a batch holds at least two pairs, a training split
must fill one batch, an override's error names the override (never the config file), and ``structxlip evaluate``
without --config uses the config the output folder's run recorded, as ``run`` does."""

from __future__ import annotations

import json

import pytest
import yaml

from structxlip.app.synthetic import make_synthetic_manifest
from tests.hardening.conftest import DATA_STAGES, assert_one_line_error, run_cli

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=true", "--set train.batch_size=true: expected an integer, got a boolean (true)"),
    ("train.lr=false", "--set train.lr=false: expected a number, got a boolean (false)"),
    ("regions.max_regions=true", "--set regions.max_regions=true: expected an integer, got a boolean (true)"),
    ("ingest.follow_symlinks=0", "--set ingest.follow_symlinks=0: expected true or false, got 0"),
    ("train.batch_size=1", "--set train.batch_size=1: must be at least 2, got 1: the contrastive losses"),
    ("train.batchsize=4", "--set train.batchsize=4: unknown key"),
    ("structure.canny_low=900", "--set structure.canny_low=900: structure: canny_low (900.0) must not exceed "
                                "canny_high (200.0)"),
])
def test_run_refuses_a_bad_override_naming_it_not_the_config(override, expected, tmp_path, no_server_env):
    config = tmp_path / "good.yaml"
    config.write_text("model: {clip_model: structxlip/tiny-clip}\n")
    (tmp_path / "images").mkdir()
    out = tmp_path / "out"
    done = run_cli(no_server_env, "run", str(tmp_path / "images"), "--out", str(out), "--config", str(config),
                   "--stages", ",".join(DATA_STAGES), "--set", override, timeout=120)
    line = assert_one_line_error(done, "structxlip run: error:", expected)
    assert line == f"structxlip run: error: {expected}" or line.startswith(f"structxlip run: error: {expected}")
    assert str(config) not in line
    assert not out.exists()


def test_a_bad_value_in_the_file_names_the_file(tmp_path, no_server_env):
    config = tmp_path / "one.yaml"
    config.write_text("train: {batch_size: 1}\n")
    (tmp_path / "images").mkdir()
    done = run_cli(no_server_env, "run", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--config",
                   str(config), "--set", "train.epochs=2", timeout=120)
    assert_one_line_error(done, f"structxlip run: error: {config}: train.batch_size: must be at least 2, got 1")


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    # 5 images: 4 in the train split, 1 in test (the synthetic manifest's 80/20 split).
    return make_synthetic_manifest(tmp_path_factory.mktemp("small") / "data", n_images=5, image_size=32, seed=3)


def test_train_refuses_a_split_smaller_than_one_batch(small_manifest, tiny_clip_dir, tmp_path, no_server_env):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"clip_model": str(tiny_clip_dir)},
                                      "train": {"max_text_tokens": 77, "device": "cpu"}}))
    out = tmp_path / "run"
    done = run_cli(no_server_env, "train", str(small_manifest), "--out", str(out), "--config", str(config),
                   "--batch-size", "6", "--no-progress", timeout=300)
    line = assert_one_line_error(done, "structxlip train: error: the training split has 4 pair(s), fewer than one "
                                       "batch (train.batch_size=6): lower train.batch_size to at most 4")
    assert "Traceback" not in line
    assert not list(out.rglob("*.pt"))
    flag = run_cli(no_server_env, "train", str(small_manifest), "--out", str(out), "--config", str(config),
                   "--batch-size", "1", timeout=120)
    assert_one_line_error(flag, "structxlip train: error: --batch-size=1: must be at least 2, got 1")


def test_evaluate_without_config_uses_the_recorded_config(small_manifest, tiny_clip_dir, tmp_path, no_server_env):
    out = small_manifest.parent
    record = out / "config.yaml"
    # The default model is a hub id this machine cannot reach: only the recorded config makes this run work.
    record.write_text(yaml.safe_dump({"model": {"clip_model": str(tiny_clip_dir)}, "train": {"max_text_tokens": 77},
                                      "evaluate": {"split": "all", "device": "cpu"}}))
    try:
        done = run_cli(no_server_env, "evaluate", str(out), "--out", str(tmp_path / "m.json"), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((tmp_path / "m.json").read_text())["n_pairs"] == 5  # split "all" from the record
        override = run_cli(no_server_env, "evaluate", str(out), "--out", str(tmp_path / "t.json"), "--split", "train",
                           timeout=300)
        assert override.returncode == 0, override.stderr[-3000:]
        assert json.loads((tmp_path / "t.json").read_text())["n_pairs"] == 4  # the flag over the record
    finally:
        record.unlink()

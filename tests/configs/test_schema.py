"""Config validation: every problem is one line naming the file and the key, before any work starts."""

from pathlib import Path

import pytest

from configs import STAGES, ConfigError, load_config
from configs.schema import CONFIGS_DIR

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_yaml_has_published_defaults():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.model.clip_model == "openai/clip-vit-base-patch16"
    t = cfg.train
    assert (t.lr, t.weight_decay, t.epochs, t.batch_size) == (5e-6, 0.05, 10, 16)
    assert (t.lambda_global, t.lambda_structure_centric, t.lambda_consistency, t.lambda_local) == (1.0, 0.5, 0.05, 0.1)
    assert (t.warm, t.decay_start, t.decay_end) == (1, 1, 8)
    assert (t.floor_structure_centric, t.floor_consistency, t.floor_local) == (0.7, 0.5, 0.4)
    assert (t.chunk_top_k, t.chunk_base_window, t.chunk_stride, t.chunk_tau) == (3, 3, 1, 0.07)
    assert (t.local_pooling, t.drop_last) == ("filtered", True)
    assert (t.logit_scale_min, t.logit_scale_max, t.max_text_tokens) == (0.0, 3.5, 248)
    assert (cfg.structure.canny_low, cfg.structure.canny_high, cfg.structure.long_side) == (100, 200, 512)
    assert (cfg.regions.min_area_fraction, cfg.regions.max_area_fraction) == (0.01, 0.80)


def test_yaml_defaults_equal_schema_defaults():
    # default.yaml spells out the published numbers; it must not drift from the code's defaults.
    assert load_config(REPO / "configs" / "default.yaml") == load_config(None)


def test_demo_yaml_uses_tiny_offline_model():
    assert load_config(REPO / "configs" / "demo.yaml").model.clip_model == "structxlip/tiny-clip"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  batch_size: -1\n", "train.batch_size: Input should be greater than 0 (got -1)"),
        ("train:\n  bogus: 1\n", "train.bogus: unknown key"),
        ("nonsense: {}\n", "nonsense: unknown key"),
        ("structure:\n  canny_low: abc\n", "structure.canny_low: Input should be a valid number"),
        ("regions:\n  sam_checkpoint: /definitely/missing.pth\n", "regions.sam_checkpoint: Value error, SAM checkpoint not found"),
        ("structure:\n  canny_low: 300\n  canny_high: 200\n", "structure: Value error, canny_low (300.0) must not exceed"),
        ("- just\n- a list\n", "expected a mapping of sections"),
        ("train: [unclosed\n", "invalid YAML at line"),
    ],
)
def test_invalid_config_is_one_line_naming_file_and_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_validated(tmp_path):
    cfg = load_config(None, overrides={"train.epochs": 3, "structure.canny_low": 50})
    assert cfg.train.epochs == 3 and cfg.structure.canny_low == 50
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, overrides={"train.epochs": 0})


def test_vocab_dir_exists_and_stage_names():
    assert (CONFIGS_DIR / "vocab").is_dir()
    assert STAGES == ("ingest", "structure", "regions", "captions", "filter", "manifest", "train", "evaluate")

"""Config validation: every problem is one line naming the file and the key, before any work starts."""

from pathlib import Path

import pytest

from configs import ConfigError, load_config, validate_overrides
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
        ("train:\n  batch_size: -1\n", "train.batch_size: must be at least 2, got -1"),
        ("captions:\n  batch_size: -1\n", "captions.batch_size: Input should be greater than 0 (got -1)"),
        ("train:\n  bogus: 1\n", "train.bogus: unknown key"),
        ("nonsense: {}\n", "nonsense: unknown key"),
        ("structure:\n  canny_low: abc\n", "structure.canny_low: expected a number (got 'abc')"),
        ("regions:\n  sam_checkpoint: /definitely/missing.pth\n", "regions.sam_checkpoint: SAM checkpoint not found"),
        ("structure:\n  canny_low: 300\n  canny_high: 200\n", "structure: canny_low (300.0) must not exceed"),
        ("train:\n  batch_size: true\n", "train.batch_size: expected an integer, got a boolean (true)"),
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
    from pipelines.engine.stages import STAGE_DEFINITIONS

    assert (CONFIGS_DIR / "vocab").is_dir()
    assert tuple(STAGE_DEFINITIONS) == ("ingest", "structure", "regions", "captions", "filter", "manifest", "train",
                                        "evaluate")


# ---- issue 14: NaN/inf, upper bounds, alias bombs, error length ------------------------------------------------------
def _float_fields(model, prefix=""):
    """Yield the dotted key of every float field (also dict-of-float and optional float) of a config model."""
    import typing

    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        annotation = info.annotation
        args = typing.get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _float_fields(annotation, f"{prefix}{name}.")
        elif typing.get_origin(annotation) is dict and args[1] is float:
            yield f"{prefix}{name}.train"  # a float value inside the mapping
        elif annotation is float or float in args:
            yield f"{prefix}{name}"


def _yaml_for(dotted: str, value: str) -> str:
    *parents, leaf = dotted.split(".")
    text, indent = "", ""
    for parent in parents:
        text += f"{indent}{parent}:\n"
        indent += "  "
    return text + f"{indent}{leaf}: {value}\n"


def test_every_float_field_is_listed():
    from configs.schema import Config

    fields = set(_float_fields(Config))
    assert {"train.lr", "structure.scribble.sigma", "manifest.split_ratios.train", "ingest.max_aspect_ratio",
            "regions.nms_iou", "train.chunk_tau"} <= fields and len(fields) >= 20  # the walk reaches nested models


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_and_inf_are_refused_for_every_float(tmp_path, value):
    from configs.schema import Config

    for dotted in _float_fields(Config):
        path = _write(tmp_path, _yaml_for(dotted, value))
        with pytest.raises(ConfigError, match="finite number") as caught:
            load_config(path)
        assert dotted in str(caught.value), str(caught.value)


def test_nan_split_ratios_no_longer_reach_the_manifest(tmp_path):
    # NaN passes "v < 0" and "abs(sum - 1) > 1e-6" alike: it used to crash the manifest stage with StopIteration.
    path = _write(tmp_path, "manifest:\n  split_ratios: {train: .nan, val: 0.5, test: 0.5}\n")
    with pytest.raises(ConfigError, match=r"manifest.split_ratios.train: expected a finite number \(got nan\)"):
        load_config(path)


@pytest.mark.parametrize("key, too_big, limit", [
    ("train.max_text_tokens", 249, 248),  # Long-CLIP's stretch of CLIP's 77 positions
    ("structure.long_side", 8193, 8192),
    ("regions.max_regions", 257, 256),
    ("train.epochs", 10_001, 10_000),
    ("train.keep_positions", 78, 77),
    ("ingest.max_pixels", 2**34 + 1, 2**34),
])
def test_upper_bounds(tmp_path, key, too_big, limit):
    with pytest.raises(ConfigError, match=f"{key}: Input should be less than or equal to {limit}"):
        load_config(_write(tmp_path, _yaml_for(key, str(too_big))))
    assert load_config(_write(tmp_path, _yaml_for(key, str(limit))))  # the limit itself is allowed


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    # "Billion laughs": 9 levels of 9 aliases each expand to 9**9 (~3.9e8) strings; composing it is cheap, walking or
    # printing it is not. It must be refused from the document's structure, with one short line.
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    previous = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
        previous = name
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, "\n".join(lines) + "\n"))
    message = str(caught.value)
    assert "expands to more than 100000 values through aliases" in message and len(message) <= 300


def test_small_aliases_still_work_and_a_recursive_one_is_refused(tmp_path):
    config = load_config(_write(tmp_path, "evaluate: &shared {batch_size: 8}\ncaptions: {batch_size: 8}\n"
                                          "x-unused: *shared\n".replace("x-unused: *shared\n", "")))
    assert config.evaluate.batch_size == 8
    with pytest.raises(ConfigError, match="recursive YAML alias"):
        load_config(_write(tmp_path, "train: &loop [*loop]\n"))


@pytest.mark.parametrize("text", [
    "train:\n  device: " + "x" * 5000 + "\n  epochs: -1\n",
    "train:\n  " + "k" * 5000 + ": 1\n",
    "train:\n  epochs: [" + ", ".join(["1"] * 5000) + "]\n",
    "train:\n  epochs: \"" + "line\\n" * 2000 + "\"\n",
    "structure:\n  extra_maps: [" + ", ".join(["bogus"] * 3000) + "]\n",
])
def test_every_error_is_one_line_of_at_most_300_characters(tmp_path, text):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    message = str(caught.value)
    assert "\n" not in message and len(message) <= 300, (len(message), message[:400])
    assert message.startswith(str(tmp_path / "cfg.yaml"))


# ---- strict types: booleans are not numbers, numbers are not booleans ----------------------------------------------


@pytest.mark.parametrize("dotted, value, expected", [
    ("train.batch_size", True, "expected an integer, got a boolean (true)"),
    ("train.epochs", False, "expected an integer, got a boolean (false)"),
    ("train.lr", True, "expected a number, got a boolean (true)"),
    ("structure.scribble.sigma", True, "expected a number, got a boolean (true)"),  # a nested section
    ("ingest.max_aspect_ratio", True, "expected a number, got a boolean (true)"),  # float | None
    ("runtime.chunk_size", True, "expected an integer, got a boolean (true)"),  # int | "auto"
    ("manifest.split_ratios", {"train": True, "val": 0.0, "test": 0.0}, "expected a number, got a boolean"),
    ("ingest.follow_symlinks", 1, "expected true or false, got 1"),
    ("captions.include_full_image", 0, "expected true or false, got 0"),
])
def test_booleans_and_numbers_do_not_stand_in_for_each_other(dotted, value, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, {dotted: value})
    assert expected in str(info.value)


def test_yaml_integers_still_fill_number_fields(tmp_path):
    path = _write(tmp_path, "train: {lr: 1, weight_decay: 0}\nmanifest: {split_ratios: {train: 1, val: 0, test: 0}}\n"
                            "structure: {canny_low: 10, canny_high: 20}\ningest: {follow_symlinks: false}\n")
    config = load_config(path)
    assert (config.train.lr, config.train.weight_decay, config.structure.canny_low) == (1.0, 0.0, 10.0)
    assert isinstance(config.train.lr, float) and config.manifest.split_ratios["train"] == 1.0
    assert config.ingest.follow_symlinks is False


@pytest.mark.parametrize("size, ok", [(-3, False), (0, False), (1, False), (2, True), (3, True)])
def test_a_training_batch_holds_at_least_two_pairs(size, ok):
    if ok:
        assert load_config(None, {"train.batch_size": size}).train.batch_size == size
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, {"train.batch_size": size})
    assert str(info.value).startswith(f"--set train.batch_size={size}: must be at least 2, got {size}: ")
    assert "a batch of 1 learns nothing" in str(info.value)


# ---- override errors name the override, file errors the file ------------------------------------------------------


def test_an_override_error_names_the_override_and_never_the_file(tmp_path):
    path = _write(tmp_path, "train: {epochs: 2}\n")
    cases = {
        "train.batch_size": (True, "--set train.batch_size=true: expected an integer, got a boolean (true)"),
        "train.lr": ("fast", "--set train.lr=fast: expected a number (got 'fast')"),
        "train.batchsize": (4, "--set train.batchsize=4: unknown key"),
        "trian.epochs": (4, "--set trian.epochs=4: trian: unknown key"),
        "structure.canny_low": (500, "--set structure.canny_low=500: structure: canny_low (500.0) must not exceed "
                                     "canny_high (200.0)"),
        "train.epochs.deep": (1, "--set train.epochs.deep=1: epochs is not a section"),
    }
    for dotted, (value, expected) in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(path, {dotted: value})
        assert str(info.value) == expected
        assert str(path) not in str(info.value)


def test_the_file_is_blamed_only_for_its_own_errors(tmp_path):
    bad = _write(tmp_path, "structure: {canny_low: 300, canny_high: 200}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, {"train.epochs": 3})  # an unrelated, valid override
    assert str(info.value) == f"{bad}: structure: canny_low (300.0) must not exceed canny_high (200.0)"
    # An override that repairs the file's combination is accepted.
    assert load_config(bad, {"structure.canny_high": 400}).structure.canny_high == 400


def test_override_sources_and_shapes():
    with pytest.raises(ConfigError) as info:
        load_config(None, {"train.batch_size": True}, overrides_source="overrides")
    assert str(info.value) == "overrides train.batch_size=true: expected an integer, got a boolean (true)"
    with pytest.raises(ConfigError) as info:  # a command's own flags, named as the user typed them
        load_config(None, {"train.batch_size": 1}, overrides_source={"train.batch_size": "--batch-size"})
    assert str(info.value).startswith("--batch-size=1: must be at least 2, got 1")
    for overrides, expected in [
        (["train.epochs=3"], "overrides: expected a mapping of section.key to value, got list"),
        ({"epochs": 3}, "overrides epochs=3: expected SECTION.KEY=VALUE, e.g. structure.canny_low=50"),
        ({"train..epochs": 3}, "overrides train..epochs=3: expected SECTION.KEY=VALUE"),
        ({"train.epochs.x": 3, "train": 1}, "overrides train=1: expected SECTION.KEY=VALUE"),
    ]:
        with pytest.raises(ConfigError) as info:
            validate_overrides(overrides, source="overrides")
        assert str(info.value).startswith(expected)
    assert validate_overrides({"train.epochs": 3}) == {"train.epochs": 3} and validate_overrides(None) == {}

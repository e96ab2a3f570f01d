"""Typed configuration: YAML validated into pydantic models; any problem is one line naming the file and key.

Deeper code never receives a ``Config``: entry points pass explicit keyword arguments taken from its sections.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

CONFIGS_DIR = Path(__file__).resolve().parent
TINY_CLIP = "structxlip/tiny-clip"
MAX_ERROR_CHARS = 300  # every ConfigError is one line of at most this many characters
# A YAML document may not expand (aliases followed) to more values than this: a config is a few hundred values, and
# "billion laughs" alias bombs expand exponentially.
MAX_YAML_VALUES = 100_000
# Long-CLIP's stretch of CLIP's 77 text positions (keep 20): 4 * 77 - 3 * 20.
MAX_TEXT_TOKENS = 248


class ConfigError(ValueError):
    """A configuration file or override is unreadable or invalid; the message is one line naming where it came from."""


def _allows_bool(annotation: Any) -> bool:
    """Return whether a field's type accepts a boolean anywhere (``bool``, ``bool | None``, ``list[bool]``...)."""
    if annotation is bool:
        return True
    return any(_allows_bool(arg) for arg in typing.get_args(annotation) if not isinstance(arg, (str, int, float)))


def _only_bool(annotation: Any) -> bool:
    """Return whether a field is a plain flag (``bool`` or ``bool | None``)."""
    return annotation is bool or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                  and set(typing.get_args(annotation)) == {bool, type(None)})


def _holds_bool(value: Any, annotation: Any) -> bool:
    """Return whether ``value`` is a boolean, or holds one where ``annotation`` is a list or mapping of values."""
    if isinstance(value, bool):
        return True
    origin = typing.get_origin(annotation)
    if origin is None or not typing.get_args(annotation):
        return False
    if origin in (typing.Union, types.UnionType):
        return any(_holds_bool(value, arg) for arg in typing.get_args(annotation))
    if origin is dict and isinstance(value, dict):
        return any(_holds_bool(v, typing.get_args(annotation)[-1]) for v in value.values())
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return any(_holds_bool(v, typing.get_args(annotation)[0]) for v in value)
    return False


def _expected(annotation: Any) -> str:
    """What a non-boolean field expects, in words (for the message that refuses a boolean)."""
    return next((words for name, words in (("float", "a number"), ("int", "an integer"), ("str", "a string"))
                 if name in str(annotation)), "a value of its type")


class _Section(BaseModel):
    # allow_inf_nan=False: NaN or inf is refused for every float (NaN passes every "ge"/"le" comparison).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1 for an int or float field: `--set train.batch_size=true` would
        # silently train with batch size 1. A YAML int still fills a float field (lr: 1 is 1.0).
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        if not _allows_bool(field.annotation) and _holds_bool(value, field.annotation):
            raise ValueError(f"expected {_expected(field.annotation)}, got a boolean ({_value_text(value)})")
        if _only_bool(field.annotation) and value is not None and not isinstance(value, bool):
            # and numbers are not booleans: follow_symlinks: 0 is a slip, not a flag
            raise ValueError(f"expected true or false, got {_value_text(value)}")
        return value


class ModelConfig(_Section):
    # A hub id, a local folder in Hugging Face format, or "structxlip/tiny-clip" (a tiny random CLIP built locally).
    clip_model: str = "openai/clip-vit-base-patch16"


class IngestConfig(_Section):
    extensions: list[str] = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"]
    # Decompression-bomb guard: images with more pixels than this are recorded as failed.
    max_pixels: int = Field(default=178_956_970, gt=0, le=2**34)
    # Long side / short side above this: recorded as failed at ingest (CLIP sees a centre square). null: no limit.
    max_aspect_ratio: float | None = Field(default=20.0, ge=1, le=1e6)
    # Files larger than this are recorded as failed from their size alone, never read (256 MiB: no real photo).
    max_file_bytes: int = Field(default=268_435_456, gt=0, le=2**53)
    follow_symlinks: bool = True


class ScribbleConfig(_Section):
    sigma: float = Field(default=3.0, gt=0)
    threshold: float = Field(default=0.1, ge=0, le=1)
    final_sigma: float = Field(default=1.0, ge=0)


class StructureConfig(_Section):
    backend: Literal["auto", "opencv", "kornia"] = "auto"
    long_side: int = Field(default=512, gt=0, le=8192)
    canny_low: float = Field(default=100.0, ge=0)
    canny_high: float = Field(default=200.0, ge=0)
    extra_maps: list[Literal["log", "sobel"]] = []
    scribble: ScribbleConfig = ScribbleConfig()
    batch_size: int = Field(default=32, gt=0, le=65536)  # images per GPU batch (kornia backend)

    @model_validator(mode="after")
    def _thresholds_ordered(self):
        if self.canny_low > self.canny_high:
            raise ValueError(f"canny_low ({self.canny_low}) must not exceed canny_high ({self.canny_high})")
        return self


class RegionsConfig(_Section):
    # auto: SAM when sam_model or sam_checkpoint is set, else grouping (pipelines.steps.regions.resolve_region_method)
    method: Literal["auto", "sam", "grouping", "structure"] = "auto"
    sam_model: str | None = None  # transformers SAM / SAM-HQ / SAM 2: a hub id (facebook/sam-vit-base) or local folder
    sam_model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_b"  # segment-anything checkpoints only
    sam_checkpoint: str | None = None  # segment-anything: local path or hf://REPO/FILE
    points_per_side: int = Field(default=32, gt=0, le=256)
    points_per_batch: int = Field(default=64, gt=0, le=65536)
    min_area_fraction: float = Field(default=0.01, ge=0, le=1)
    max_area_fraction: float = Field(default=0.80, ge=0, le=1)
    max_regions: int = Field(default=16, gt=0, le=256)
    nms_iou: float = Field(default=0.7, gt=0, le=1)
    max_side: int = Field(default=2048, gt=0, le=16384)
    device: str = "auto"

    @field_validator("sam_checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value):
        if value and not value.startswith("hf://") and not Path(value).expanduser().exists():
            raise ValueError(f"SAM checkpoint not found: {value}")
        return value

    @model_validator(mode="after")
    def _one_sam_source(self):
        if self.sam_model and self.sam_checkpoint:
            raise ValueError(
                f"set regions.sam_model ({self.sam_model}) or regions.sam_checkpoint ({self.sam_checkpoint}), not both"
            )
        return self


class CaptionsConfig(_Section):
    clip_model: str | None = None  # defaults to model.clip_model
    batch_size: int = Field(default=64, gt=0, le=65536)
    device: str = "auto"
    include_full_image: bool = True
    captioner: str | None = None  # transformers image-to-text model id for images without a caption
    caption_regions: bool = False  # also caption each region with the captioner
    max_new_tokens: int = Field(default=40, gt=0, le=1024)


class FilterConfig(_Section):
    spacy_model: str = "en_core_web_sm"
    remove_colors: bool = True
    remove_materials: bool = False
    remove_textures: bool = False
    remove_domain: bool = False
    vocab_dir: str = str(CONFIGS_DIR / "vocab")
    # Captions per spaCy batch. 64 rather than 256: the same output, and on 1,000 demo images (2 workers, 2 cores)
    # the filter stage took 5.2-5.6 s instead of 8.0-9.7 s, 10.7-11.3 CPU-s instead of 15.4-18.4, with a peak tree
    # PSS of ~585 MB instead of ~900 (a batch's activations stay in the caches, and fewer fresh pages are touched).
    batch_size: int = Field(default=64, gt=0, le=65536)
    min_content_words: int = Field(default=2, ge=0, le=1000)
    max_hard_negatives: int = Field(default=3, ge=0, le=1000)

    @field_validator("vocab_dir")
    @classmethod
    def _vocab_exists(cls, value):
        if not Path(value).expanduser().is_dir():
            raise ValueError(f"vocabulary folder not found: {value}")
        return value


class ManifestConfig(_Section):
    split_ratios: dict[Literal["train", "val", "test"], float] = {"train": 0.8, "val": 0.1, "test": 0.1}

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, value):
        if any(v < 0 for v in value.values()) or abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"split ratios must be >= 0 and sum to 1, got {value}")
        return value


class TrainConfig(_Section):
    epochs: int = Field(default=10, gt=0, le=10_000)
    # At least 2: every contrastive loss compares a pair with the rest of its batch, and a batch of 1 has no rest
    # (each loss is 0 at every step while the run reports success).
    batch_size: int = Field(default=16, le=65536)
    lr: float = Field(default=5e-6, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    lambda_global: float = Field(default=1.0, ge=0)
    lambda_structure_centric: float = Field(default=0.5, ge=0)
    lambda_consistency: float = Field(default=0.05, ge=0)
    lambda_local: float = Field(default=0.1, ge=0)
    lambda_hard_negative: float = Field(default=0.0, ge=0)
    warm: int = Field(default=1, ge=0, le=10_000)
    decay_start: int = Field(default=1, ge=0, le=10_000)
    decay_end: int = Field(default=8, ge=0, le=10_000)
    floor_structure_centric: float = Field(default=0.7, ge=0, le=1)
    floor_consistency: float = Field(default=0.5, ge=0, le=1)
    floor_local: float = Field(default=0.4, ge=0, le=1)
    warmup_structure_epochs: int = Field(default=0, ge=0, le=10_000)
    chunk_top_k: int = Field(default=3, gt=0, le=1024)
    chunk_base_window: int = Field(default=3, gt=0, le=MAX_TEXT_TOKENS)
    chunk_stride: int = Field(default=1, gt=0, le=MAX_TEXT_TOKENS)
    chunk_tau: float = Field(default=0.07, gt=0, le=100)
    max_chunks: int = Field(default=64, gt=0, le=4096)
    # "filtered": chunks pool the filtered caption's own token states (the intended fix); "reference": the
    # unfiltered caption's states at the filtered caption's spans, as the reference trainer does (METHOD.md 4).
    local_pooling: Literal["filtered", "reference"] = "filtered"
    drop_last: bool = True  # drop an epoch's last partial batch, as the reference's DataLoader does
    # log of CLIP's logit scale; CLIP itself clamps the scale at 100 = exp(4.605)
    logit_scale_min: float = Field(default=0.0, ge=-10, le=10)
    logit_scale_max: float = Field(default=3.5, ge=-10, le=10)
    max_text_tokens: int = Field(default=MAX_TEXT_TOKENS, gt=0, le=MAX_TEXT_TOKENS)
    keep_positions: int = Field(default=20, ge=0, le=77)
    structure_kind: Literal["canny", "scribble"] = "canny"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: str = "auto"
    num_workers: int = Field(default=0, ge=0, le=1024)
    checkpoint_every_steps: int = Field(default=0, ge=0)  # 0 = only at the end of each epoch
    # DDP processes of the pipeline's train stage (torchrun: one per GPU; gloo on CPU). batch_size is per process.
    nproc: int = Field(default=1, ge=1, le=1024)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)

    @field_validator("batch_size", mode="after")
    @classmethod
    def _a_batch_to_contrast(cls, value: int) -> int:
        if value < 2:  # (the Field's ge=2 documents it; this says why)
            raise ValueError(f"must be at least 2, got {value}: the contrastive losses compare each pair with the "
                             "others in its batch, so a batch of 1 learns nothing")
        return value

    @model_validator(mode="after")
    def _ordered(self):
        if self.decay_end < self.decay_start:
            raise ValueError(f"decay_end ({self.decay_end}) must be >= decay_start ({self.decay_start})")
        if self.logit_scale_max < self.logit_scale_min:
            raise ValueError("logit_scale_max must be >= logit_scale_min")
        return self


class EvaluateConfig(_Section):
    split: Literal["train", "val", "test", "all"] = "test"
    zero_shot: bool = True  # also evaluate the base model before fine-tuning (metrics["zero_shot"])
    batch_size: int = Field(default=64, gt=0, le=65536)
    device: str = "auto"


class RuntimeConfig(_Section):
    # Worker processes of the CPU data stages on this machine (0 = one per usable core, 1 = in the calling process):
    # the one layer of data parallelism. Each worker runs torch/OpenCV with its share of the cores.
    workers: int = Field(default=0, ge=0, le=1024)
    # Items per chunk (one task, one stored part): "auto" sizes chunks from the pending count and the workers.
    chunk_size: Annotated[int, Field(gt=0, le=1_000_000)] | Literal["auto"] = "auto"
    runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None
    dask_workers: int = Field(default=2, gt=0, le=1024)
    task_retries: int = Field(default=1, ge=0, le=100)


class Config(_Section):
    # Stage plugin files (configs.plugins): each adds its stage and a config section of that stage's name. Relative
    # paths are resolved against the config file's folder when it is loaded.
    plugins: list[str] = []
    model: ModelConfig = ModelConfig()
    ingest: IngestConfig = IngestConfig()
    structure: StructureConfig = StructureConfig()
    regions: RegionsConfig = RegionsConfig()
    captions: CaptionsConfig = CaptionsConfig()
    filter: FilterConfig = FilterConfig()
    manifest: ManifestConfig = ManifestConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @property
    def scoring_model(self) -> str:
        """CLIP used to score crops against sentences (captions.clip_model, else model.clip_model)."""
        return self.captions.clip_model or self.model.clip_model


def _one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Return ``text`` on one line, cut to ``limit`` characters (with an ellipsis when cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# pydantic's wording for the common type errors, said as what was expected.
_EXPECTED = {"int_parsing": "expected an integer", "int_type": "expected an integer",
             "int_from_float": "expected an integer", "float_parsing": "expected a number",
             "float_type": "expected a number", "bool_parsing": "expected true or false",
             "bool_type": "expected true or false", "string_type": "expected a string",
             "finite_number": "expected a finite number", "dict_type": "expected a mapping",
             "list_type": "expected a list"}


def _error_message(first: dict) -> str:
    """Return one pydantic error as ``message (got input)``: what was expected and what came."""
    message = _EXPECTED.get(first["type"], first["msg"])
    if first["type"] == "extra_forbidden":
        return "unknown key"
    if first["type"] == "value_error":  # our own validators' messages already say what came
        return message.removeprefix("Value error, ")
    if "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        message = f"{message} (got {_one_line(repr(first['input']), 80)})"
    return message


def _format_error(source: str, error: ValidationError) -> str:
    first = error.errors()[0]
    key = _one_line(".".join(str(p) for p in first["loc"]) or "<root>", 80)
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return _one_line(f"{source}: {key}: {_error_message(first)}{more}")


def _value_text(value: Any) -> str:
    """An override's value as it is written after ``=`` (YAML scalars: true, null, 3, text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
    except yaml.YAMLError:
        return repr(value)


def _override_label(source: str | Mapping[str, str], key: str, value: Any) -> str:
    """How the user wrote one override: ``--set train.batch_size=true``, ``overrides train.lr=0``, or the flag a
    command maps the key to (``--batch-size=1``)."""
    label = source.get(key, f"--set {key}") if isinstance(source, Mapping) else f"{source} {key}"
    return _one_line(f"{label}={_value_text(value)}", 120)


def validate_overrides(overrides: Any, *, source: str | Mapping[str, str] = "overrides") -> dict[str, Any]:
    """Return ``overrides`` as ``{"section.key": value}`` after checking its shape (a mapping of dotted keys to
    YAML/JSON values); raise ConfigError naming ``source`` and the override. The values are checked against the
    config by ``load_config(path, overrides, overrides_source=source)``."""
    label = source if isinstance(source, str) else "overrides"
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(_one_line(f"{label}: expected a mapping of section.key to value, got "
                                    f"{type(overrides).__name__}"))
    checked: dict[str, Any] = {}
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if not isinstance(dotted, str) or len(parts) < 2 or not all(p.strip() for p in parts):
            raise ConfigError(_one_line(f"{_override_label(source, str(dotted), value)}: expected SECTION.KEY=VALUE, "
                                        "e.g. structure.canny_low=50"))
        checked[dotted] = value
    return checked


def _override_at(loc: tuple, overrides: dict[str, Any]) -> str | None:
    """Return the override an error at ``loc`` is about: the one at that key or inside it, else one under it (an
    error of a whole section, e.g. canny_low > canny_high, is about an override in that section)."""
    path = [str(p) for p in loc]
    for dotted in overrides:
        parts = dotted.split(".")
        if path[: len(parts)] == parts or parts[: len(path)] == path and path:
            return dotted
    return None


def _expanded_size(node: yaml.Node, sizes: dict[int, int], active: set[int]) -> int:
    """Return how many values ``node`` stands for once aliases are followed (memoised: an alias bomb is counted
    in time linear in the document, not in its expansion)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise ConfigError("recursive YAML alias")
    active.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, active)
        if total > MAX_YAML_VALUES:
            break
    active.discard(key)
    sizes[key] = total
    return total


def _safe_load(text: str):
    """Return ``yaml.safe_load(text)``, refusing documents whose aliases expand beyond MAX_YAML_VALUES values."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            raise ConfigError(f"YAML expands to more than {MAX_YAML_VALUES} values through aliases (&anchor/*alias); "
                              "a config has a few hundred")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None, *,
                overrides_source: str | Mapping[str, str] = "--set") -> Config:
    """Return the validated config from a YAML file (defaults when ``path`` is None) with ``overrides``
    (``{"section.key": value}``) applied; raise ConfigError on any problem.

    Every ConfigError message is one line of at most MAX_ERROR_CHARS characters. A problem in an override names
    the override as the user wrote it (``overrides_source``: ``--set`` on the command line, ``overrides`` for a
    flow parameter, or a mapping of key to command-line flag), e.g. ``--set train.batch_size=true: expected an
    integer, got a boolean``, never the file; a problem of the file alone names the file.
    """
    source = "<defaults>"
    data: dict = {}
    if path is not None:
        source = _one_line(str(path), 120)
        data = _read_config_file(Path(path), source)
    overrides = validate_overrides(overrides, source=overrides_source)
    file_data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for name in parents:
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise ConfigError(_one_line(f"{_override_label(overrides_source, dotted, value)}: {name} is not a "
                                            "section"))
            node = child
        node[leaf] = value
    _resolve_plugin_paths(data, Path.cwd())  # a --set plugins=[...] names files relative to where it is typed
    model = _config_model(data.get("plugins"), source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        if not overrides:
            raise ConfigError(_format_error(source, exc)) from None
        first = exc.errors()[0]
        culprit = _override_at(first["loc"], overrides)
        if culprit is None:  # not at an overridden key: the file's own error, unless the file alone is valid
            try:
                model.model_validate(file_data)
            except ValidationError as file_exc:
                raise ConfigError(_format_error(source, file_exc)) from None
            culprit = next(iter(overrides))
        key = ".".join(str(p) for p in first["loc"])
        where = "" if key == culprit else f"{key}: "
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        label = _override_label(overrides_source, culprit, overrides[culprit])
        raise ConfigError(_one_line(f"{label}: {where}{_error_message(first)}{more}")) from None


def _read_config_file(path: Path, source: str, extended_by: tuple[Path, ...] = ()) -> dict:
    """Return the mapping of a YAML config file, its plugin paths made absolute and merged over the file it
    ``extends:`` (a path relative to it: its sections are the defaults here, key by key); raise ConfigError naming
    ``source``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(_one_line(f"{source}: cannot read config file ({exc.__class__.__name__}: {exc})")) from None
    try:
        data = _safe_load(text) or {}
    except ConfigError as exc:
        raise ConfigError(_one_line(f"{source}: invalid YAML: {exc}")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(_one_line(f"{source}: invalid YAML{where}: {getattr(exc, 'problem', exc)}")) from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    folder = path.expanduser().resolve().parent
    _resolve_plugin_paths(data, folder)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(_one_line(f"{source}: extends: expected the path of a config file, got {base!r}"))
    base_path = (folder / Path(base).expanduser()).resolve()
    if base_path in extended_by or len(extended_by) > 8:
        raise ConfigError(_one_line(f"{source}: extends: {base} extends this file again (a loop)"))
    merged = _read_config_file(base_path, _one_line(f"{source}: extends {base}", 160), (*extended_by, folder / path.name))
    return _merged(merged, data)


def _merged(base: dict, override: dict) -> dict:
    """Return ``base`` with ``override`` laid over it, mappings merged key by key (other values replaced)."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _resolve_plugin_paths(data: dict, folder: Path) -> None:
    """Make the relative paths of ``data["plugins"]`` absolute, relative to ``folder`` (other values are left for the
    validation to refuse)."""
    plugins = data.get("plugins")
    if isinstance(plugins, list):
        data["plugins"] = [str((folder / Path(p).expanduser()).resolve()) if isinstance(p, str) and p else p
                           for p in plugins]


_plugin_configs: dict[tuple, type[Config]] = {}


def _config_model(plugins: Any, source: str) -> type[Config]:
    """Return ``Config``, or with ``plugins`` (a list of plugin files) a subclass with one section per plugin stage,
    validated by that stage's ``Params`` model; raise ConfigError (one line) for a plugin that cannot be used."""
    if not plugins or not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        return Config
    from configs.plugins import PluginError, plugin_sections

    try:
        sections = plugin_sections(plugins)
    except PluginError as exc:
        raise ConfigError(_one_line(f"{source}: plugins: {exc}")) from None
    taken = [name for name in sections if name in Config.model_fields]
    if taken:
        raise ConfigError(_one_line(f"{source}: plugins: stage {taken[0]!r} has the name of a built-in config section; "
                                    "rename the plugin's stage"))
    key = tuple(sections.items())
    if key not in _plugin_configs:
        fields = {name: (params, ... if any(field.is_required() for field in params.model_fields.values())
                         else Field(default_factory=params)) for name, params in sections.items()}
        _plugin_configs[key] = create_model("Config", __base__=Config, **fields)
    return _plugin_configs[key]

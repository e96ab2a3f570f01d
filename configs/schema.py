"""Typed configuration: YAML validated into pydantic models; any problem is one line naming the file and key.

Deeper code never receives a ``Config``: entry points pass explicit keyword arguments taken from its sections.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES = ("ingest", "structure", "regions", "captions", "filter", "manifest", "train", "evaluate")
DATA_STAGES = STAGES[:6]
CONFIGS_DIR = Path(__file__).resolve().parent
TINY_CLIP = "structxlip/tiny-clip"
MAX_ERROR_CHARS = 300  # every ConfigError is one line of at most this many characters
# A YAML document may not expand (aliases followed) to more values than this: a config is a few hundred values, and
# "billion laughs" alias bombs expand exponentially.
MAX_YAML_VALUES = 100_000
# Long-CLIP's stretch of CLIP's 77 text positions (keep 20): 4 * 77 - 3 * 20.
MAX_TEXT_TOKENS = 248


class ConfigError(ValueError):
    """A configuration file is unreadable or invalid; the message is one line."""


class _Section(BaseModel):
    # allow_inf_nan=False: NaN or inf is refused for every float (NaN passes every "ge"/"le" comparison).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    # auto: SAM when sam_model or sam_checkpoint is set, else grouping (pipelines.regions.resolve_region_method)
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
    batch_size: int = Field(default=256, gt=0, le=65536)
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
    batch_size: int = Field(default=16, gt=0, le=65536)
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
    seed: int = Field(default=0, ge=0, le=2**63 - 1)

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


def _format_error(source: str, error: ValidationError) -> str:
    first = error.errors()[0]
    key = _one_line(".".join(str(p) for p in first["loc"]) or "<root>", 80)
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        message = f"{message} (got {_one_line(repr(first['input']), 80)})"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return _one_line(f"{source}: {key}: {message}{more}")


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


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> Config:
    """Return the validated config from a YAML file (defaults when ``path`` is None); raise ConfigError on any problem.

    Every ConfigError message is one line of at most MAX_ERROR_CHARS characters.
    """
    source = "<defaults>"
    data: dict = {}
    if path is not None:
        source = _one_line(str(path), 120)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(_one_line(f"{source}: cannot read config file ({exc.__class__.__name__}: {exc})")) \
                from None
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
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None

"""Typed configuration: YAML validated into pydantic models; any problem is one line naming the file and key.

Deeper code never receives a ``Config``: entry points pass explicit keyword arguments taken from its sections.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES = ("ingest", "structure", "regions", "captions", "filter", "manifest", "train", "evaluate")
DATA_STAGES = STAGES[:6]
CONFIGS_DIR = Path(__file__).resolve().parent
TINY_CLIP = "structxlip/tiny-clip"


class ConfigError(ValueError):
    """A configuration file is unreadable or invalid; the message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # A hub id, a local folder in Hugging Face format, or "structxlip/tiny-clip" (a tiny random CLIP built locally).
    clip_model: str = "openai/clip-vit-base-patch16"


class IngestConfig(_Section):
    extensions: list[str] = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"]
    # Decompression-bomb guard: images with more pixels than this are recorded as failed.
    max_pixels: int = Field(default=178_956_970, gt=0)
    follow_symlinks: bool = True


class ScribbleConfig(_Section):
    sigma: float = Field(default=3.0, gt=0)
    threshold: float = Field(default=0.1, ge=0, le=1)
    final_sigma: float = Field(default=1.0, ge=0)


class StructureConfig(_Section):
    backend: Literal["auto", "opencv", "kornia"] = "auto"
    long_side: int = Field(default=512, gt=0)
    canny_low: float = Field(default=100.0, ge=0)
    canny_high: float = Field(default=200.0, ge=0)
    extra_maps: list[Literal["log", "sobel"]] = []
    scribble: ScribbleConfig = ScribbleConfig()
    workers: int = Field(default=0, ge=0)  # 0 = one per CPU core
    batch_size: int = Field(default=32, gt=0)  # images per GPU batch (kornia backend)

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
    points_per_side: int = Field(default=32, gt=0)
    points_per_batch: int = Field(default=64, gt=0)
    min_area_fraction: float = Field(default=0.01, ge=0, le=1)
    max_area_fraction: float = Field(default=0.80, ge=0, le=1)
    max_regions: int = Field(default=16, gt=0)
    nms_iou: float = Field(default=0.7, gt=0, le=1)
    max_side: int = Field(default=2048, gt=0)
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
    batch_size: int = Field(default=64, gt=0)
    device: str = "auto"
    include_full_image: bool = True
    captioner: str | None = None  # transformers image-to-text model id for images without a caption
    caption_regions: bool = False  # also caption each region with the captioner
    max_new_tokens: int = Field(default=40, gt=0)


class FilterConfig(_Section):
    spacy_model: str = "en_core_web_sm"
    remove_colors: bool = True
    remove_materials: bool = False
    remove_textures: bool = False
    remove_domain: bool = False
    vocab_dir: str = str(CONFIGS_DIR / "vocab")
    batch_size: int = Field(default=256, gt=0)
    min_content_words: int = Field(default=2, ge=0)
    max_hard_negatives: int = Field(default=3, ge=0)

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
    epochs: int = Field(default=10, gt=0)
    batch_size: int = Field(default=16, gt=0)
    lr: float = Field(default=5e-6, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    lambda_global: float = Field(default=1.0, ge=0)
    lambda_structure_centric: float = Field(default=0.5, ge=0)
    lambda_consistency: float = Field(default=0.05, ge=0)
    lambda_local: float = Field(default=0.1, ge=0)
    lambda_hard_negative: float = Field(default=0.0, ge=0)
    warm: int = Field(default=1, ge=0)
    decay_start: int = Field(default=1, ge=0)
    decay_end: int = Field(default=8, ge=0)
    floor_structure_centric: float = Field(default=0.7, ge=0, le=1)
    floor_consistency: float = Field(default=0.5, ge=0, le=1)
    floor_local: float = Field(default=0.4, ge=0, le=1)
    warmup_structure_epochs: int = Field(default=0, ge=0)
    chunk_top_k: int = Field(default=3, gt=0)
    chunk_base_window: int = Field(default=3, gt=0)
    chunk_stride: int = Field(default=1, gt=0)
    chunk_tau: float = Field(default=0.07, gt=0)
    max_chunks: int = Field(default=64, gt=0)
    logit_scale_min: float = 0.0
    logit_scale_max: float = 3.5
    max_text_tokens: int = Field(default=248, gt=0)
    keep_positions: int = Field(default=20, ge=0)
    structure_kind: Literal["canny", "scribble"] = "canny"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: str = "auto"
    num_workers: int = Field(default=0, ge=0)
    checkpoint_every_steps: int = Field(default=0, ge=0)  # 0 = only at the end of each epoch
    seed: int = 0

    @model_validator(mode="after")
    def _ordered(self):
        if self.decay_end < self.decay_start:
            raise ValueError(f"decay_end ({self.decay_end}) must be >= decay_start ({self.decay_start})")
        if self.logit_scale_max < self.logit_scale_min:
            raise ValueError("logit_scale_max must be >= logit_scale_min")
        return self


class EvaluateConfig(_Section):
    split: Literal["train", "val", "test", "all"] = "test"
    batch_size: int = Field(default=64, gt=0)
    device: str = "auto"


class RuntimeConfig(_Section):
    chunk_size: int = Field(default=64, gt=0)  # images per mapped Prefect task
    runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None
    dask_workers: int = Field(default=2, gt=0)
    task_retries: int = Field(default=1, ge=0)


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


def _format_error(source: str, error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        message = f"{message} (got {first['input']!r})"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: {key}: {message}{more}"


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> Config:
    """Return the validated config from a YAML file (defaults when ``path`` is None); raise ConfigError on any problem."""
    source = "<defaults>"
    data: dict = {}
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read config file ({exc.__class__.__name__}: {exc})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{source}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
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

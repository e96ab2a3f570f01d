"""Every path under an output folder is built here, content-addressed by image id and stage key.

    OUT/
      manifest/part-<key>.parquet                      the manifest (one row per input image)
      stages/<stage>/<stage_key>/part-<key>.parquet     per-stage results, one part per processed chunk
      maps/<structure_key>/<id[:2]>/<id>.<kind>.png     structure maps (canny, scribble, log, sobel)
      crops/<regions_key>/<id[:2]>/<id>/<n>.jpg          RGB region crops
      crops/<regions_key>/<id[:2]>/<id>/<n>.structure.png  structure crops (same box)
      outputs/<stage>/<stage_key>/<id[:2]>/<id>.<kind>  files of plugin stages (``stage_file``)
      train/                                           checkpoints, metrics.jsonl, the exported model
      eval/metrics.json                                retrieval metrics
      eval/rankings.json                               top-k images per text query, per model (retrieval explorer)
      eval/embeddings.npz                              image, structure-map and caption embeddings of the split
      report/index.html                                the static explorer (``structxlip report``)
      report/thumbs/<id[:2]>/<id>.jpg                  its image thumbnails
      config.yaml                                      the config of the last run (single-stage re-runs reuse it)
      cache/file-keys.parquet                          the ingest item key of each image file, as the last scan gave them
      cache/caption-keys.parquet                       the text stages' item keys, as the folder's captions gave them
      cache/manifest-rows.parquet                      the signature of each manifest row, as the manifest on disk has it
      cache/quality-captions.parquet                   the quality report's caption counts of each manifest part
      runs/<timestamp>.json                            summary of each pipeline run
      .lock                                            held by the run writing this folder
"""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_ID_LENGTH = 32


class PathEscapeError(ValueError):
    """A relative path in a manifest or JSON file points outside its root folder."""


class OutputLayout:
    """Paths of one output folder; manifest paths are stored relative to ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self._prefix = str(self.root).rstrip("/") + "/"

    def __repr__(self) -> str:
        return f"OutputLayout({str(self.root)!r})"

    # ---- folders -------------------------------------------------------------------------------------------
    @property
    def manifest_dir(self) -> Path:
        return self.root / "manifest"

    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def checkpoints_dir(self) -> Path:
        return self.train_dir / "checkpoints"

    @property
    def model_dir(self) -> Path:
        """Final fine-tuned model in Hugging Face format (``CLIPModel.from_pretrained`` loads it)."""
        return self.train_dir / "model"

    @property
    def train_metrics(self) -> Path:
        return self.train_dir / "metrics.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval_metrics(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def config_record(self) -> Path:
        """The config the last pipeline run used: a run or stage re-run without a config reuses it."""
        return self.root / "config.yaml"

    @property
    def eval_rankings(self) -> Path:
        """Top-k image ids per text query for each evaluated model (``structxlip.retrieval_ranks``)."""
        return self.eval_dir / "rankings.json"

    @property
    def eval_embeddings(self) -> Path:
        """The evaluated split's embeddings per model (``structxlip.app.evaluate.write_embeddings``; the explorer's map)."""
        return self.eval_dir / "embeddings.npz"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report_index(self) -> Path:
        """The static explorer page, self-contained but for images it references under ``root``."""
        return self.report_dir / "index.html"

    def report_thumbnail(self, image_id: str) -> Path:
        return self.report_dir / "thumbs" / image_id[:2] / f"{image_id}.jpg"

    @property
    def file_keys(self) -> Path:
        """The ingest item key of every scanned file, kept with a key of the scan (``Pipeline.file_keys``); safe to
        delete."""
        return self.root / "cache" / "file-keys.parquet"

    @property
    def caption_keys(self) -> Path:
        """The text stages' item keys and the captions' digest, kept with a key of what they were derived from, so that
        a run on an unchanged folder does not read its captions again (``Pipeline.caption_keys``); safe to delete."""
        return self.root / "cache" / "caption-keys.parquet"

    @property
    def manifest_index(self) -> Path:
        """The signature of each manifest row (``pipelines.steps.manifest.row_signatures``), kept with a key of the
        manifest's parts as written, so that a run rebuilds only the rows whose inputs changed; safe to delete (the
        next manifest run then compares every row)."""
        return self.root / "cache" / "manifest-rows.parquet"

    @property
    def quality_captions(self) -> Path:
        """The quality report's caption counts of each manifest part (``pipelines.reporting.quality``), so that a
        report after a run that added a part counts the captions of that part only; safe to delete."""
        return self.root / "cache" / "quality-captions.parquet"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    @property
    def runs_dir(self) -> Path:
        """One JSON summary per pipeline run (stage counts and timings)."""
        return self.root / "runs"

    def run_summary(self, stamp: str) -> Path:
        return self.runs_dir / f"{stamp}.json"

    # ---- content-addressed files ---------------------------------------------------------------------------
    def stage_dir(self, stage: str, stage_key: str) -> Path:
        return self.stages_dir / stage / stage_key

    def stage_part(self, stage: str, stage_key: str, part_key: str) -> Path:
        return self.stage_dir(stage, stage_key) / f"part-{part_key}.parquet"

    def manifest_part(self, part_key: str) -> Path:
        return self.manifest_dir / f"part-{part_key}.parquet"

    def structure_map(self, image_id: str, structure_key: str, kind: str) -> Path:
        """PNG of one structure map ``kind`` (canny, scribble, log, sobel) of one image."""
        return Path(f"{self._prefix}maps/{structure_key}/{image_id[:2]}/{image_id}.{kind}.png")

    def crop(self, image_id: str, regions_key: str, index: int) -> Path:
        return Path(f"{self._prefix}crops/{regions_key}/{image_id[:2]}/{image_id}/{index:03d}.jpg")

    def structure_crop(self, image_id: str, regions_key: str, index: int) -> Path:
        return Path(f"{self._prefix}crops/{regions_key}/{image_id[:2]}/{image_id}/{index:03d}.structure.png")

    def stage_file(self, stage: str, stage_key: str, image_id: str, kind: str) -> Path:
        """A file of one image written by a stage that has no folder of its own (a plugin), e.g. ``kind="lines.png"``."""
        return Path(f"{self._prefix}outputs/{stage}/{stage_key}/{image_id[:2]}/{image_id}.{kind}")

    def checkpoint(self, name: str) -> Path:
        """Training checkpoint file, e.g. ``checkpoint("epoch-0003")`` or ``checkpoint("last")``."""
        return self.checkpoints_dir / f"{name}.pt"

    # ---- relative <-> absolute -----------------------------------------------------------------------------
    def relative(self, path: str | os.PathLike) -> str:
        """Return ``path`` relative to the root, POSIX style, as stored in manifests."""
        text = os.fspath(path)
        if text.startswith(self._prefix) and os.path.normpath(text) == text and os.sep == "/":
            return text[len(self._prefix):]  # built from the (resolved) root: no filesystem lookups (~5 per path)
        return Path(path).resolve().relative_to(self.root).as_posix()

    def resolve(self, relative: str | None) -> Path | None:
        """Return the absolute path of a manifest-relative path; refuse paths that escape the root."""
        if relative is None:
            return None
        candidate = Path(relative)
        if candidate.is_absolute():
            raise PathEscapeError(f"expected a path relative to {self.root}, got absolute path {relative!r}")
        absolute = (self.root / candidate).resolve()
        if absolute != self.root and self.root not in absolute.parents:
            raise PathEscapeError(f"path {relative!r} escapes the output folder {self.root}")
        return absolute

"""Training/evaluation data: records from a manifest or a reference JSON, image preprocessing, dataset and collate.

A record is one usable image (status ok, with a caption) of the requested split. Its structure inputs are the
global structure map (``structure_kind``: canny -> ``structure_path``, scribble -> ``scribble_path``) and the
structure crops of its top-k segments ranked by ``similarity_score``. A missing map (null path or missing file)
becomes a black dummy with ``has_structure=False``; a missing crop is an invalid slot. Chunk spans of the filtered
caption are computed once per caption when the dataset is built, never inside the training step.

Multi-caption images (COCO/Flickr style) stay one record each: after ``set_epoch`` every epoch draws one of an
image's captions (``caption_choice``, a hash of seed, epoch and image), so a batch never holds one image twice (no
false negatives) and a resumed run draws the same captions.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from storage.layout import OutputLayout
from storage.manifest import STATUS_OK, manifest_root, read_manifest, resolve_manifest_path

# Bump when this module's results change: it enters the cache key of every stage that imports it.
VERSION = "1"

STRUCTURE_COLUMNS = {"canny": "structure_path", "scribble": "scribble_path"}


# ---- records ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingRecord:
    """One usable image: absolute file paths (None = absent), captions and its top-k structure crops."""

    image_id: str
    image_path: Path
    caption: str
    filtered_caption: str
    structure_path: Path | None
    structure_crops: tuple[Path | None, ...]
    hard_negatives: tuple[str, ...]
    split: str | None
    # The image's further captions (multi-caption datasets): (caption, filtered caption, hard negatives) each.
    extra_captions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @property
    def caption_count(self) -> int:
        return 1 + len(self.extra_captions)

    def caption_option(self, choice: int) -> tuple[str, str, tuple[str, ...]]:
        """Return (caption, filtered caption, hard negatives) of caption ``choice`` (0 = the first caption)."""
        if choice == 0:
            return self.caption, self.filtered_caption, self.hard_negatives
        return self.extra_captions[choice - 1]


def caption_choice(seed: int, epoch: int, image_id: str, count: int) -> int:
    """Return which of an image's ``count`` captions epoch ``epoch`` trains on: a uniform hash of (seed, epoch,
    image), so every epoch draws afresh yet a resumed or re-run epoch draws exactly the same captions."""
    if count <= 1:
        return 0
    digest = hashlib.sha256(f"caption:{seed}:{epoch}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def _top_segments(segments: list[dict] | None, top_k: int) -> list[dict]:
    """Return the ``top_k`` segments by similarity_score (highest first, unscored last, ties in stored order)."""
    ranked = sorted(segments or [], key=lambda s: -math.inf if s.get("similarity_score") is None
                    else s["similarity_score"], reverse=True)
    return ranked[:top_k]


def records_from_rows(
    rows: list[dict], *, layout: OutputLayout, split: str | None, structure_kind: str = "canny", top_k: int = 3
) -> list[TrainingRecord]:
    """Return the usable records of manifest ``rows`` (relative paths are relative to ``layout.root``)."""
    if structure_kind not in STRUCTURE_COLUMNS:
        raise ValueError(f"structure_kind must be one of {sorted(STRUCTURE_COLUMNS)}, got {structure_kind!r}")
    column = STRUCTURE_COLUMNS[structure_kind]
    records = []
    for row in rows:
        if row.get("status") != STATUS_OK or not (row.get("caption") or "").strip():
            continue
        if split not in (None, "all") and row.get("split") != split:
            continue
        top = _top_segments(row.get("segments"), top_k)
        records.append(
            TrainingRecord(
                image_id=row["image_id"],
                image_path=resolve_manifest_path(layout, row["source_path"]),
                caption=row["caption"],
                # No filtering result (stage skipped or nothing to remove): the caption is its own filtered form.
                filtered_caption=row.get("filtered_caption") or row["caption"],
                structure_path=resolve_manifest_path(layout, row.get(column)),
                structure_crops=tuple(resolve_manifest_path(layout, s.get("structure_crop_path")) for s in top)
                + (None,) * (top_k - len(top)),
                hard_negatives=tuple(row.get("hard_negatives") or ()),
                split=row.get("split"),
                extra_captions=_extra_captions(row),
            )
        )
    return records


def _extra_captions(row: dict) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    extras = []
    for extra in row.get("extra_captions") or []:
        text = extra.get("caption")
        if isinstance(text, str) and text.strip() and text != row["caption"]:
            extras.append((text, extra.get("filtered_caption") or text, tuple(extra.get("hard_negatives") or ())))
    return tuple(extras)


def load_records(
    source: str | os.PathLike, *, split: str | None = "train", structure_kind: str = "canny", top_k: int = 3,
    root: str | os.PathLike | None = None,
) -> list[TrainingRecord]:
    """Return the usable records of a manifest (OUT, OUT/manifest or a Parquet file) or a reference ``.json``, whose
    relative paths are relative to ``root`` (default: the JSON's folder)."""
    source = Path(source).expanduser()
    if source.suffix.lower() == ".json":
        from storage.reference_json import read_reference_json

        folder = Path(root).expanduser().resolve() if root is not None else source.resolve().parent
        if not folder.is_dir():
            raise FileNotFoundError(f"--root folder not found: {folder}")
        imported = read_reference_json(source, root=folder)
        if imported.rejected:
            index, reason = imported.rejected[0]
            raise ValueError(f"{source}: {len(imported.rejected)} unusable records (first: item {index}: {reason})")
        rows, layout = imported.rows, OutputLayout(folder)
    else:
        rows, layout = read_manifest(source).to_pylist(), manifest_root(source)
    records = records_from_rows(rows, layout=layout, split=split, structure_kind=structure_kind, top_k=top_k)
    if not records:
        raise ValueError(f"{source}: no usable records (status ok with a caption) in split {split!r}")
    return records


# ---- images -------------------------------------------------------------------------------------------------------
def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value else None


@dataclass(frozen=True)
class ImagePreprocessor:
    """The model's own transformers image processor (``CLIPImageProcessor``: resize the shortest side, centre crop
    with the offset rounded down, rescale, normalise), applied to one PIL image at a time.

    Calling the processor itself gives exactly the reference trainer's pixels; the torchvision-backed processor of
    transformers 5 is also faster than the PIL + torchvision re-implementation it replaces (~1.0 vs ~2.1 ms for a
    640x480 photo to 224 px, one core).
    """

    processor: Any
    output_hw: tuple[int, int]

    @classmethod
    def from_image_processor(cls, processor: Any) -> "ImagePreprocessor":
        """Return the preprocessor of a transformers image processor; its output must have one fixed size."""
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        size = getattr(processor, "size", None) if getattr(processor, "do_resize", True) else None
        for source in (crop, size):
            height, width = _size_field(source, "height"), _size_field(source, "width")
            if height and width:
                return cls(processor=processor, output_hw=(height, width))
        raise ValueError(f"unsupported image processor (size {size!r}, crop_size {crop!r}): a fixed output size "
                         "needs a centre crop or a height/width resize")

    def __call__(self, image: Image.Image) -> Tensor:
        """Return the normalised ``(3, H, W) float32`` tensor of an RGB PIL image."""
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels.to(torch.float32).contiguous()

    def blank(self) -> Tensor:
        """Return the processed black image ``(3, H, W) float32`` used for missing structure maps and crops (the
        reference processes a black RGB image of the crop size)."""
        height, width = self.output_hw
        return self(Image.new("RGB", (width, height), (0, 0, 0)))


def open_rgb(path: str | os.PathLike, *, via_grey: bool = False) -> Image.Image:
    """Return the image at ``path`` as RGB, rotated upright by its EXIF orientation; one-line error if unreadable.

    ``via_grey`` converts to grey first (structure maps: the reference reads them as ``"L"`` then RGB, so a colour
    map becomes its luminance).
    """
    from pipelines.steps.images import image_orientation, orient_image

    try:
        with Image.open(path) as opened:
            orientation = image_orientation(opened)
            opened.load()
            image = orient_image(opened, orientation)
            return image.convert("L").convert("RGB") if via_grey else image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.is_file() else None


# ---- dataset ------------------------------------------------------------------------------------------------------
class StructXLIPDataset(Dataset):
    """Items: the processed image, structure map, top-k structure crops, captions, chunk spans and hard negatives."""

    def __init__(
        self,
        records: Sequence[TrainingRecord],
        *,
        preprocess: ImagePreprocessor,
        tokenizer: Any = None,
        max_text_tokens: int = 248,
        chunk_base_window: int = 3,
        chunk_stride: int = 1,
        max_chunks: int = 64,
        with_chunks: bool = True,
        with_crops: bool = True,
        local_pooling: str = "filtered",
    ):
        self.records = list(records)
        self.preprocess = preprocess
        self.with_crops = with_crops
        self._blank = preprocess.blank()
        self.spans: list[list[tuple[int, int]]] = [[] for _ in self.records]
        self.extra_spans: list[list[list[tuple[int, int]]]] = [[[] for _ in r.extra_captions] for r in self.records]
        self.epoch: int | None = None  # None: every item uses its first caption (evaluation)
        self.seed = 0
        if with_chunks:
            if tokenizer is None:
                raise ValueError("chunk spans need the tokenizer; pass tokenizer= or with_chunks=False")
            from structxlip.losses import chunk_spans

            # Once per distinct filtered caption, here rather than in the training step.
            cache: dict[str, list[tuple[int, int]]] = {}
            for index, record in enumerate(self.records):
                text = record.filtered_caption
                if text not in cache:
                    # "reference" pooling keeps the reference's span check (end <= max_text_tokens) as well.
                    cache[text] = chunk_spans(text, tokenizer, chunk_base_window, chunk_stride, max_chunks,
                                              max_length=max_text_tokens,
                                              allow_last_position=local_pooling == "reference")
                self.spans[index] = cache[text]
                for number, (_caption, text, _negatives) in enumerate(record.extra_captions):
                    if text not in cache:
                        cache[text] = chunk_spans(text, tokenizer, chunk_base_window, chunk_stride, max_chunks,
                                                  max_length=max_text_tokens,
                                                  allow_last_position=local_pooling == "reference")
                    self.extra_spans[index][number] = cache[text]

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        """Draw each multi-caption image's caption of ``epoch`` (``caption_choice``); call before the epoch's loader
        is created, so worker processes see it. Single-caption images are unaffected."""
        self.epoch, self.seed = epoch, seed

    def caption_index(self, index: int) -> int:
        """Return which caption item ``index`` uses now: 0 (the first) unless ``set_epoch`` was called."""
        record = self.records[index]
        if self.epoch is None:
            return 0
        return caption_choice(self.seed, self.epoch, record.image_id, record.caption_count)

    def __len__(self) -> int:
        return len(self.records)

    def _structure(self, path: Path | None) -> tuple[Tensor, bool]:
        path = _existing(path)
        if path is None:
            return self._blank, False
        # Grey structure maps go through the same RGB image encoder as the photos.
        return self.preprocess(open_rgb(path, via_grey=True)), True

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        structure, has_structure = self._structure(record.structure_path)
        choice = self.caption_index(index)
        caption, filtered_caption, hard_negatives = record.caption_option(choice)
        item = {
            "index": index,
            "pixel_values": self.preprocess(open_rgb(record.image_path)),
            "structure_values": structure,
            "has_structure": has_structure,
            "caption": caption,
            "filtered_caption": filtered_caption,
            "chunk_spans": self.spans[index] if choice == 0 else self.extra_spans[index][choice - 1],
            "hard_negatives": list(hard_negatives),
        }
        if self.with_crops:
            crops = [self._structure(path) for path in record.structure_crops]
            item["crop_values"] = torch.stack([crop for crop, _ in crops]) if crops else self._blank.new_zeros(
                (0, *self._blank.shape))
            item["crop_valid"] = torch.tensor([valid for _, valid in crops], dtype=torch.bool)
        return item


# ---- batches ------------------------------------------------------------------------------------------------------
@dataclass
class StructXLIPBatch:
    """A collated batch. Images ``(B, 3, H, W) float32``; token ids/masks ``(B, L) long`` (one L for captions,
    filtered captions and negatives: max_text_tokens, or the batch's longest text with dynamic padding);
    ``chunk_spans[b]`` are token spans of the filtered caption; crops ``(B, K, 3, H, W)`` with ``crop_valid`` (B, K);
    hard negatives flattened to ``(B*N, L)`` with ``negative_valid`` (B, N), or None when the batch has none."""

    indices: Tensor
    pixel_values: Tensor
    structure_values: Tensor
    has_structure: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    filtered_input_ids: Tensor
    filtered_attention_mask: Tensor
    chunk_spans: list[list[tuple[int, int]]]
    crop_values: Tensor | None = None
    crop_valid: Tensor | None = None
    negative_input_ids: Tensor | None = None
    negative_attention_mask: Tensor | None = None
    negative_valid: Tensor | None = None

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def to(self, device: torch.device | str) -> "StructXLIPBatch":
        """Return the batch with every tensor on ``device`` (non-blocking from pinned memory)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
        return StructXLIPBatch(**moved)

    def subset(self, rows: slice | list[int]) -> "StructXLIPBatch":
        """Return the batch restricted to ``rows`` (e.g. one rank's shard of a global batch)."""
        rows = list(range(len(self)))[rows] if isinstance(rows, slice) else list(rows)
        index = torch.tensor(rows, dtype=torch.long)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "chunk_spans":
                picked[f.name] = [value[row] for row in rows]
            elif f.name.startswith("negative_") and f.name != "negative_valid" and value is not None:
                slots = self.negative_valid.shape[1]
                flat = (index[:, None] * slots + torch.arange(slots)[None, :]).reshape(-1)
                picked[f.name] = value[flat.to(value.device)]
            elif isinstance(value, Tensor):
                picked[f.name] = value[index.to(value.device)]
            else:
                picked[f.name] = value
        return StructXLIPBatch(**picked)


class StructXLIPCollator:
    """Collate dataset items into a :class:`StructXLIPBatch`, tokenising captions, filtered captions and hard
    negatives in one call to one shared length: ``max_text_tokens``, or with ``pad_to_longest`` the longest of them
    (capped at ``max_text_tokens``).

    Padding to the longest changes no embedding: CLIP's text encoder is causal and pools at the EOS token, so the
    pad positions after it never reach the pooled output or any chunk span, while attention cost falls with length.
    """

    def __init__(self, tokenizer: Any, *, max_text_tokens: int = 248, with_negatives: bool = True,
                 pad_to_longest: bool = False):
        if max_text_tokens <= 0:
            raise ValueError(f"max_text_tokens must be positive, got {max_text_tokens}")
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens
        self.with_negatives = with_negatives
        self.pad_to_longest = pad_to_longest

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Return ``input_ids`` and ``attention_mask`` ``(N, L) long``; L = max_text_tokens, or the longest text
        (at most max_text_tokens) with ``pad_to_longest``."""
        encoded = self.tokenizer(texts, padding="longest" if self.pad_to_longest else "max_length", truncation=True,
                                 max_length=self.max_text_tokens, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    def __call__(self, items: list[dict]) -> StructXLIPBatch:
        size = len(items)
        texts = [item["caption"] for item in items] + [item["filtered_caption"] for item in items]
        slots = max(len(item["hard_negatives"]) for item in items) if self.with_negatives else 0
        valid = []
        for item in items if slots else ():
            # Pad every sample to the batch's largest negative count; padding slots are invalid and never scored.
            negatives = list(item["hard_negatives"])
            texts += negatives + [""] * (slots - len(negatives))
            valid.append([True] * len(negatives) + [False] * (slots - len(negatives)))
        # One tokenizer call: captions, filtered captions and negatives share L, so the encoder runs them as one batch.
        ids, mask = self.tokenize(texts)
        batch = StructXLIPBatch(
            indices=torch.tensor([item["index"] for item in items], dtype=torch.long),
            pixel_values=torch.stack([item["pixel_values"] for item in items]),
            structure_values=torch.stack([item["structure_values"] for item in items]),
            has_structure=torch.tensor([item["has_structure"] for item in items], dtype=torch.bool),
            input_ids=ids[:size],
            attention_mask=mask[:size],
            filtered_input_ids=ids[size:2 * size],
            filtered_attention_mask=mask[size:2 * size],
            chunk_spans=[list(item["chunk_spans"]) for item in items],
        )
        if "crop_values" in items[0]:
            batch.crop_values = torch.stack([item["crop_values"] for item in items])
            batch.crop_valid = torch.stack([item["crop_valid"] for item in items])
        if slots:
            batch.negative_input_ids, batch.negative_attention_mask = ids[2 * size:], mask[2 * size:]
            batch.negative_valid = torch.tensor(valid, dtype=torch.bool)
        return batch

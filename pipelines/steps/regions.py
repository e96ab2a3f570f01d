"""Regions stage: local region boxes per image, with their RGB crops (JPEG) and structure crops (PNG, the same box
cut from the structure map).

Proposers (``method``; ``resolve_region_method`` says which one ``auto`` means):

- ``sam``: Segment Anything's automatic mask generation (a point grid), from a transformers model
  (``sam_model``: a hub id such as ``facebook/sam-vit-base`` or a local folder; SAM, SAM-HQ and SAM 2 through the
  ``mask-generation`` pipeline) or a ``segment-anything`` checkpoint (``sam_checkpoint``).
- ``grouping``: weight-free hierarchical grouping of colour segments with the structure map's edges
  (``pipelines.steps.grouping``); finds objects and parts in real photos.
- ``structure``: boxes of connected groups of the structure map's edges (the first weight-free proposer; on
  cluttered photos its edges form one component above the area limit, so it often finds nothing).

Boxes are ``storage.manifest.bbox`` dicts in original-image pixels (x2/y2 exclusive); segments are ordered by box
area, largest first (the captions stage ranks them by score later). Each result records the proposer that ran
(``region_method``).
"""

from __future__ import annotations

import os
import threading
from functools import partial
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from pipelines.steps.errors import EnvironmentFailure, one_line
from pipelines.steps.grouping import grouping_boxes, grouping_boxes_many
from pipelines.steps.region_method import resolve_region_method
from pipelines.steps.images import ImageLoadError, load_rgb
from storage.atomic import atomic_directory, encode_jpeg, raise_if_storage_error, write_new_file
from storage.layout import OutputLayout
from storage.manifest import STATUS_FAILED, STATUS_OK, bbox
from structxlip.devices import resolve_device

VERSION = "3"

# A structure map whose aspect ratio differs from the image's by more than this was not made from the image.
_ASPECT_TOLERANCE = 0.03


class RegionsSetupError(EnvironmentFailure):
    """The region proposer cannot start (SAM checkpoint missing or unloadable); the message is one line. Never an
    item's failure: the stage fails and records nothing (``pipelines.steps.errors``)."""


class RegionInputError(ValueError):
    """One record cannot get regions (missing keys, structure map missing or not of this image); one line."""


# ---- boxes ------------------------------------------------------------------------------------------------------


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Return the (N,) float64 IoU of one (4,) xyxy box with (N, 4) xyxy boxes (x2/y2 exclusive)."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w.astype(np.float64) * h
    area = float((box[2] - box[0]) * (box[3] - box[1]))
    areas = (boxes[:, 2] - boxes[:, 0]).astype(np.float64) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int | None = None) -> np.ndarray:
    """Return the (K,) int64 indices kept by greedy NMS, best score first (``torchvision.ops.nms``'s rule), at
    most ``limit`` of them (the first ``limit`` of the full result: later boxes never drop earlier ones).

    A box is dropped when its IoU with a kept, higher-scoring box is above ``iou_threshold``. NumPy, so the CPU
    path needs no torch import (~6 s per worker process): ``torchvision.ops.nms`` keeps the same indices (ties
    included); at the ~200 candidates of the grouping proposer and a limit of 16 this takes ~0.45 ms per image,
    torchvision's full NMS ~0.7 ms.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    # Candidates in score order, a chunk at a time: the IoU of each with the kept boxes and with the chunk's other
    # boxes in one array (box_iou's arithmetic, element-wise, so the same values; IoU is symmetric), then the
    # greedy pass over the chunk in Python. A few chunks reach the limit where box_iou per kept box took ~16 rounds
    # of array operations over all the candidates.
    x1, y1, x2, y2 = np.ascontiguousarray(boxes[order].T)
    areas = (x2 - x1) * (y2 - y1)
    kept: list[int] = []  # positions in score order
    start = 0
    while start < order.size and (limit is None or len(kept) < limit):
        stop = min(order.size, start + _NMS_CHUNK)
        rows = np.concatenate([np.asarray(kept, dtype=np.int64), np.arange(start, stop)])[:, None]
        columns = slice(start, stop)
        inter = np.maximum(np.minimum(x2[rows], x2[columns]) - np.maximum(x1[rows], x1[columns]), 0.0)
        inter *= np.maximum(np.minimum(y2[rows], y2[columns]) - np.maximum(y1[rows], y1[columns]), 0.0)
        union = areas[rows] + areas[columns] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        over = iou > iou_threshold  # (kept + chunk, chunk)
        before = len(kept)
        suppressed = over[:before].any(axis=0)
        for column in range(stop - start):
            if suppressed[column]:
                continue
            kept.append(start + column)
            if limit is not None and len(kept) >= limit:
                break
            suppressed |= over[before + column]
        start = stop
    return order[np.asarray(kept, dtype=np.int64)].astype(np.int64)


_NMS_CHUNK = 64


def select_boxes(
    boxes: np.ndarray,
    scores: np.ndarray,
    area_fractions: np.ndarray,
    *,
    min_area_fraction: float,
    max_area_fraction: float,
    nms_iou: float,
    max_regions: int,
) -> np.ndarray:
    """Return the indices of the boxes kept by the area filter, NMS and ``max_regions`` (best score first)."""
    candidates = np.flatnonzero((area_fractions >= min_area_fraction) & (area_fractions <= max_area_fraction))
    if candidates.size == 0:
        return candidates.astype(np.int64)
    return candidates[nms(boxes[candidates], scores[candidates], nms_iou, limit=max_regions)]


def scale_boxes(boxes: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Return (N, 4) int64 xyxy boxes mapped from a (w, h) image to a (w, h) image, grown outward to whole pixels."""
    (fw, fh), (tw, th) = from_size, to_size
    factors = np.array([tw / fw, th / fh, tw / fw, th / fh])
    scaled = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * factors
    # A tiny epsilon keeps exact multiples (e.g. 10 * 2.0) from being rounded outward by float noise.
    out = np.concatenate([np.floor(scaled[:, :2] + 1e-9), np.ceil(scaled[:, 2:] - 1e-9)], axis=1).astype(np.int64)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, tw)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, th)
    # Never an empty box: at least one pixel wide and high.
    out[:, 2] = np.maximum(out[:, 2], np.minimum(out[:, 0] + 1, tw))
    out[:, 0] = np.minimum(out[:, 0], out[:, 2] - 1)
    out[:, 3] = np.maximum(out[:, 3], np.minimum(out[:, 1] + 1, th))
    out[:, 1] = np.minimum(out[:, 1], out[:, 3] - 1)
    return out


def structure_boxes(edges: np.ndarray, *, dilation: int = 2) -> np.ndarray:
    """Return (N, 4) int64 xyxy boxes (x2/y2 exclusive) of the edge pixels of each connected group of edges.

    Edges closer than about ``2 * dilation`` pixels join one group; the box is that of the group's own edge
    pixels, so the dilation does not grow it.
    """
    if edges.dtype != np.uint8 or edges.ndim != 2:
        raise ValueError(f"expected a uint8 (H, W) edge map, got {edges.dtype} {edges.shape}")
    binary = edges > 0
    if not binary.any():
        return np.zeros((0, 4), np.int64)
    grown = binary.astype(np.uint8)
    if dilation > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1, 2 * dilation + 1))
        grown = cv2.dilate(grown, kernel)
    _, labels = cv2.connectedComponents(grown, connectivity=8)
    ys, xs = np.nonzero(binary)
    groups = labels[ys, xs]
    order = np.argsort(groups, kind="stable")
    groups, xs, ys = groups[order], xs[order], ys[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.stack(
        [
            np.minimum.reduceat(xs, starts),
            np.minimum.reduceat(ys, starts),
            np.maximum.reduceat(xs, starts) + 1,
            np.maximum.reduceat(ys, starts) + 1,
        ],
        axis=1,
    ).astype(np.int64)


# ---- Segment Anything --------------------------------------------------------------------------------------------

SamBuilder = Callable[[str, "str | None", str], Any]
_SAM_LOCK = threading.Lock()
_SAM_CACHE: dict[tuple, Any] = {}


def resolve_checkpoint(checkpoint: str) -> str:
    """Return a local file path for ``checkpoint`` (a path, or ``hf://OWNER/REPO/FILE`` fetched from the hub)."""
    if checkpoint.startswith("hf://"):
        parts = checkpoint[len("hf://") :].split("/")
        if len(parts) < 3 or not all(parts):
            raise RegionsSetupError(f"expected a SAM checkpoint like hf://OWNER/REPO/FILE, got {checkpoint!r}")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(repo_id=repo_id, filename=filename)
        except Exception as exc:  # noqa: BLE001 - offline, missing repo/file, auth: all one actionable line
            raise RegionsSetupError(
                f"cannot fetch SAM checkpoint {checkpoint}: {one_line(exc)} "
                "(offline? download it and set regions.sam_checkpoint to the local .pth file)"
            ) from None
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise RegionsSetupError(f"SAM checkpoint not found: {checkpoint}")
    return str(path)


def build_sam(model_type: str, checkpoint: str | None, device: str):
    """Return a ``segment_anything.Sam`` of ``model_type`` with weights from the local ``checkpoint``, in eval mode."""
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise RegionsSetupError(f"unknown SAM model type {model_type!r} (expected one of {sorted(sam_model_registry)})")
    from structxlip.model_files import ModelLoadError, reading_model_file

    try:
        with reading_model_file(checkpoint or model_type, "download it again and point regions.sam_checkpoint at it"):
            model = sam_model_registry[model_type](checkpoint=checkpoint)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a mismatched checkpoint
        raise RegionsSetupError(f"cannot load SAM {model_type} from {checkpoint}: {one_line(exc)}") from None
    return model.to(device).eval()


def cached_sam(model_type: str, checkpoint: str | None, device: str, builder: SamBuilder = build_sam):
    """Return the SAM model for (type, checkpoint, device, builder), built once per process."""
    key = (model_type, checkpoint, device, builder)
    with _SAM_LOCK:
        if key not in _SAM_CACHE:
            local = resolve_checkpoint(checkpoint) if checkpoint else None
            _SAM_CACHE[key] = builder(model_type, local, device)
        return _SAM_CACHE[key]


def build_sam_pipeline(model: str, device: str):
    """Return transformers' ``mask-generation`` pipeline for a SAM / SAM-HQ / SAM 2 hub id or local folder."""
    from structxlip.model_files import ModelLoadError, reading_model_file

    try:
        from transformers import pipeline

        with reading_model_file(model, "download the model again (`hf download REPO --local-dir DIR`)"):
            return pipeline("mask-generation", model=model, device=device)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, not a SAM model: one actionable line
        raise RegionsSetupError(
            f"cannot load SAM model {model}: {one_line(exc)} (offline? download it "
            "with `hf download REPO --local-dir DIR` and set regions.sam_model to that folder)"
        ) from None


def cached_sam_pipeline(model: str, device: str):
    """Return the ``mask-generation`` pipeline of (model, device), built once per process."""
    key = ("transformers", model, device)
    with _SAM_LOCK:
        if key not in _SAM_CACHE:
            _SAM_CACHE[key] = build_sam_pipeline(model, device)
        return _SAM_CACHE[key]


def _downscale(rgb: np.ndarray, max_side: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    if max(height, width) <= max_side:
        return rgb
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def mask_boxes(masks) -> tuple[np.ndarray, np.ndarray]:
    """Return the (N, 4) int64 xyxy boxes (x2/y2 exclusive) and (N,) pixel areas of (N, H, W) bool masks.

    An empty mask gets the box (0, 0, 0, 0) and area 0 (the area filter drops it).
    """
    import torch

    masks = torch.as_tensor(masks).bool()
    if masks.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks, got shape {tuple(masks.shape)}")
    n, height, width = masks.shape
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H)
    x1 = cols.int().argmax(dim=1)
    x2 = width - cols.flip(1).int().argmax(dim=1)
    y1 = rows.int().argmax(dim=1)
    y2 = height - rows.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    boxes[~cols.any(dim=1)] = 0
    return boxes.cpu().numpy().astype(np.int64), masks.sum(dim=(1, 2)).cpu().numpy().astype(np.int64)


def sam_model_boxes(
    rgb: np.ndarray,
    generator,
    *,
    max_side: int,
    points_per_side: int,
    points_per_batch: int,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    nms_iou: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return boxes in original pixels ((N, 4) int64 xyxy), scores (N,) and mask area fractions (N,) from a
    transformers ``mask-generation`` pipeline (a ``points_per_side`` grid, ``points_per_batch`` points at once).

    The image is downscaled to ``max_side`` on its long side for mask generation when larger.
    """
    from PIL import Image

    height, width = rgb.shape[:2]
    work = _downscale(rgb, max_side)
    work_h, work_w = work.shape[:2]
    output = generator(
        Image.fromarray(work),
        points_per_crop=points_per_side,
        points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh,
        crops_nms_thresh=nms_iou,
    )
    masks = output["masks"]
    if len(masks) == 0:
        empty = np.zeros((0,), np.float64)
        return np.zeros((0, 4), np.int64), empty, empty
    import torch

    boxes, areas = mask_boxes(torch.stack([torch.as_tensor(m) for m in masks]))
    scores = torch.as_tensor(output["scores"]).float().cpu().numpy().astype(np.float64).reshape(-1)
    found = areas > 0
    boxes, scores, areas = boxes[found], scores[found], areas[found]
    return scale_boxes(boxes, (work_w, work_h), (width, height)), scores, areas / float(work_h * work_w)


def sam_boxes(rgb: np.ndarray, generator, *, max_side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return SAM mask boxes in original pixels ((N, 4) int64 xyxy), scores (N,) and mask area fractions (N,).

    The image is downscaled to ``max_side`` on its long side for mask generation when larger.
    """
    height, width = rgb.shape[:2]
    work = _downscale(rgb, max_side)
    work_h, work_w = work.shape[:2]
    annotations = generator.generate(work)
    if not annotations:
        empty = np.zeros((0,), np.float64)
        return np.zeros((0, 4), np.int64), empty, empty
    # SAM's XYWH box spans max - min pixel indices (inclusive ends): the exclusive x2 is x + w + 1.
    xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    boxes = np.stack([xywh[:, 0], xywh[:, 1], xywh[:, 0] + xywh[:, 2] + 1, xywh[:, 1] + xywh[:, 3] + 1], axis=1)
    scores = np.array([a["predicted_iou"] * a["stability_score"] for a in annotations], dtype=np.float64)
    areas = np.array([a["area"] for a in annotations], dtype=np.float64) / float(work_h * work_w)
    return scale_boxes(boxes, (work_w, work_h), (width, height)), scores, areas


# ---- the stage ---------------------------------------------------------------------------------------------------


def _read_structure_map(path: Path, name: str) -> np.ndarray:
    edges = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if edges is None:
        raise RegionInputError(f"cannot read structure map {path.name}: missing or not an image ({name})")
    return edges


def _check_aspect(map_size: tuple[int, int], image_size: tuple[int, int], name: str) -> None:
    (mw, mh), (w, h) = map_size, image_size
    if abs(mw / mh - w / h) > _ASPECT_TOLERANCE * (w / h) + 1.0 / min(mw, mh):
        raise RegionInputError(
            f"structure map is {mw}x{mh} but the image is {w}x{h}: not made from this image ({name})"
        )


def propose_regions(
    records: list[dict],
    *,
    layout: OutputLayout,
    stage_key: str,
    method: str = "auto",
    sam_model: str | None = None,
    sam_model_type: str = "vit_b",
    sam_checkpoint: str | None = None,
    points_per_side: int = 32,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    min_area_fraction: float = 0.01,
    max_area_fraction: float = 0.8,
    max_regions: int = 16,
    nms_iou: float = 0.7,
    max_side: int = 2048,
    structure_dilation: int = 2,
    grouping_side: int = 192,
    max_pixels: int = 178_956_970,
    device: str = "auto",
    sam_builder: SamBuilder | None = None,
) -> list[dict]:
    """Write region crops of each record (``image_id, source_path[, structure_path]``); return one result each.
    Sources are those ingest validated (``validate_image``), decoded as such (``load_rgb(validated=True)``).

    Results: ``{image_id, status, error, region_method, segments: [{bbox, crop_path, structure_crop_path}]}``,
    paths relative to ``layout.root``; ``region_method`` is the proposer that ran (``resolve_region_method``;
    ``sam_builder``, a test hook, counts as a checkpoint). SAM: ``sam_model`` (transformers, hub id or folder) or
    ``sam_checkpoint`` + ``sam_model_type`` (segment-anything), a ``points_per_side`` grid run ``points_per_batch``
    points at a time on ``device``, the image downscaled to ``max_side``. Grouping works at ``grouping_side`` px and
    uses the structure map when the record has one. The area filter is on mask area (SAM) or box area (grouping,
    structure), as a fraction of the image. Raises ``RegionsSetupError`` only when SAM cannot be loaded.
    """
    if method == "auto" and sam_builder is not None and not sam_model:
        method = "sam"
    method = resolve_region_method(method, sam_model, sam_checkpoint)
    if not 0 <= min_area_fraction <= max_area_fraction <= 1:
        raise ValueError(
            f"expected 0 <= min_area_fraction <= max_area_fraction <= 1, got {min_area_fraction}, {max_area_fraction}"
        )
    propose: Callable[[np.ndarray, "np.ndarray | None"], tuple[np.ndarray, np.ndarray, np.ndarray]]
    if method == "sam":
        if not any(r.get("status", STATUS_OK) == STATUS_OK for r in records):
            propose = _no_proposer
        elif sam_model:
            generator = cached_sam_pipeline(sam_model, str(resolve_device(device)))
            propose = partial(
                _sam_model_proposer, generator=generator, max_side=max_side, points_per_side=points_per_side,
                points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh, nms_iou=nms_iou,
            )
        else:
            if not sam_checkpoint and sam_builder is None:
                raise RegionsSetupError(
                    "regions method 'sam' needs regions.sam_model (a hub id such as facebook/sam-vit-base, or a "
                    "local folder) or regions.sam_checkpoint (a local .pth or hf://REPO/FILE)"
                )
            from segment_anything import SamAutomaticMaskGenerator

            model = cached_sam(sam_model_type, sam_checkpoint, str(resolve_device(device)), sam_builder or build_sam)
            generator = SamAutomaticMaskGenerator(
                model,
                points_per_side=points_per_side,
                points_per_batch=points_per_batch,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                box_nms_thresh=nms_iou,
            )
            propose = partial(_sam_proposer, generator=generator, max_side=max_side)
    elif method == "grouping":
        propose = partial(_grouping_proposer, work_side=grouping_side)
    else:
        propose = partial(_structure_proposer, dilation=structure_dilation)
    selection = dict(
        min_area_fraction=min_area_fraction,
        max_area_fraction=max_area_fraction,
        nms_iou=nms_iou,
        max_regions=max_regions,
    )
    # Grouping proposes for a few images at once (its merging rounds are shared, ~4 CPU-ms less per image); every
    # other proposer one image at a time. Each image still fails alone, with the message it would get alone.
    grouping = method == "grouping"
    propose_many = partial(_grouping_proposer_many, work_side=grouping_side) if grouping else None
    batch = _GROUPING_BATCH if grouping else 1
    outputs: list[dict | None] = [None] * len(records)
    pending: list[tuple[int, dict, np.ndarray, np.ndarray | None]] = []

    def fail(index: int, record: dict, exc: Exception) -> None:
        raise_if_storage_error(exc)
        name = Path(str(record.get("source_path"))).name
        known = isinstance(exc, (ImageLoadError, RegionInputError))
        error = str(exc) if known else f"region proposal failed: {one_line(exc)} ({name})"
        outputs[index] = _failed(record.get("image_id"), error, method)

    def flush() -> None:
        proposed = _propose_each([(rgb, structure) for _, _, rgb, structure in pending], propose, propose_many)
        for (index, record, rgb, structure), result in zip(pending, proposed):
            try:
                if isinstance(result, Exception):
                    raise result
                segments = _write_regions(record, rgb, structure, *result, layout=layout, stage_key=stage_key,
                                          selection=selection)
                outputs[index] = {"image_id": record["image_id"], "status": STATUS_OK, "error": None,
                                  "region_method": method, "segments": segments}
            except Exception as exc:  # noqa: BLE001 - one bad image is a recorded failure
                fail(index, record, exc)
        pending.clear()

    pixels = 0
    for index, record in enumerate(records):
        if record.get("status", STATUS_OK) != STATUS_OK:
            error = f"skipped: an earlier stage failed ({record.get('error')})"
            outputs[index] = _failed(record.get("image_id"), error, method)
            continue
        try:
            rgb, structure = _load_record(record, layout=layout, needs_structure=method == "structure",
                                          max_pixels=max_pixels)
        except Exception as exc:  # noqa: BLE001 - one bad image is a recorded failure
            fail(index, record, exc)
            continue
        pending.append((index, record, rgb, structure))
        pixels += rgb.shape[0] * rgb.shape[1]
        if len(pending) >= batch or pixels >= _BATCH_PIXELS:
            flush()
            pixels = 0
    flush()
    return outputs


# Images decoded and grouped together: at most this many, and no more once they hold this many pixels (memory).
_GROUPING_BATCH = 8
_BATCH_PIXELS = 16_000_000


def _propose_each(items: list[tuple[np.ndarray, "np.ndarray | None"]], propose: Callable,
                  propose_many: Callable | None) -> list:
    """Return each item's proposals (boxes, scores, areas), or the exception proposing it raised."""
    if propose_many is not None and len(items) > 1:
        try:
            return propose_many(items)
        except Exception:  # noqa: BLE001 - one image failed: propose each alone, so that only it fails
            pass
    results: list = []
    for rgb, structure in items:
        try:
            results.append(propose(rgb, structure))
        except Exception as exc:  # noqa: BLE001 - recorded as this image's failure
            results.append(exc)
    return results


def _no_proposer(rgb: np.ndarray, structure: np.ndarray | None):
    raise AssertionError("no record should reach a proposer when none is ok")


def _sam_proposer(rgb: np.ndarray, structure: np.ndarray | None, *, generator, max_side: int):
    return sam_boxes(rgb, generator, max_side=max_side)


def _sam_model_proposer(rgb: np.ndarray, structure: np.ndarray | None, *, generator, **options):
    return sam_model_boxes(rgb, generator, **options)


def _grouping_proposer(rgb: np.ndarray, structure: np.ndarray | None, *, work_side: int):
    proposals = grouping_boxes(rgb, structure, work_side=work_side)
    return proposals.boxes, proposals.scores, proposals.area_fractions


def _grouping_proposer_many(items: list[tuple[np.ndarray, "np.ndarray | None"]], *, work_side: int):
    return [(p.boxes, p.scores, p.area_fractions) for p in grouping_boxes_many(items, work_side=work_side)]


def _structure_proposer(rgb: np.ndarray, structure: np.ndarray | None, *, dilation: int):
    height, width = rgb.shape[:2]
    map_boxes = structure_boxes(structure, dilation=dilation)
    boxes = scale_boxes(map_boxes, (structure.shape[1], structure.shape[0]), (width, height))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / float(width * height)
    return boxes, areas.astype(np.float64), areas.astype(np.float64)


def _failed(image_id: str | None, error: str, method: str) -> dict:
    return {"image_id": image_id, "status": STATUS_FAILED, "error": error, "region_method": method, "segments": []}


# Structure crops are cut from edge maps (mostly 0 with thin lines): PNG rows unfiltered and deflate's run-length
# strategy encode them about 4 times faster than the adaptive row filters of storage.atomic.write_png, and smaller;
# PNG is lossless, so the pixels are the same.
_STRUCTURE_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.11 chooses the row filter
    _STRUCTURE_PNG += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def _encode_structure_crop(path: Path, crop: np.ndarray) -> bytes:
    """Return a uint8 (h, w) structure-map crop encoded as PNG (``path``: its file, for the error)."""
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(crop), _STRUCTURE_PNG)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    return buffer.tobytes()


def _load_record(
    record: dict, *, layout: OutputLayout, needs_structure: bool, max_pixels: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Return one record's RGB image and structure map (None without one); raises on any problem with them."""
    image_id, source_path = record.get("image_id"), record.get("source_path")
    if not image_id or not source_path:
        raise RegionInputError(f"invalid record: expected image_id and source_path, got keys {sorted(record)}")
    name = Path(source_path).name
    rgb = load_rgb(source_path, max_pixels=max_pixels, validated=True)  # ingest validated every source it passes on
    height, width = rgb.shape[:2]
    structure = None
    if record.get("structure_path"):
        structure = _read_structure_map(layout.resolve(record["structure_path"]), name)
        _check_aspect((structure.shape[1], structure.shape[0]), (width, height), name)
    if needs_structure and structure is None:
        raise RegionInputError(f"no structure map to propose regions from (structure stage failed or not run) ({name})")
    return rgb, structure


def _write_regions(
    record: dict,
    rgb: np.ndarray,
    structure: np.ndarray | None,
    boxes: np.ndarray,
    scores: np.ndarray,
    areas: np.ndarray,
    *,
    layout: OutputLayout,
    stage_key: str,
    selection: dict,
) -> list[dict]:
    """Return the segments of one record's kept proposals after writing their crops."""
    image_id = record["image_id"]
    height, width = rgb.shape[:2]
    kept = select_boxes(boxes, scores, areas, **selection)
    if not kept.size:
        return []
    chosen = boxes[kept]
    # Largest box first; equal areas keep the selection's (score) order.
    chosen = chosen[np.argsort(-((chosen[:, 2] - chosen[:, 0]) * (chosen[:, 3] - chosen[:, 1])), kind="stable")]
    if structure is not None:  # the same boxes on the structure map, all at once
        structure_boxes_of = scale_boxes(chosen, (width, height), (structure.shape[1], structure.shape[0])).tolist()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # once for every crop
    segments = []
    # The image's crops are written into a staging folder that replaces its crops folder whole: they appear
    # together (a killed run leaves no half set), the crops of an earlier run with more regions go, and no file gets
    # a temporary name and a rename of its own (32 of each per image at 16 regions).
    with atomic_directory(layout.crop(image_id, stage_key, 0).parent) as staging:
        staging_folder = os.fspath(staging)
        for index, (x1, y1, x2, y2) in enumerate(chosen.tolist()):
            crop_path = layout.crop(image_id, stage_key, index)
            write_new_file(os.path.join(staging_folder, crop_path.name),
                           encode_jpeg(bgr[y1:y2, x1:x2], bgr=True, name=crop_path))
            structure_crop_path = None
            if structure is not None:
                sx1, sy1, sx2, sy2 = structure_boxes_of[index]
                structure_crop_path = layout.structure_crop(image_id, stage_key, index)
                write_new_file(os.path.join(staging_folder, structure_crop_path.name),
                               _encode_structure_crop(structure_crop_path, structure[sy1:sy2, sx1:sx2]))
            segments.append(
                {
                    "bbox": bbox(x1, y1, x2, y2),
                    "crop_path": layout.relative(crop_path),
                    "structure_crop_path": layout.relative(structure_crop_path) if structure_crop_path else None,
                }
            )
    return segments

"""Structure stage: Canny edge maps (+ scribble, optional LoG / Sobel) of every image, as 8-bit PNGs.

Two backends share one interface (``StructureExtractor``): OpenCV across a process pool (CPU), and kornia on batched
tensors (GPU; it also runs on CPU, slowly, which the agreement tests use). Every map is uint8, white (255) strokes
on black (0), at the size PIL ``thumbnail((long_side, long_side))`` gives.
"""

from __future__ import annotations

import concurrent.futures as futures
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np

from pipelines.steps.errors import one_line
from pipelines.steps.images import ImageLoadError, load_grey_resized
from storage.atomic import atomic_write_bytes, raise_if_storage_error, write_png
from storage.layout import OutputLayout
from storage.manifest import STATUS_FAILED, STATUS_OK
from structxlip.devices import cuda_available, resolve_device

VERSION = "1"


MAP_KINDS = ("canny", "scribble", "log", "sobel")
EXTRA_KINDS = ("log", "sobel")
# Output record key of each map kind (the Canny map is the stage's main "structure" map).
PATH_KEYS = {"canny": "structure_path", "scribble": "scribble_path", "log": "log_path", "sobel": "sobel_path"}
# ControlNet's scribble preprocessor binarises its final blur at 4/255: strokes grow by ~2 sigma on each side.
_STROKE_LEVEL = 4.0
# Neighbour pairs of the four directions (horizontal, vertical, both diagonals) of the scribble's ridge NMS.
_NMS_OFFSETS = (((0, -1), (0, 1)), ((-1, 0), (1, 0)), ((-1, -1), (1, 1)), ((-1, 1), (1, -1)))
# The ridge's downward curvature must exceed this share of the pixel's value, so flat plateaus and float noise are
# not ridges.
_RIDGE_CURVATURE = 1e-3
# Second differences along the diagonals span sqrt(2) pixels: halve them to compare with the axis-aligned ones.
_STEP_SCALE = np.array([1.0, 1.0, 0.5, 0.5], np.float32)
_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)


# ---- pure map functions (numpy / OpenCV) -------------------------------------------------------------------------


def _check_grey(image: np.ndarray, what: str = "grey image") -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected a {what} as a uint8 (H, W) array, got {got}")
    return image


def gaussian_ksize(sigma: float) -> int:
    """Return the odd Gaussian kernel size both backends use for ``sigma`` (covers +-4 sigma).

    4 sigma, not OpenCV's usual 3: the step where a truncated kernel leaves a blurred stroke's end is then far
    below the ridge test's curvature tolerance.
    """
    return 2 * math.ceil(4.0 * sigma) + 1


def canny_map(grey: np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """Return the (H, W) uint8 Canny edge map (L1 gradient, aperture 3, as ``cv2.Canny``'s defaults)."""
    return cv2.Canny(_check_grey(grey), float(low), float(high), L2gradient=False)


def sobel_map(grey: np.ndarray) -> np.ndarray:
    """Return the (H, W) uint8 Sobel gradient magnitude, scaled so the image's maximum is 255."""
    g = _check_grey(grey).astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    magnitude = np.sqrt(gx * gx + gy * gy)
    peak = float(magnitude.max())
    if peak <= 0:
        return np.zeros_like(grey)
    return np.rint(magnitude * (255.0 / peak)).astype(np.uint8)


def _zero_crossings(response: np.ndarray, threshold: float) -> np.ndarray:
    # A pixel is on an edge when it is negative and a 4-neighbour is positive with a jump above the threshold; only
    # the negative side is marked, so a step gives a 1-pixel line.
    padded = np.pad(response, 1, mode="edge")
    h, w = response.shape
    level = threshold * float(np.abs(response).max())
    edge = np.zeros(response.shape, bool)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        neighbour = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        edge |= (response < 0) & (neighbour > 0) & (neighbour - response > level)
    return np.where(edge, 255, 0).astype(np.uint8)


def log_map(grey: np.ndarray, sigma: float = 2.0, threshold: float = 0.1) -> np.ndarray:
    """Return the (H, W) uint8 Laplacian-of-Gaussian edge map: zero crossings whose jump exceeds ``threshold`` x max."""
    g = _check_grey(grey).astype(np.float32)
    k = gaussian_ksize(sigma)
    blurred = cv2.GaussianBlur(g, (k, k), sigma, borderType=cv2.BORDER_REFLECT_101)
    response = cv2.filter2D(blurred, cv2.CV_32F, _LAPLACIAN, borderType=cv2.BORDER_REPLICATE)
    return _zero_crossings(response, threshold)


# Position in a raveled 3x3 neighbourhood of each direction's first and second neighbour.
_FIRST = tuple((dy + 1) * 3 + dx + 1 for (dy, dx), _ in _NMS_OFFSETS)
_SECOND = tuple((dy + 1) * 3 + dx + 1 for _, (dy, dx) in _NMS_OFFSETS)


def _ridge_at(flat: np.ndarray, width: int, candidates: np.ndarray) -> np.ndarray:
    """Return the (K,) bool ridge test (see ``scribble_map``) of the flat indices ``candidates`` into ``flat``.

    ``flat`` is a blurred float32 map inside a constant 0 frame of one pixel, raveled with rows of ``width``; the
    candidates must lie inside the frame.
    """
    # One gather of every candidate's 3x3 neighbourhood: row n of ``around`` is neighbour n (raveled 3x3 order).
    offsets = np.array([dy * width + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)], np.intp)
    around = flat.take(candidates[None, :] + offsets[:, None])
    value = around[4]
    twice = 2 * value
    bend = up = is_max = None
    for first, second, scale in zip(_FIRST, _SECOND, _STEP_SCALE):
        curvature = (around[first] + around[second] - twice) * scale
        local_max = (value >= around[first]) & (value >= around[second])
        if bend is None:
            bend, up, is_max = curvature, curvature, local_max
            continue
        better = curvature < bend  # strict: the first direction wins ties
        bend = np.where(better, curvature, bend)
        is_max = np.where(better, local_max, is_max)
        up = np.maximum(up, curvature)
    return is_max & (bend < -_RIDGE_CURVATURE * value) & (-bend >= up)


def scribble_map(
    edges: np.ndarray, *, sigma: float = 3.0, threshold: float = 0.1, final_sigma: float = 1.0
) -> np.ndarray:
    """Return the (H, W) uint8 scribble of an edge map: blur, 4-direction ridge NMS, relative threshold, thicken.

    Non-maximum suppression picks, per pixel, the one of the four directions (horizontal, vertical, two diagonals)
    with the strongest downward curvature, i.e. across the stroke, and keeps the pixel when it is a maximum along
    it and that curvature dominates any upward one (a discrete Hessian ridge test; the plain "maximum along any
    direction" rule also keeps the flat band along straight strokes and the outside of curves). Ridges above
    ``threshold`` x the map's maximum are blurred by ``final_sigma`` and binarised at 4/255 (ControlNet's level).
    """
    edges = _check_grey(edges, "edge map")
    h, w = edges.shape
    # The blurred map goes into the inside of a zero frame: the NMS reads its neighbours there (x >= 0, so the 0
    # border never beats a pixel, as the torch version's padding).
    padded = np.zeros((h + 2, w + 2), np.float32)
    x = padded[1:-1, 1:-1]
    kernel = cv2.getGaussianKernel(gaussian_ksize(sigma), sigma, cv2.CV_32F)
    cv2.sepFilter2D(edges, cv2.CV_32F, kernel, kernel, dst=x, borderType=cv2.BORDER_REFLECT_101)
    peak = float(x.max())
    if peak <= 0:
        return np.zeros_like(edges)
    # Only pixels above the threshold can become strokes (a pixel at 0 is never a ridge: it cannot be a strict
    # maximum of a map >= 0), a few percent of a photo's: the ridge test runs on those alone.
    candidates = np.flatnonzero(padded > max(threshold * peak, 0.0))
    rows, cols = np.divmod(candidates[_ridge_at(padded.ravel(), w + 2, candidates)], w + 2)
    strokes = np.zeros(edges.shape, np.uint8)
    strokes[rows - 1, cols - 1] = 255
    if final_sigma <= 0:
        return strokes
    kf = gaussian_ksize(final_sigma)
    kernel = cv2.getGaussianKernel(kf, final_sigma, cv2.CV_32F)
    blurred = cv2.sepFilter2D(strokes, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)
    return cv2.compare(blurred, _STROKE_LEVEL, cv2.CMP_GT)


# ---- parameters and jobs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StructureParams:
    """Everything that determines the maps of one image (part of the stage key)."""

    long_side: int = 512
    canny_low: float = 100.0
    canny_high: float = 200.0
    extra_maps: tuple[str, ...] = ()
    scribble_sigma: float = 3.0
    scribble_threshold: float = 0.1
    scribble_final_sigma: float = 1.0
    log_sigma: float = 2.0
    max_pixels: int = 178_956_970

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("canny", "scribble") + tuple(k for k in EXTRA_KINDS if k in self.extra_maps)


@dataclass(frozen=True)
class StructureJob:
    """One image to process: where it is and the absolute path each map kind is written to."""

    image_id: str
    source_path: str
    targets: dict[str, str]


def compute_maps(grey: np.ndarray, params: StructureParams) -> dict[str, np.ndarray]:
    """Return {kind: (h, w) uint8 map} for ``params.kinds`` of a resized grey image (OpenCV implementation)."""
    canny = canny_map(grey, params.canny_low, params.canny_high)
    maps = {
        "canny": canny,
        "scribble": scribble_map(
            canny,
            sigma=params.scribble_sigma,
            threshold=params.scribble_threshold,
            final_sigma=params.scribble_final_sigma,
        ),
    }
    if "log" in params.kinds:
        maps["log"] = log_map(grey, params.log_sigma)
    if "sobel" in params.kinds:
        maps["sobel"] = sobel_map(grey)
    return maps


def _ok(job: StructureJob) -> dict:
    return {"image_id": job.image_id, "status": STATUS_OK, "error": None, "targets": dict(job.targets)}


def _failed(image_id: str | None, error: str) -> dict:
    return {"image_id": image_id, "status": STATUS_FAILED, "error": error, "targets": {}}


def _describe(exc: BaseException, source_path: str) -> str:
    if isinstance(exc, ImageLoadError):
        return str(exc)
    return f"structure extraction failed: {one_line(exc)} ({Path(source_path).name})"


# Binary maps (0/255) compress best unfiltered with run-length deflate: 4x faster to encode than the default
# adaptive filtering, and half the size (~1.5 KB for a 512x384 Canny map). Still plain 8-bit grey PNGs.
_BINARY_PNG = [
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
]  # fmt: skip
_BINARY_KINDS = ("canny", "scribble", "log")


def _write_maps(job: StructureJob, maps: dict[str, np.ndarray]) -> None:
    for kind, target in job.targets.items():
        if kind not in _BINARY_KINDS:
            write_png(target, maps[kind])
            continue
        ok, encoded = cv2.imencode(".png", maps[kind], _BINARY_PNG)
        if not ok:
            raise OSError(f"PNG encoding failed for {Path(target).name}")
        # Regenerable maps: atomic (never half-written) but not fsynced, as storage.atomic.write_png.
        atomic_write_bytes(target, encoded.tobytes(), durable=False)


def _load(job: StructureJob, params: StructureParams) -> np.ndarray:
    # Sources come from ingest, which validated them (validate_image): OpenCV's fast decoding.
    return load_grey_resized(job.source_path, long_side=params.long_side, max_pixels=params.max_pixels,
                             validated=True)


def extract_one(job: StructureJob, params: StructureParams) -> dict:
    """Decode, resize, compute and write every map of one image with OpenCV; return its result (never raises)."""
    try:
        _write_maps(job, compute_maps(_load(job, params), params))
        return _ok(job)
    except Exception as exc:  # noqa: BLE001 - one bad image is a recorded failure, not a crash
        raise_if_storage_error(exc)
        return _failed(job.image_id, _describe(exc, job.source_path))


# ---- backends ---------------------------------------------------------------------------------------------------


class StructureExtractor(Protocol):
    """A backend: computes and writes the maps of a list of jobs, returns one result per job (in order)."""

    name: str

    def __call__(self, jobs: Sequence[StructureJob], params: StructureParams) -> list[dict]: ...


class OpenCVExtractor:
    """CPU backend: one image after another in this process. Parallelism is the engine's: it hands whole chunks to
    its worker processes (``pipelines.engine.workers``)."""

    name = "opencv"

    def __call__(self, jobs: Sequence[StructureJob], params: StructureParams) -> list[dict]:
        return [extract_one(job, params) for job in jobs]


class KorniaExtractor:
    """Tensor backend: images of equal size are batched through kornia's Canny and a torch scribble."""

    name = "kornia"

    def __init__(self, device: str = "auto", batch_size: int = 32, io_threads: int = 4):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.io_threads = io_threads

    def __call__(self, jobs: Sequence[StructureJob], params: StructureParams) -> list[dict]:
        results: list[dict | None] = [None] * len(jobs)

        def load(index: int) -> np.ndarray | None:
            try:
                return _load(jobs[index], params)
            except Exception as exc:  # noqa: BLE001
                results[index] = _failed(jobs[index].image_id, _describe(exc, jobs[index].source_path))
                return None

        # Decoding and PNG encoding release the GIL in OpenCV, so threads overlap them with the GPU work.
        with futures.ThreadPoolExecutor(self.io_threads) as io:
            greys = list(io.map(load, range(len(jobs))))
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)
            pad = gaussian_ksize(max(params.scribble_sigma, params.log_sigma)) // 2
            for index, grey in enumerate(greys):
                if grey is None:
                    continue
                if min(grey.shape) <= pad:
                    # torch's reflect padding needs a side longer than the pad: tiny images take the OpenCV path.
                    results[index] = self._write(jobs[index], compute_maps(grey, params))
                else:
                    groups[grey.shape].append(index)
            writes = []
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    try:
                        maps = torch_maps(np.stack([greys[i] for i in batch]), params, device=self.device)
                    except Exception as exc:  # noqa: BLE001 - e.g. CUDA out of memory: fail this batch only
                        for i in batch:
                            results[i] = _failed(jobs[i].image_id, _describe(exc, jobs[i].source_path))
                        continue
                    for row, i in enumerate(batch):
                        per_image = {kind: stack[row] for kind, stack in maps.items()}
                        writes.append((i, io.submit(self._write, jobs[i], per_image)))
            for i, future in writes:
                results[i] = future.result()
        return results  # type: ignore[return-value]

    @staticmethod
    def _write(job: StructureJob, maps: dict[str, np.ndarray]) -> dict:
        try:
            _write_maps(job, maps)
            return _ok(job)
        except Exception as exc:  # noqa: BLE001
            raise_if_storage_error(exc)
            return _failed(job.image_id, _describe(exc, job.source_path))


# ---- torch implementation of the maps --------------------------------------------------------------------------


def _torch_blur(x, sigma: float):
    import kornia

    k = gaussian_ksize(sigma)
    # kornia's "reflect" is OpenCV's BORDER_REFLECT_101 (the edge pixel is not repeated).
    return kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="reflect")


def _torch_scribble(edges, *, sigma: float, threshold: float, final_sigma: float):
    """Return (B, 1, H, W) float 0/255 scribbles of (B, 1, H, W) float 0..255 edge maps (same rule as numpy)."""
    import torch
    import torch.nn.functional as F

    x = _torch_blur(edges, sigma)
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=0.0)  # x >= 0, so a 0 border never beats a pixel
    first = torch.stack([padded[..., 1 + a : 1 + a + h, 1 + b : 1 + b + w] for (a, b), _ in _NMS_OFFSETS])
    second = torch.stack([padded[..., 1 + a : 1 + a + h, 1 + b : 1 + b + w] for _, (a, b) in _NMS_OFFSETS])
    scale = torch.as_tensor(_STEP_SCALE, dtype=x.dtype, device=x.device).view(4, 1, 1, 1, 1)
    curvature = (first + second - 2 * x) * scale
    across = curvature.argmin(dim=0, keepdim=True)
    bend = curvature.gather(0, across)[0]
    is_max = (x >= first.gather(0, across)[0]) & (x >= second.gather(0, across)[0])
    ridge = is_max & (bend < -_RIDGE_CURVATURE * x) & (-bend >= curvature.amax(dim=0))
    peak = x.amax(dim=(-2, -1), keepdim=True)
    strokes = (ridge & (x > threshold * peak) & (peak > 0)).to(x.dtype) * 255.0
    if final_sigma > 0:
        strokes = _torch_blur(strokes, final_sigma)
    return (strokes > _STROKE_LEVEL).to(x.dtype) * 255.0


def _torch_log(grey, sigma: float, threshold: float = 0.1):
    import torch
    import torch.nn.functional as F

    blurred = _torch_blur(grey, sigma)
    kernel = torch.as_tensor(_LAPLACIAN, dtype=grey.dtype, device=grey.device)[None, None]
    response = F.conv2d(F.pad(blurred, (1, 1, 1, 1), mode="replicate"), kernel)
    padded = F.pad(response, (1, 1, 1, 1), mode="replicate")
    h, w = response.shape[-2:]
    level = threshold * response.abs().amax(dim=(-2, -1), keepdim=True)
    edge = torch.zeros_like(response, dtype=torch.bool)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        neighbour = padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        edge |= (response < 0) & (neighbour > 0) & (neighbour - response > level)
    return edge.to(grey.dtype) * 255.0


def _torch_sobel(grey):
    import kornia

    gradient = kornia.filters.spatial_gradient(grey, normalized=False)  # (B, 1, 2, H, W), replicate border
    magnitude = gradient.pow(2).sum(dim=2).sqrt()
    peak = magnitude.amax(dim=(-2, -1), keepdim=True)
    return (magnitude * (255.0 / peak.clamp_min(1e-12))).round()


def torch_maps(greys: np.ndarray, params: StructureParams, *, device="cpu") -> dict[str, np.ndarray]:
    """Return {kind: (B, h, w) uint8} maps of a (B, h, w) uint8 stack of equal-size grey images, computed in torch."""
    import kornia
    import torch

    if greys.dtype != np.uint8 or greys.ndim != 3:
        raise ValueError(f"expected a uint8 (B, H, W) stack of grey images, got {greys.dtype} {greys.shape}")
    with torch.inference_mode():
        x = torch.from_numpy(greys).to(device, non_blocking=True).float()[:, None]  # grey levels 0..255, as OpenCV
        # kernel_size=1 skips kornia's Gaussian pre-blur, which cv2.Canny does not do; on the 0..255 scale the
        # thresholds are OpenCV's units (kornia's magnitude is L2 where cv2's default is L1, so diagonals differ).
        low = max(float(params.canny_low), 1e-6)  # kornia requires a positive low threshold
        _, edges = kornia.filters.canny(x, low, max(low, float(params.canny_high)), kernel_size=1)
        maps = {"canny": edges * 255.0}
        maps["scribble"] = _torch_scribble(
            maps["canny"],
            sigma=params.scribble_sigma,
            threshold=params.scribble_threshold,
            final_sigma=params.scribble_final_sigma,
        )
        if "log" in params.kinds:
            maps["log"] = _torch_log(x, params.log_sigma)
        if "sobel" in params.kinds:
            maps["sobel"] = _torch_sobel(x)
        return {kind: m[:, 0].to(torch.uint8).cpu().numpy() for kind, m in maps.items()}


# ---- the stage ---------------------------------------------------------------------------------------------------


def select_backend(backend: str, *, batch_size: int = 32, device: str = "auto") -> StructureExtractor:
    """Return the extractor for ``backend`` ("auto": kornia when CUDA is available, else OpenCV)."""
    if backend == "auto":
        backend = "kornia" if cuda_available() else "opencv"
    if backend == "opencv":
        return OpenCVExtractor()
    if backend == "kornia":
        return KorniaExtractor(device=device, batch_size=batch_size)
    raise ValueError(f"unknown structure backend {backend!r} (expected auto, opencv or kornia)")


def extract_structure(
    records: list[dict],
    *,
    layout: OutputLayout,
    stage_key: str,
    backend: str | StructureExtractor = "auto",
    long_side: int = 512,
    canny_low: float = 100.0,
    canny_high: float = 200.0,
    extra_maps: Sequence[str] = (),
    scribble_sigma: float = 3.0,
    scribble_threshold: float = 0.1,
    scribble_final_sigma: float = 1.0,
    log_sigma: float = 2.0,
    max_pixels: int = 178_956_970,
    batch_size: int = 32,
    device: str = "auto",
) -> list[dict]:
    """Write the structure maps of each record (``image_id``, ``source_path``); return one result per record.

    Results: ``{image_id, status, error, structure_path, scribble_path, log_path, sobel_path}``, paths relative to
    ``layout.root`` (log/sobel are None unless requested in ``extra_maps``).
    """
    unknown = sorted(set(extra_maps) - set(EXTRA_KINDS))
    if unknown:
        raise ValueError(f"unknown extra structure maps {unknown} (expected a subset of {list(EXTRA_KINDS)})")
    if canny_low > canny_high:
        raise ValueError(f"canny_low ({canny_low}) must not exceed canny_high ({canny_high})")
    if long_side <= 0:
        raise ValueError(f"long_side must be > 0, got {long_side}")
    params = StructureParams(
        long_side=long_side,
        canny_low=float(canny_low),
        canny_high=float(canny_high),
        extra_maps=tuple(k for k in EXTRA_KINDS if k in extra_maps),
        scribble_sigma=float(scribble_sigma),
        scribble_threshold=float(scribble_threshold),
        scribble_final_sigma=float(scribble_final_sigma),
        log_sigma=float(log_sigma),
        max_pixels=max_pixels,
    )
    outputs: list[dict | None] = [None] * len(records)
    jobs: list[StructureJob] = []
    positions: list[int] = []
    for position, record in enumerate(records):
        image_id, source_path = record.get("image_id"), record.get("source_path")
        if record.get("status", STATUS_OK) != STATUS_OK:
            outputs[position] = _failed(image_id, f"skipped: an earlier stage failed ({record.get('error')})")
        elif not image_id or not source_path:
            outputs[position] = _failed(image_id, "invalid record: expected image_id and source_path")
        else:
            targets = {kind: str(layout.structure_map(image_id, stage_key, kind)) for kind in params.kinds}
            jobs.append(StructureJob(image_id=image_id, source_path=str(source_path), targets=targets))
            positions.append(position)
    if jobs:
        extractor = select_backend(backend, batch_size=batch_size, device=device) if isinstance(
            backend, str
        ) else backend
        for position, result in zip(positions, extractor(jobs, params)):
            outputs[position] = result
    return [_to_record(result, layout) for result in outputs]  # type: ignore[arg-type]


def _to_record(result: dict, layout: OutputLayout) -> dict:
    record = {"image_id": result["image_id"], "status": result["status"], "error": result["error"]}
    for kind, key in PATH_KEYS.items():
        target = result["targets"].get(kind)
        record[key] = layout.relative(target) if target else None
    return record

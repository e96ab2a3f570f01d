"""Generated scenes with several objects and known boxes, for region-proposer tests and the regions benchmark.

A scene is a textured background (noise, stripes, checks or a gradient, several patches of each), two to five
objects (ellipses, rectangles, polygons and two-part "figures", filled with shaded colour or a texture, some of them
overlapping) and clutter (many small shapes under 0.5% of the image). The ground truth is the box of each object's
visible pixels (x2/y2 exclusive), kept when the object is at least half visible and its box covers 1%-80% of the image.

    scene = make_scene(seed=3)                       # Scene(rgb (480, 640, 3) uint8, boxes (N, 4) int64)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Scene:
    """One generated image and the (N, 4) int64 xyxy boxes (x2/y2 exclusive) of its objects."""

    rgb: np.ndarray
    boxes: np.ndarray


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Return an (H, W, 3) float32 texture in 0..255: blurred noise, stripes, checks or a gradient."""
    kind = rng.integers(0, 4)
    base = rng.uniform(30, 225, 3).astype(np.float32)
    other = np.clip(base + rng.uniform(-90, 90, 3), 0, 255).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:  # blurred noise at a random grain
        grain = float(rng.uniform(1.0, 6.0))
        noise = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), grain)
        mix = np.clip(0.5 + noise / (4 * noise.std() + 1e-6), 0, 1)
    elif kind == 1:  # stripes at a random angle and period
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
        mix = 0.5 + 0.5 * np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 2:  # checks
        cell = int(rng.integers(6, 30))
        mix = ((xs // cell + ys // cell) % 2).astype(np.float32)
    else:  # a smooth gradient
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        mix = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    return base * (1 - mix[..., None]) + other * mix[..., None]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Return an (H, W, 3) float32 background of one texture with one to three patches of others (soft edges)."""
    image = _texture(rng, height, width)
    for _ in range(rng.integers(1, 4)):
        mask = np.zeros((height, width), np.float32)
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        axes = (int(rng.integers(width // 6, width // 2)), int(rng.integers(height // 6, height // 2)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), 15)[..., None]
        image = image * (1 - mask) + _texture(rng, height, width) * mask
    return image


def _object_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Return an (H, W) bool mask of one object: an ellipse, a rectangle, a polygon or a two-part figure."""
    mask = np.zeros((height, width), np.uint8)
    area = rng.uniform(0.02, 0.25) * height * width
    aspect = rng.uniform(0.5, 2.0)
    w = int(np.clip(np.sqrt(area * aspect), 12, width * 0.9))
    h = int(np.clip(area / w, 12, height * 0.9))
    x1, y1 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    kind = rng.integers(0, 4)
    if kind == 0:
        cv2.ellipse(mask, (x1 + w // 2, y1 + h // 2), (w // 2, h // 2), 0, 0, 360, 1, -1)
    elif kind == 1:
        cv2.rectangle(mask, (x1, y1), (x1 + w - 1, y1 + h - 1), 1, -1)
    elif kind == 2:
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 9))))
        radii = rng.uniform(0.6, 1.0, angles.size)
        points = np.stack([x1 + w / 2 + radii * w / 2 * np.cos(angles), y1 + h / 2 + radii * h / 2 * np.sin(angles)],
                          axis=1)
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    else:  # a body with a head on top (a figure made of parts)
        head = max(h // 4, 4)
        cv2.ellipse(mask, (x1 + w // 2, y1 + head), (max(w // 5, 3), head), 0, 0, 360, 1, -1)
        cv2.ellipse(mask, (x1 + w // 2, y1 + head + (h - head) // 2), (w // 2, (h - head) // 2), 0, 0, 360, 1, -1)
    return mask.astype(bool)


def make_scene(seed: int, size: tuple[int, int] = (640, 480), max_objects: int = 5) -> Scene:
    """Return a scene of (w, h) ``size`` with 2..``max_objects`` objects, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = _background(rng, height, width)
    owner = np.full((height, width), -1, np.int32)  # which object each pixel shows (-1: background)
    n_objects = int(rng.integers(2, max_objects + 1))
    drawn = []
    for index in range(n_objects):
        mask = _object_mask(rng, height, width)
        fill = _texture(rng, height, width) if rng.random() < 0.4 else np.broadcast_to(
            rng.uniform(0, 255, 3).astype(np.float32), (height, width, 3))
        # Shading: light from a random side, so an object is not one flat colour.
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        shade = 1.0 + 0.25 * np.sin((xs * np.cos(angle) + ys * np.sin(angle)) / max(width, height) * np.pi)
        image[mask] = np.clip(fill[mask] * shade[mask][:, None], 0, 255)
        owner[mask] = index
        drawn.append(int(mask.sum()))
    for _ in range(int(rng.integers(5, 30))):  # clutter: small shapes, not objects to find
        radius = int(rng.integers(2, max(3, int(0.04 * min(width, height)))))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        clutter = np.zeros((height, width), np.uint8)
        if rng.random() < 0.5:
            cv2.circle(clutter, centre, radius, 1, -1)
        else:
            cv2.rectangle(clutter, centre, (centre[0] + radius, centre[1] + 2 * radius), 1, -1)
        image[clutter > 0] = colour
        owner[clutter > 0] = -1
    image += rng.normal(0, 4, image.shape).astype(np.float32)  # sensor noise
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    boxes = []
    for index, full_area in enumerate(drawn):
        ys, xs = np.nonzero(owner == index)
        if xs.size < 0.5 * full_area:
            continue  # mostly hidden by later objects or clutter: not a fair object to ask for
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        fraction = (box[2] - box[0]) * (box[3] - box[1]) / (width * height)
        if 0.01 <= fraction <= 0.8:
            boxes.append(box)
    return Scene(rgb=rgb, boxes=np.asarray(boxes, np.int64).reshape(-1, 4))


def box_recall(truth: np.ndarray, proposals: np.ndarray, iou: float = 0.5) -> tuple[int, int]:
    """Return (found, total): how many ``truth`` boxes have a proposal with IoU >= ``iou`` (xyxy, x2/y2 exclusive)."""
    truth = np.asarray(truth, np.float64).reshape(-1, 4)
    proposals = np.asarray(proposals, np.float64).reshape(-1, 4)
    if truth.size == 0 or proposals.size == 0:
        return 0, len(truth)
    x1 = np.maximum(truth[:, None, 0], proposals[None, :, 0])
    y1 = np.maximum(truth[:, None, 1], proposals[None, :, 1])
    x2 = np.minimum(truth[:, None, 2], proposals[None, :, 2])
    y2 = np.minimum(truth[:, None, 3], proposals[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_t = (truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])
    area_p = (proposals[:, 2] - proposals[:, 0]) * (proposals[:, 3] - proposals[:, 1])
    overlap = inter / (area_t[:, None] + area_p[None, :] - inter)
    return int((overlap.max(axis=1) >= iou).sum()), len(truth)

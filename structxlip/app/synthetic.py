"""A small, self-consistent synthetic output folder (coloured shapes + matching captions) for tests and demos.

Every image holds two coloured shapes in a spatial relation; its caption says which ("a red circle above a blue
square. ..."), the filtered caption drops the colour words, and each shape is one segment with a matching local
caption. The folder has the same layout and manifest schema as a real pipeline run, built only from ``storage``.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from storage.atomic import write_jpeg, write_png
from storage.hashing import content_key, file_digest
from storage.layout import IMAGE_ID_LENGTH, OutputLayout
from storage.manifest import STATUS_FAILED, STATUS_OK, bbox, manifest_table
from storage.parquet import write_parquet_atomic

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
# (relation of shape A to shape B, its opposite, how the two are laid out: A above B or A left of B)
RELATIONS = (("above", "below", "vertical"), ("below", "above", "vertical"), ("left of", "right of", "horizontal"),
             ("right of", "left of", "horizontal"))
SIZE_WORDS = {True: "large", False: "small"}
SYNTHETIC_KEY = "synthetic"


def _draw_shape(canvas: np.ndarray, shape: str, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        centre = ((x1 + x2 - 1) // 2, (y1 + y2 - 1) // 2)
        cv2.circle(canvas, centre, max(1, (min(x2 - x1, y2 - y1) - 1) // 2), colour, thickness=-1)
    elif shape == "square":
        cv2.rectangle(canvas, (x1, y1), (x2 - 1, y2 - 1), colour, thickness=-1)
    else:
        points = np.array([[(x1 + x2 - 1) // 2, y1], [x1, y2 - 1], [x2 - 1, y2 - 1]], dtype=np.int32)
        cv2.fillPoly(canvas, [points], colour)


def _place(rng: np.random.Generator, image_size: int, layout: str, large_a: bool, large_b: bool):
    """Return the boxes (x1, y1, x2, y2) of shapes A and B, A in the first half along ``layout``'s axis."""
    half = image_size // 2
    boxes = []
    for slot, large in ((0, large_a), (1, large_b)):
        side = int(half * (0.8 if large else 0.5))
        along = slot * half + int(rng.integers(0, half - side + 1))
        across = int(rng.integers(0, image_size - side + 1))
        x1, y1 = (across, along) if layout == "vertical" else (along, across)
        boxes.append((x1, y1, x1 + side, y1 + side))
    return boxes


def _scribble(edges: np.ndarray) -> np.ndarray:
    """Return a thick, simplified stroke map (uint8 0/255) from an edge map."""
    smooth = cv2.GaussianBlur(edges.astype(np.float32) / 255.0, (0, 0), sigmaX=1.5)
    strokes = (smooth > 0.08).astype(np.uint8) * 255
    return cv2.dilate(strokes, np.ones((3, 3), np.uint8))


def _split(index: int) -> str:
    return "test" if index % 4 == 3 else "val" if index % 8 == 6 else "train"


def make_synthetic_manifest(
    out_dir: str | os.PathLike, n_images: int = 24, image_size: int = 96, seed: int = 0, include_failed: bool = True
) -> Path:
    """Write images, structure maps, crops and a manifest under ``out_dir``; return the manifest folder."""
    if n_images < 1 or image_size < 32:
        raise ValueError(f"expected n_images >= 1 and image_size >= 32, got {n_images} and {image_size}")
    layout = OutputLayout(out_dir)
    images_dir = layout.root / "images"
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for index in range(n_images):
        colour_a, colour_b = rng.choice(list(COLOURS), size=2, replace=False)
        shape_a, shape_b = rng.choice(SHAPES, size=2, replace=False)
        relation, opposite, axis = RELATIONS[int(rng.integers(len(RELATIONS)))]
        large_a, large_b = bool(rng.integers(2)), bool(rng.integers(2))
        box_a, box_b = _place(rng, image_size, axis, large_a, large_b)
        # Faint noise keeps every file (and so every content-addressed image id) unique without creating edges.
        canvas = np.clip(235 + rng.normal(0, 3, (image_size, image_size, 3)), 0, 255).astype(np.uint8)
        _draw_shape(canvas, str(shape_a), COLOURS[str(colour_a)], box_a)
        _draw_shape(canvas, str(shape_b), COLOURS[str(colour_b)], box_b)
        if relation in ("below", "right of"):  # A sits in the first half, so name B first ("B below A")
            (colour_a, shape_a, box_a, large_a), (colour_b, shape_b, box_b, large_b) = (
                (colour_b, shape_b, box_b, large_b),
                (colour_a, shape_a, box_a, large_a),
            )
        source_path = write_png(images_dir / f"shapes-{index:03d}.png", canvas)
        image_id = file_digest(source_path)[:IMAGE_ID_LENGTH]

        sizes = f"the {shape_a} is {SIZE_WORDS[large_a]} and the {shape_b} is {SIZE_WORDS[large_b]}."
        caption = f"a {colour_a} {shape_a} {relation} a {colour_b} {shape_b}. {sizes}"
        filtered_caption = f"a {shape_a} {relation} a {shape_b}. {sizes}"
        hard_negatives = [
            f"a {colour_b} {shape_a} {relation} a {colour_a} {shape_b}. {sizes}",
            f"a {colour_a} {shape_a} {opposite} a {colour_b} {shape_b}. {sizes}",
        ]

        edges = cv2.Canny(cv2.cvtColor(canvas, cv2.COLOR_RGB2GRAY), 100, 200)
        structure_path = write_png(layout.structure_map(image_id, SYNTHETIC_KEY, "canny"), edges)
        scribble_path = write_png(layout.structure_map(image_id, SYNTHETIC_KEY, "scribble"), _scribble(edges))

        segment_specs = [
            (box_a, f"a {colour_a} {shape_a}", f"a {shape_a}"),
            (box_b, f"a {colour_b} {shape_b}", f"a {shape_b}"),
        ]
        if index % 2 == 0:  # every other image also gets the pair as a third, wider segment
            union = (min(box_a[0], box_b[0]), min(box_a[1], box_b[1]), max(box_a[2], box_b[2]), max(box_a[3], box_b[3]))
            segment_specs.append((union, f"a {colour_a} {shape_a} and a {colour_b} {shape_b}", f"a {shape_a} and a {shape_b}"))
        segments = []
        for n, ((x1, y1, x2, y2), local_caption, local_filtered) in enumerate(segment_specs):
            segments.append({
                "bbox": bbox(x1, y1, x2, y2),
                "crop_path": layout.relative(write_jpeg(layout.crop(image_id, SYNTHETIC_KEY, n),
                                                        np.ascontiguousarray(canvas[y1:y2, x1:x2]))),
                "structure_crop_path": layout.relative(write_png(layout.structure_crop(image_id, SYNTHETIC_KEY, n),
                                                                 np.ascontiguousarray(edges[y1:y2, x1:x2]))),
                "caption": local_caption,
                "filtered_caption": local_filtered,
                # CLIP-logit-like scores (METHOD section 2: typically 15-30), distinct so ranking is unambiguous.
                "similarity_score": float(np.float32(18.0 + 10.0 * rng.random())),
            })
        rows.append({
            "image_id": image_id,
            "source_path": str(Path(source_path).resolve()),
            "status": STATUS_OK,
            "error": None,
            "width": image_size,
            "height": image_size,
            "caption": caption,
            "caption_source": "synthetic",
            "filtered_caption": filtered_caption,
            "structure_path": layout.relative(structure_path),
            "scribble_path": layout.relative(scribble_path),
            "split": _split(index),
            "segments": segments,
            "hard_negatives": hard_negatives,
        })
    if include_failed:
        broken = images_dir / "broken.png"
        broken.parent.mkdir(parents=True, exist_ok=True)
        broken.write_bytes(b"not an image")
        rows.append({
            "image_id": file_digest(broken)[:IMAGE_ID_LENGTH],
            "source_path": str(broken.resolve()),
            "status": STATUS_FAILED,
            "error": "cannot decode image: not a PNG/JPEG file",
            "split": "train",
        })
    write_parquet_atomic(manifest_table(rows), layout.manifest_part(content_key("synthetic", n_images, image_size, seed)))
    return layout.manifest_dir

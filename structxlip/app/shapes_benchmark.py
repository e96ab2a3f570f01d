"""A generated retrieval benchmark where structure is the signal and appearance a nuisance.

Each scene holds 1-3 shapes (six classes, two sizes, nine grid positions, overlaps allowed) over a textured
background. Its caption says how many shapes there are, what each is, how large, where, and which overlap, and it also
names every shape's colour and the background's texture. Two scenes are told apart by shape, size and layout; colour
and texture are deliberately unreliable:

- **train**: each shape class has a "home" colour it wears 80% of the time, and backgrounds are mostly striped or
  checkered. A model can lower its training loss by matching colour words to colours instead of shape words to shapes.
- **test**: colours are uniform over the palette and *every shape of a scene has the same colour* (distractor shapes
  share the target's colour), and backgrounds are mostly dotted or textured. Colour words still describe the image
  truthfully but no longer say which shape is which; shape and layout alone identify the caption.

``make_benchmark`` writes ``OUT/train/`` and ``OUT/test/`` (PNG images + ``captions.jsonl``, the format
``pipelines.steps.ingest`` reads, + ``scenes.jsonl`` with the ground truth) and ``OUT/benchmark.json``. Each folder is a
plain image folder for ``structxlip run``; keeping the held-out split in its own folder needs no change to the
hash-based split assignment of ``pipelines.steps.manifest``. Every image is a pure function of ``(seed, split, index)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from storage.atomic import atomic_write_text, write_png

VERSION = "1"
SPLITS = ("train", "test")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 70, 215),
    "yellow": (230, 205, 30),
    "purple": (130, 45, 165),
    "orange": (240, 130, 20),
}
HOME_COLOUR = dict(zip(SHAPES, COLOURS, strict=True))  # train: a class wears its home colour with HOME_PROBABILITY
HOME_PROBABILITY = 0.8
TEXTURES = ("striped", "checkered", "dotted", "textured")
TEXTURE_WEIGHTS = {"train": (0.45, 0.45, 0.05, 0.05), "test": (0.05, 0.05, 0.45, 0.45)}
SHAPE_COUNT_WEIGHTS = (0.3, 0.4, 0.3)  # 1, 2 or 3 shapes
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
POSITION_PHRASES = {"top": "at the top", "left": "on the left", "centre": "in the centre", "right": "on the right",
                    "bottom": "at the bottom"}
SIZES = {"small": 0.24, "large": 0.40}  # side of the shape's box as a fraction of the image side
COUNT_WORDS = ("one shape", "two shapes", "three shapes")
SPLIT_CODES = {"train": 1, "test": 2}


@dataclass(frozen=True)
class Shape:
    """One drawn shape: class, colour name, size word, grid position and its box (x1, y1, x2, y2) in pixels."""

    kind: str
    colour: str
    size: str
    position: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """A generated scene: shapes in drawing order, background texture, overlapping pairs (later, earlier) and text."""

    shapes: tuple[Shape, ...]
    texture: str
    overlaps: tuple[tuple[int, int], ...]
    caption: str
    filtered_caption: str
    local_captions: tuple[str, ...]
    local_filtered_captions: tuple[str, ...]


def _position_phrase(position: str) -> str:
    return POSITION_PHRASES.get(position, f"at the {position}")


def _shape_mask(kind: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Return the (size, size) bool mask of a filled shape inside ``box``."""
    x1, y1, x2, y2 = box
    mask = np.zeros((size, size), np.uint8)
    cx, cy, r = (x1 + x2) / 2.0, (y1 + y2) / 2.0, (x2 - x1) / 2.0
    if kind == "circle":
        cv2.circle(mask, (round(cx), round(cy)), max(1, round(r)), 1, thickness=-1)
    elif kind == "square":
        cv2.rectangle(mask, (x1, y1), (x2 - 1, y2 - 1), 1, thickness=-1)
    else:
        if kind == "triangle":
            points = [(cx, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)]
        elif kind == "diamond":
            points = [(cx, y1), (x2 - 1, cy), (cx, y2 - 1), (x1, cy)]
        elif kind == "cross":
            t = r / 3.0
            points = [(cx - t, y1), (cx + t, y1), (cx + t, cy - t), (x2 - 1, cy - t), (x2 - 1, cy + t),
                      (cx + t, cy + t), (cx + t, y2 - 1), (cx - t, y2 - 1), (cx - t, cy + t), (x1, cy + t),
                      (x1, cy - t), (cx - t, cy - t)]
        elif kind == "star":
            angles = -np.pi / 2 + np.arange(10) * np.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
            points = list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles), strict=True))
        else:
            raise ValueError(f"expected a shape in {SHAPES}, got {kind!r}")
        cv2.fillPoly(mask, [np.round(np.array(points)).astype(np.int32)], 1)
    return mask.astype(bool)


def _background(rng: np.random.Generator, texture: str, size: int) -> np.ndarray:
    """Return a (size, size, 3) uint8 light background with a mid-contrast ``texture``."""
    base = rng.integers(170, 236, size=3).astype(np.float32)
    ys, xs = np.mgrid[0:size, 0:size]
    period = int(rng.integers(6, 13))
    if texture == "striped":
        angle = rng.uniform(0, np.pi)
        pattern = (np.floor((xs * np.cos(angle) + ys * np.sin(angle)) / period) % 2) * 2 - 1
    elif texture == "checkered":
        pattern = ((xs // period + ys // period) % 2) * 2.0 - 1
    elif texture == "dotted":
        pattern = -np.ones((size, size))
        offset = rng.integers(0, period, size=2)
        cv = ((xs + offset[0]) % period - period / 2) ** 2 + ((ys + offset[1]) % period - period / 2) ** 2
        pattern[cv <= (period / 4) ** 2] = 1.0
    elif texture == "textured":
        noise = rng.normal(0, 1, (size // 4 + 1, size // 4 + 1)).astype(np.float32)
        pattern = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC).clip(-1.5, 1.5) / 1.5
    else:
        raise ValueError(f"expected a texture in {TEXTURES}, got {texture!r}")
    # Visible to the RGB encoder, but too weak for Canny (100, 200): the structure map shows the shapes only.
    amplitude = rng.uniform(6, 12)
    tint = rng.uniform(0.6, 1.0, size=3)
    image = base[None, None, :] + amplitude * pattern[..., None] * tint[None, None, :]
    return image.clip(0, 255).astype(np.uint8)


def sample_scene(rng: np.random.Generator, split: str, image_size: int) -> tuple[Scene, np.ndarray]:
    """Return one scene of ``split`` and its (image_size, image_size, 3) uint8 RGB rendering."""
    if split not in SPLITS:
        raise ValueError(f"expected split in {SPLITS}, got {split!r}")
    count = int(rng.choice(3, p=SHAPE_COUNT_WEIGHTS)) + 1
    texture = str(rng.choice(TEXTURES, p=TEXTURE_WEIGHTS[split]))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    kinds = rng.choice(len(SHAPES), size=count, replace=False)
    scene_colour = str(rng.choice(list(COLOURS)))
    cell = image_size / 3.0
    image = _background(rng, texture, image_size)
    shapes: list[Shape] = []
    masks: list[np.ndarray] = []
    for cell_index, kind_index in zip(cells, kinds, strict=True):
        kind = SHAPES[int(kind_index)]
        if split == "test":
            colour = scene_colour
        elif rng.random() < HOME_PROBABILITY:
            colour = HOME_COLOUR[kind]
        else:
            colour = str(rng.choice(list(COLOURS)))
        size_word = str(rng.choice(list(SIZES)))
        side = int(round(SIZES[size_word] * image_size))
        row, column = divmod(int(cell_index), 3)
        jitter = rng.uniform(-0.12, 0.12, size=2) * cell
        cx = (column + 0.5) * cell + jitter[0]
        cy = (row + 0.5) * cell + jitter[1]
        x1 = int(np.clip(round(cx - side / 2), 0, image_size - side))
        y1 = int(np.clip(round(cy - side / 2), 0, image_size - side))
        box = (x1, y1, x1 + side, y1 + side)
        mask = _shape_mask(kind, box, image_size)
        # Shading keeps the fill from being one flat colour without adding edges inside the shape.
        shade = rng.uniform(0.85, 1.05)
        fill = np.array(COLOURS[colour], np.float32) * shade
        image[mask] = np.clip(fill, 0, 255).astype(np.uint8)
        # A dark rim: a yellow shape on a light background has too little grey contrast for Canny without it.
        rim = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
        image[rim] = np.clip(fill * 0.35, 0, 255).astype(np.uint8)
        shapes.append(Shape(kind=kind, colour=colour, size=size_word, position=POSITIONS[int(cell_index)], box=box))
        masks.append(mask)
    overlaps = tuple((later, earlier) for later in range(len(masks)) for earlier in range(later)
                     if np.logical_and(masks[later], masks[earlier]).sum() >= 4)
    return _describe(tuple(shapes), texture, overlaps), image


def _describe(shapes: tuple[Shape, ...], texture: str, overlaps: tuple[tuple[int, int], ...]) -> Scene:
    """Return the scene with its caption (with colours and texture) and its appearance-free filtered caption."""
    local = tuple(f"a {s.size} {s.colour} {s.kind} {_position_phrase(s.position)}" for s in shapes)
    local_filtered = tuple(f"a {s.size} {s.kind} {_position_phrase(s.position)}" for s in shapes)
    relations = [f"the {shapes[a].kind} overlaps the {shapes[b].kind}" for a, b in overlaps]
    count = COUNT_WORDS[len(shapes) - 1]
    caption = ". ".join([f"{count} on a {texture} background", *local, *relations]) + "."
    filtered = ". ".join([f"{count} on a background", *local_filtered, *relations]) + "."
    return Scene(shapes=shapes, texture=texture, overlaps=overlaps, caption=caption, filtered_caption=filtered,
                 local_captions=local, local_filtered_captions=local_filtered)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Return the generator of one scene: independent of every other scene, so images never depend on ``images``."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


@dataclass
class Benchmark:
    """What ``make_benchmark`` wrote: the benchmark folder, its split folders and image counts."""

    root: Path
    split_dirs: dict[str, Path]
    counts: dict[str, int]


def make_benchmark(out_dir: str | os.PathLike, *, images: int, seed: int = 0, test_fraction: float = 0.2,
                   image_size: int = 128) -> Benchmark:
    """Write ``images`` scenes (``round(images * test_fraction)`` of them held out) under ``out_dir``; return where.

    Raises ValueError for fewer than 2 test or train images or an image side below 48 pixels.
    """
    n_test = int(round(images * test_fraction))
    counts = {"train": images - n_test, "test": n_test}
    if min(counts.values()) < 2 or image_size < 48:
        raise ValueError(f"expected at least 2 train and 2 test images and image_size >= 48, got {counts} "
                         f"(images={images}, test_fraction={test_fraction}) and image_size={image_size}")
    root = Path(out_dir).expanduser()
    split_dirs = {split: root / split for split in SPLITS}
    for split in SPLITS:
        captions, scenes = [], []
        for index in range(counts[split]):
            scene, image = sample_scene(scene_rng(seed, split, index), split, image_size)
            name = f"scene-{index:05d}.png"
            write_png(split_dirs[split] / name, image)
            captions.append(json.dumps({"file": name, "caption": scene.caption}))
            scenes.append(json.dumps({"file": name, **asdict(scene)}))
        atomic_write_text(split_dirs[split] / "captions.jsonl", "\n".join(captions) + "\n")
        atomic_write_text(split_dirs[split] / "scenes.jsonl", "\n".join(scenes) + "\n")
    description = {"version": VERSION, "seed": seed, "images": images, "test_fraction": test_fraction,
                   "image_size": image_size, "counts": counts, "splits": {s: s for s in SPLITS},
                   "shapes": list(SHAPES), "colours": list(COLOURS), "textures": list(TEXTURES)}
    atomic_write_text(root / "benchmark.json", json.dumps(description, indent=2) + "\n")
    return Benchmark(root=root, split_dirs=split_dirs, counts=counts)


def read_benchmark(root: str | os.PathLike) -> dict | None:
    """Return the ``benchmark.json`` description of a folder written by ``make_benchmark``, else None."""
    path = Path(root).expanduser() / "benchmark.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))

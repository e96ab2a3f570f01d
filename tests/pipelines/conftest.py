"""Small synthetic images shared by the pipeline stage tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image


def save_rgb(path: Path, rgb: np.ndarray, **kwargs) -> Path:
    """Save an (H, W, 3) uint8 RGB array with PIL (format from the suffix) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, **kwargs)
    return path


def shapes_canvas(width: int, height: int, shapes: list[tuple[str, tuple[int, int, int, int]]]) -> np.ndarray:
    """Return an RGB canvas (black) with filled shapes; each shape is (kind, (x1, y1, x2, y2)) with exclusive x2/y2."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for index, (kind, (x1, y1, x2, y2)) in enumerate(shapes):
        colour = (255, 255 - 40 * index, 80 + 30 * index)
        if kind == "rect":
            cv2.rectangle(canvas, (x1, y1), (x2 - 1, y2 - 1), colour, -1)
        elif kind == "ellipse":
            centre = ((x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2)
            axes = ((x2 - x1 - 1) / 2, (y2 - y1 - 1) / 2)
            # Sub-pixel drawing (shift=4) so the ellipse spans exactly [x1, x2) x [y1, y2).
            centre16 = (round(centre[0] * 16), round(centre[1] * 16))
            axes16 = (round(axes[0] * 16), round(axes[1] * 16))
            cv2.ellipse(canvas, centre16, axes16, 0, 0, 360, colour, -1, lineType=cv2.LINE_8, shift=4)
        else:
            raise ValueError(kind)
    return canvas


def png_header_only(width: int, height: int) -> bytes:
    """Return a PNG whose IHDR claims width x height (8-bit RGB) but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

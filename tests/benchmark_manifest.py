"""A manifest of the generated shapes benchmark built straight from its ground truth: fast tests of training and
evaluation, and an oracle beside the pipeline's own regions and local captions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from storage.atomic import write_jpeg, write_png
from storage.hashing import content_key, file_digest
from storage.layout import IMAGE_ID_LENGTH, OutputLayout
from storage.manifest import STATUS_OK, bbox, manifest_table
from storage.parquet import write_parquet_atomic
from structxlip.app.shapes_benchmark import SPLITS, VERSION


def benchmark_manifest(benchmark_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a manifest of the benchmark built from its ground truth under ``out_dir``; return the manifest folder.

    Structure maps are Canny (100, 200) of the image, each shape is one segment (its box, its local caption), the
    filtered caption is the generator's; rows keep their folder's split. No CLIP, spaCy or Prefect involved.
    """
    root = Path(benchmark_dir).expanduser()
    layout = OutputLayout(out_dir)
    rows: list[dict] = []
    for split in SPLITS:
        folder = root / split
        for line in (folder / "scenes.jsonl").read_text(encoding="utf-8").splitlines():
            scene = json.loads(line)
            source = folder / scene["file"]
            image = cv2.cvtColor(cv2.imread(str(source), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            image_id = file_digest(source)[:IMAGE_ID_LENGTH]
            edges = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 100, 200)
            structure_path = write_png(layout.structure_map(image_id, "benchmark", "canny"), edges)
            segments = []
            for n, (shape, local, local_filtered) in enumerate(zip(
                    scene["shapes"], scene["local_captions"], scene["local_filtered_captions"], strict=True)):
                x1, y1, x2, y2 = shape["box"]
                crop_path = write_jpeg(layout.crop(image_id, "benchmark", n), np.ascontiguousarray(image[y1:y2, x1:x2]))
                crop_structure = write_png(layout.structure_crop(image_id, "benchmark", n),
                                           np.ascontiguousarray(edges[y1:y2, x1:x2]))
                segments.append({"bbox": bbox(x1, y1, x2, y2), "crop_path": layout.relative(crop_path),
                                 "structure_crop_path": layout.relative(crop_structure), "caption": local,
                                 "filtered_caption": local_filtered,
                                 "similarity_score": float(25.0 - n)})  # ground truth: rank in drawing order
            rows.append({
                "image_id": image_id, "source_path": str(source.resolve()), "status": STATUS_OK, "error": None,
                "width": image.shape[1], "height": image.shape[0], "caption": scene["caption"],
                "caption_source": "jsonl", "filtered_caption": scene["filtered_caption"],
                "structure_path": layout.relative(structure_path), "scribble_path": None, "split": split,
                "segments": segments, "hard_negatives": [],
            })
    write_parquet_atomic(manifest_table(rows), layout.manifest_part(content_key("benchmark", VERSION, rows)))
    return layout.manifest_dir

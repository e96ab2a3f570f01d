"""A stage plugin: XDoG line drawings, one PNG per image, listed in the manifest as ``xdog_path``.

The eXtended Difference of Gaussians (Winnemöller, Kyprianidis and Olsen, "XDoG: An eXtended difference-of-Gaussians
compendium including advanced image stylization", Computers & Graphics 36(6), 2012) is a structural cue of the
family StructXLIP trains on (Canny edges, scribbles): a clean line drawing of an image's contours.

Enable it with ``plugins: [path/to/xdog.py]`` in a config (see config.yaml here); set its parameters in the config's
``xdog:`` section or with ``--set xdog.sigma=1.2``.
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.steps.images import load_grey_resized
from pipelines.engine.stages import Params, Stage, row_schema
from storage.atomic import write_png


def xdog(grey: np.ndarray, *, sigma: float = 0.8, k: float = 1.6, tau: float = 0.98, epsilon: float = -0.01,
         phi: float = 100.0) -> np.ndarray:
    """Return the XDoG line drawing of a (H, W) uint8 grey image as (H, W) uint8: 255 paper, dark lines.

    With intensities in [0, 1]: ``D = G_sigma - tau * G_(k*sigma)`` and the soft threshold
    ``T = 1 where D >= epsilon, else 1 + tanh(phi * (D - epsilon))`` (Winnemöller et al. 2012, eq. 5 and 7). A flat
    area gives ``D = (1 - tau) * value >= 0``: paper; the dark side of an edge gives ``D < 0``: a line.
    """
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"expected a (H, W) uint8 grey image, got {grey.dtype} {grey.shape}")
    image = grey.astype(np.float32) / 255.0
    narrow = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    wide = cv2.GaussianBlur(image, (0, 0), sigmaX=k * sigma, borderType=cv2.BORDER_REFLECT)
    difference = narrow - tau * wide
    drawing = np.where(difference >= epsilon, 1.0, 1.0 + np.tanh(phi * (difference - epsilon)))
    return np.clip(np.rint(drawing * 255.0), 0, 255).astype(np.uint8)


class XDoGParams(Params):
    sigma: float = Field(default=0.8, gt=0, le=20)  # the narrow Gaussian (pixels of the resized image)
    k: float = Field(default=1.6, gt=1, le=10)  # wide / narrow: 1.6 makes the DoG approximate a Laplacian of Gaussian
    tau: float = Field(default=0.98, gt=0, le=1)  # weight of the wide Gaussian: below 1 keeps flat areas paper
    epsilon: float = Field(default=-0.01, ge=-1, le=1)  # threshold on D: lower keeps weak edges and noise out
    phi: float = Field(default=100.0, gt=0, le=10_000)  # steepness of the soft threshold
    long_side: int = Field(default=512, gt=0, le=8192)  # images are drawn at this size, like the structure maps


class XDoG(Stage):
    name = "xdog"
    description = "Write the XDoG line drawing (eXtended Difference of Gaussians) of every ingested image."
    task_name, task_doc = "draw_xdog_lines", "Write the XDoG line drawings of one chunk of images."
    Params = XDoGParams
    modules = ("pipelines.steps.images", "storage.atomic")  # project code the drawings depend on (their VERSION)
    upstream = ("ingest",)
    schema = row_schema(pa.field("xdog_path", pa.string()))
    manifest_fields = (pa.field("xdog_path", pa.string()),)
    gallery_columns = ("xdog_path",)

    def runtime(self, config):
        return {"max_pixels": config.ingest.max_pixels}

    def items(self, pipeline):
        return [(image["image_id"], image) for image in pipeline.images]

    def run(self, records, *, layout, stage_key, params, runtime):
        options = {name: params[name] for name in ("sigma", "k", "tau", "epsilon", "phi")}
        rows = []
        for record in records:
            grey = load_grey_resized(record["source_path"], long_side=params["long_side"],
                                     max_pixels=runtime["max_pixels"], validated=True)  # ingest's sources
            target = layout.stage_file(self.name, stage_key, record["image_id"], "xdog.png")
            write_png(target, xdog(grey, **options))
            rows.append({"image_id": record["image_id"], "status": "ok", "error": None,
                         "xdog_path": layout.relative(target)})
        return rows

    def output_paths(self, row):
        return [row["xdog_path"]]

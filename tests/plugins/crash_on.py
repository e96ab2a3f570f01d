"""A test stage plugin after ingest: the worker computing the image named by ``CRASH_ON`` (its file name) dies, as a
decoder crash or the OOM killer would kill it; every other image gets an ok row. The engine must fail that image
alone and go on. ``CRASH_ON`` unset: every image is ok."""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.engine.stages import Params, Stage, row_schema


class CrashOn(Stage):
    name = "crash_on"
    Params = Params
    description = "Dies on the image whose file name CRASH_ON names (tests the engine's worker isolation)."
    upstream = ("ingest",)
    schema = row_schema()

    def items(self, pipeline):
        return [(image["image_id"], image) for image in pipeline.images]

    def run(self, records, *, layout, stage_key, params, runtime):
        victim = os.environ.get("CRASH_ON")
        if victim and any(Path(record["source_path"]).name == victim for record in records):
            os._exit(1)
        return [{"image_id": record["image_id"], "status": "ok", "error": None} for record in records]

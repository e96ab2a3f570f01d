"""A test stage plugin after ingest that takes ``SECONDS_PER_IMAGE`` per image in the engine's workers: a run still
busy when a test cancels or interrupts it. Every image gets an ok row. ``STRUCTXLIP_TEST_SLOW_SECONDS`` in the
environment sets another time per image (a re-run that need not wait; the stage's key does not change)."""

from __future__ import annotations

import os
import time

from pipelines.engine.stages import Params, Stage, row_schema

SECONDS_PER_IMAGE = 1.0


class Slow(Stage):
    name = "slow"
    Params = Params
    description = "Takes a second per image (a run to cancel in the middle of a stage)."
    upstream = ("ingest",)
    schema = row_schema()

    def items(self, pipeline):
        return [(image["image_id"], image) for image in pipeline.images]

    def run(self, records, *, layout, stage_key, params, runtime):
        seconds = float(os.environ.get("STRUCTXLIP_TEST_SLOW_SECONDS", SECONDS_PER_IMAGE))
        time.sleep(seconds * len(records))
        return [{"image_id": record["image_id"], "status": "ok", "error": None} for record in records]

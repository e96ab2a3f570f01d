"""The catalogue benchmark's synthesised output folder is what a finished run leaves: the row-wise planner (not the
column-wise one the cached run uses) finds nothing to do in any data stage, and ``structxlip run`` reports every image
cached."""

from __future__ import annotations

import os
import sys

import pytest

from benchmarks.catalogue import REGIONS, _cached_row, synthesise

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreaper and PSS are Linux")


def test_a_synthesised_catalogue_has_nothing_to_do(tmp_path):
    from configs import load_config
    from benchmarks.scale import CONFIG
    from pipelines.engine.plan import Pipeline
    from pipelines.engine.stages import data_stage_names

    images, out, outputs = synthesise(tmp_path / "a", 30)
    assert outputs == 30 * (2 + 2 * REGIONS)
    pipeline = Pipeline(images, out, load_config(CONFIG))
    for stage in data_stage_names():
        plan = pipeline.plan(stage)
        assert not plan.pending and not plan.invalid, stage
        assert len(plan.cached) == (1 if stage == "manifest" else 30), stage
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    row = _cached_row("small", 30, tmp_path / "b", env)  # raises unless the CLI printed 30 cached, none processed
    assert row["images"] == 30 and row["output_files"] == outputs and row["wall_s"] > 0

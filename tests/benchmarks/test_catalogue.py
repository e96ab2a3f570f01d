"""The catalogue benchmark's synthesised output folder is what a finished run leaves: the row-wise planner (not the
column-wise one the cached run uses) finds nothing to do in any data stage, the manifest is the one its rows build
(so the signatures kept beside it are true), and ``structxlip run`` reports every image cached; after images are added,
a run computes those only and leaves the manifest its rows build."""

from __future__ import annotations

import os
import sys

import pytest

from benchmarks.catalogue import REGIONS, _added_row, _cached_row, synthesise

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
    from storage.manifest import manifest_table, read_manifest

    whole = manifest_table(pipeline.manifest_rows.rows).sort_by("image_id")
    assert read_manifest(out).sort_by("image_id").equals(whole)
    update = pipeline.manifest_update()
    assert update["rows"] == [] and len(update["replace"]) == 0  # signatures kept, all current
    assert pipeline.layout.quality_captions.is_file()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    row = _cached_row("small", 30, tmp_path / "b", env)  # raises unless the CLI printed 30 cached, none processed
    assert row["images"] == 30 and row["output_files"] == outputs and row["wall_s"] > 0
    # Two photos added: every stage computes them only (or _added_row raises), the manifest writes their two rows.
    added = _added_row("+2", 30, 2, tmp_path / "b", env)
    assert added["images"] == 32 and added["manifest_rows_written"] == 2
    pipeline = Pipeline(tmp_path / "b" / "images", tmp_path / "b" / "out", load_config(CONFIG))
    assert read_manifest(tmp_path / "b" / "out").sort_by("image_id").equals(
        manifest_table(pipeline.manifest_rows.rows).sort_by("image_id"))

"""A stage plugin end to end: ``structxlip run`` with examples/stage_plugin/config.yaml runs the plugin stage, lists
its drawings in the manifest, caches them, recomputes only them for a changed plugin parameter, and the plugin's
stage flow runs (and is served) in Prefect like a built-in stage's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml

from storage.manifest import read_manifest
from tests.flows.test_pipeline_cli import _make_folder

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "stage_plugin"
STAGES = ["ingest", "xdog", "structure", "regions", "captions", "filter", "manifest"]
N_IMAGES = 3


def _cli(env, images: Path, out: Path, config: Path, *extra: str) -> dict:
    """Run ``structxlip run`` over the data stages; return ``{stage: (processed, cached, failed)}`` of the table."""
    command = [sys.executable, "-m", "flows.cli", "run", str(images), "--out", str(out), "--config", str(config),
               "--stages", ",".join(STAGES), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"CLI failed ({done.returncode}):\n{done.stderr[-3000:]}\n{done.stdout[-2000:]}"
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] and line.split()[0] in STAGES]
    return {row[0]: tuple(int(v) for v in row[1:4]) for row in rows}


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory, prefect_server):
    """The example config (fast settings on top) over three small images, run once through the CLI."""
    root = tmp_path_factory.mktemp("stage-plugin")
    images, out = root / "images", root / "out"
    _make_folder(images, range(N_IMAGES))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(EXAMPLE / "config.yaml"),
        "regions": {"method": "structure", "max_regions": 4},
        "runtime": {"chunk_size": 2, "workers": 1, "task_retries": 0},  # three images: no worker processes
    }))
    env = prefect_server.env()
    first = _cli(env, images, out, config)
    return images, out, config, env, first


def test_the_plugin_stage_runs_caches_and_recomputes_alone_through_the_cli(plugin_run):
    images, out, config, env, first = plugin_run
    assert first == {stage: (N_IMAGES, 0, 0) for stage in STAGES}, first
    rows = read_manifest(out).to_pylist()
    assert len(rows) == N_IMAGES and all(row["status"] == "ok" for row in rows), rows
    drawings = [cv2.imread(str(out / row["xdog_path"]), cv2.IMREAD_UNCHANGED) for row in rows]
    assert all(d is not None and d.ndim == 2 and d.min() < 64 and d.max() == 255 for d in drawings)

    # Nothing changed: nothing is computed (without a server the cached run does not even start Prefect).
    offline = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    assert _cli(offline, images, out, config) == {stage: (0, N_IMAGES, 0) for stage in STAGES}

    # A plugin parameter through --set: the plugin stage and the manifest (its column changed) recompute, nothing else.
    changed = _cli(env, images, out, config, "--set", "xdog.sigma=1.5")
    recomputed = {"xdog", "manifest"}
    assert changed == {s: (N_IMAGES, 0, 0) if s in recomputed else (0, N_IMAGES, 0) for s in STAGES}, changed
    after = {row["image_id"]: row for row in read_manifest(out).to_pylist()}
    assert all(after[row["image_id"]]["xdog_path"] != row["xdog_path"] for row in rows)
    assert all(after[row["image_id"]]["structure_path"] == row["structure_path"] for row in rows)


def test_the_plugin_stage_flow_runs_in_prefect_and_is_served(plugin_run, prefect_api):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName

    from configs import load_config
    from flows.pipeline import flow_of
    from flows.serve import build_deployments, discover_flows
    from pipelines.engine.stages import registry

    images, out, config, _env, _first = plugin_run
    plugin_config = load_config(config)
    stage = registry(plugin_config)["xdog"]
    summary = flow_of(stage)(images_dir=str(images), out_dir=str(out), config_path=str(config), refresh=True)
    assert summary["stages"][0]["stage"] == "xdog" and summary["stages"][0]["processed"] == N_IMAGES, summary
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["xdog"])))
        # Filtered by key: the session's server holds every test's artifacts, more than one page of them
        artifacts = [a.key for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="xdog-gallery"))) if a.key]
    assert any(run.state.is_completed() for run in runs), [run.state for run in runs]
    assert any(key.endswith("-xdog-gallery") for key in artifacts), artifacts

    flows = discover_flows(plugins=plugin_config.plugins)
    assert list(flows)[-1] == "xdog"
    names = [deployment.name for deployment in build_deployments(flows)]
    assert "xdog-stage" in names and "structure-stage" in names

"""The data stages through the real CLI on a 2-worker Dask LocalCluster give the same manifest as the local runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.corpus import make_generated_images
from tests.manifests import assert_same

pytestmark = pytest.mark.e2e

DATA_STAGES = "ingest,structure,regions,captions,filter,manifest"
N_IMAGES = 4


def write_config(path: Path) -> Path:
    config = {
        "model": {"clip_model": "structxlip/tiny-clip"},
        "structure": {"long_side": 160},
        "regions": {"method": "structure", "max_regions": 4},
        "captions": {"batch_size": 16},
        # 2 images per chunk: 2 chunks per stage, so both Dask workers get work.
        "runtime": {"chunk_size": 2, "dask_workers": 2},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([str(Path(sys.executable).parent / "structxlip"), *args], env=env, capture_output=True,
                            text=True, timeout=300)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert result.returncode == 0, f"structxlip {' '.join(args)} failed:\n{output}"
    return result


def normalised_manifest(out_dir: Path) -> list[dict]:
    """Manifest rows sorted by image_id, with this output folder's absolute path replaced by ``<OUT>``."""
    from storage.manifest import read_manifest

    root = str(out_dir.resolve())

    def clean(value):
        if isinstance(value, str):
            return value.replace(root, "<OUT>")
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return [clean(row) for row in sorted(read_manifest(out_dir).to_pylist(), key=lambda r: r["image_id"])]




def test_dask_runner_matches_local_runner(prefect_server, tmp_path):
    distributed = pytest.importorskip("distributed")
    images_dir = tmp_path / "images"
    make_generated_images(images_dir, N_IMAGES, size=(160, 120), seed=5)
    config = write_config(tmp_path / "config.yaml")
    env = prefect_server.env()  # a running server: no ephemeral API start-up per CLI call
    common = ["run", str(images_dir), "--config", str(config), "--stages", DATA_STAGES]

    local_out, dask_out = tmp_path / "out-local", tmp_path / "out-dask"
    run_cli([*common, "--out", str(local_out), "--runner", "local"], env)

    # The test owns the cluster so it can ask the scheduler afterwards which tasks ran there.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        run_cli([*common, "--out", str(dask_out), "--runner", "dask", "--dask-address", cluster.scheduler_address],
                env)
        with distributed.Client(cluster.scheduler_address) as client:
            prefixes = client.run_on_scheduler(
                lambda dask_scheduler: {name: dict(p.state_counts) for name, p in dask_scheduler.task_prefixes.items()}
            )
    # Every mapped chunk task of each data stage ran on the cluster (2 chunks of 2 images per stage).
    stage_tasks = ("ingest_images", "extract_structure", "propose_regions", "score_local_captions", "filter_captions")
    for task_name in stage_tasks:
        assert task_name in prefixes, f"{task_name} did not run on Dask; scheduler saw {sorted(prefixes)}"

    local_rows, dask_rows = normalised_manifest(local_out), normalised_manifest(dask_out)
    assert len(local_rows) == N_IMAGES and all(row["status"] == "ok" for row in local_rows)
    assert [r["image_id"] for r in dask_rows] == [r["image_id"] for r in local_rows]
    for local_row, dask_row in zip(local_rows, dask_rows):
        assert_same(local_row, dask_row, local_row["image_id"])
    assert any(row["segments"] for row in local_rows), "expected structure regions in the manifest"

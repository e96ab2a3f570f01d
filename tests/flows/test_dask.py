"""The data stages through the real CLI on a 2-worker Dask LocalCluster give the same manifest as the local runner."""

from __future__ import annotations

import subprocess
import sys
import time
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




# Long; the Dask equality is covered in CI by the separate-process scheduler/workers test.
@pytest.mark.slow
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


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _servers_under(pids: list[int]) -> list[str]:
    """Command lines of Prefect API servers (uvicorn / temporary servers) among these processes' descendants."""
    import psutil

    found = []
    for pid in pids:
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                line = " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                continue
            if "uvicorn" in line or "api_server" in line or "prefect.server" in line:
                found.append(line)
    return found


def test_separate_dask_processes_report_to_the_runs_own_api(tmp_path, prefect_home):
    """A scheduler and two workers started as separate processes (as on a cluster), the CLI without a Prefect server:
    the chunks run on the workers and report to the run's own API; no worker starts a server of its own; the
    manifest equals a local run's; nothing the run started is left."""
    pytest.importorskip("distributed")
    from tests.prefect_server import free_port, prefect_env, stop_process

    images_dir = tmp_path / "images"
    make_generated_images(images_dir, N_IMAGES, size=(160, 120), seed=5)
    config = write_config(tmp_path / "config.yaml")
    env = prefect_env("unused", prefect_home)
    env.pop("PREFECT_API_URL")  # no server anywhere: the run starts its own, the workers must use it
    bin_dir = Path(sys.executable).parent
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = _start([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                        "--no-dashboard"], tmp_path / "scheduler.log", env)
    workers = [_start([str(bin_dir / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                       "--no-dashboard"], tmp_path / f"worker-{i}.log", env) for i in range(2)]
    try:
        common = ["run", str(images_dir), "--config", str(config), "--stages", DATA_STAGES]
        local_out, dask_out = tmp_path / "out-local", tmp_path / "out-dask"
        run_cli([*common, "--out", str(local_out), "--runner", "local"], env)
        import distributed

        with distributed.Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=120)
        servers: list[str] = []
        process = subprocess.Popen([str(bin_dir / "structxlip"), *common, "--out", str(dask_out), "--runner", "dask",
                                    "--dask-address", address], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        while process.poll() is None:  # watch the workers while the run is on
            servers += _servers_under([w.pid for w in workers])
            time.sleep(0.5)
        stdout, stderr = process.communicate()
        assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
        with distributed.Client(address, timeout=60) as client:
            prefixes = client.run_on_scheduler(
                lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        assert "score_local_captions" in prefixes and "propose_regions" in prefixes, prefixes
        assert not servers, f"a Dask worker started its own Prefect API server: {servers[:2]}"
        logs = "".join((tmp_path / f"worker-{i}.log").read_text(errors="replace") for i in range(2))
        assert "temporary server" not in logs.lower(), logs[-3000:]
        assert not _servers_under([w.pid for w in workers])
    finally:
        for process in (*workers, scheduler):
            stop_process(process)

    local_rows, dask_rows = normalised_manifest(local_out), normalised_manifest(dask_out)
    assert [r["image_id"] for r in dask_rows] == [r["image_id"] for r in local_rows] and len(local_rows) == N_IMAGES
    for local_row, dask_row in zip(local_rows, dask_rows):
        assert_same(local_row, dask_row, local_row["image_id"])

"""The one-stage-model guarantees through the real CLI: a failing stage ends Failed in Prefect with the table printed
and one error line; every kind of writer is refused while another holds the output folder; a fully cached run with
no server configured never starts Prefect."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.corpus import make_generated_images
from tests.zygote import run_python

pytestmark = pytest.mark.e2e
CONFIG = """
model: {clip_model: structxlip/tiny-clip}
structure: {batch_size: 32}
regions: {method: structure, max_regions: 3}
captions: {device: cpu}
manifest: {split_ratios: {train: 0.0, val: 0.0, test: 1.0}}
train: {epochs: 1, batch_size: 2, device: cpu}
runtime: {chunk_size: 4, task_retries: 0}
"""
TIMEOUT_S = 300


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return run_python(["-m", "flows.cli", *args], env=env, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("stage-model-cli")
    make_generated_images(root / "images", 4, size=(96, 72))
    (root / "config.yaml").write_text(CONFIG)
    env = prefect_server.env()
    env["STRUCTXLIP_CACHE"] = str(root / "cache")
    return root, env


def test_a_failing_stage_is_failed_in_prefect_and_the_table_is_printed(workspace, prefect_api):
    root, env = workspace
    out = root / "out-failing"
    # No image lands in the train split: the train stage fails; evaluate is not run.
    done = _cli("run", str(root / "images"), "--out", str(out), "--config", str(root / "config.yaml"), env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("structxlip run: error:")]
    assert len(error_lines) == 1 and "stage train failed" in error_lines[0] and "run the same command" in error_lines[0]
    table = done.stdout
    assert "stage      processed  cached  failed  seconds" in table
    assert "manifest           4       0       0" in table
    assert "train              0       0       1" in table and "no usable records" in table
    assert "evaluate" in table and "not run" in table

    from prefect import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterName, FlowRunFilterParentFlowRunId)

    with get_client(sync_client=True) as client:
        (parent,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["structxlip: images -> out-failing"])))
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
        states = {child.name.split(":")[0]: child.state.type.value for child in children}
        assert parent.state.type.value == "FAILED"
        assert states == {**dict.fromkeys(["ingest", "structure", "regions", "captions", "filter", "manifest"],
                                           "COMPLETED"), "train": "FAILED"}
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="%-train-summary")))
        assert artifacts

    # A single-stage re-run without a config (what a stage deployment does) reuses OUT/config.yaml: same keys, cached.
    from flows.pipeline import structure_flow

    report = structure_flow(images_dir=str(root / "images"), out_dir=str(out))  # the run report, like the pipeline's
    (alone,) = report["stages"]
    assert (alone["stage"], alone["processed"], alone["cached"], alone["failed"]) == ("structure", 0, 4, 0)
    assert report["stale"] == []  # nothing recomputed: no later stage is out of date

    # Fixing the cause and running again resumes: the data stages are cached, train and evaluate run.
    fixed = _cli("run", str(root / "images"), "--out", str(out), "--config", str(root / "config.yaml"),
                 "--set", "manifest.split_ratios={train: 0.5, val: 0.0, test: 0.5}", "--stages",
                 "ingest,structure,regions,captions,filter,manifest", env=env)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "ingest             0       4       0" in fixed.stdout


def test_every_writer_is_refused_while_another_holds_the_folder(workspace):
    root, env = workspace
    out = root / "locked"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from storage import lock; from storage.layout import OutputLayout; "
                               f"lock.acquire(OutputLayout({str(out)!r})); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (root / "ref.json").write_text("[]")
        commands = {
            "run": ["run", str(root / "images"), "--out", str(out), "--config", str(root / "config.yaml")],
            "train": ["train", str(out), "--out", str(out), "--config", str(root / "config.yaml")],
            "evaluate": ["evaluate", str(out), "--config", str(root / "config.yaml")],
            "import-json": ["import-json", str(root / "ref.json"), "--out", str(out), "--overwrite"],
        }
        for name, args in commands.items():
            done = _cli(*args, env=env)
            assert done.returncode == 2, (name, done.stderr[-2000:])
            lines = done.stderr.strip().splitlines()
            assert lines[-1].startswith(f"structxlip {name}: error: output folder {out.resolve()} is in use by run "
                                        f"pid {holder.pid}"), (name, lines)
    finally:
        holder.kill()
        holder.wait()


def test_a_cached_run_without_a_server_never_starts_prefect(workspace, tmp_path):
    root, env = workspace
    out = root / "cached"
    args = ["run", str(root / "images"), "--out", str(out), "--config", str(root / "config.yaml"), "--stages",
            "ingest,structure,regions,captions,filter,manifest"]
    assert _cli(*args, env=env).returncode == 0
    local = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    local["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = _cli(*args, env=local)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(f"{s:<10} {0:>9} {4:>7} {0:>7}" in done.stdout for s in ("ingest", "structure", "regions", "captions",
                                                                          "filter", "manifest")), done.stdout
    assert not Path(local["PREFECT_HOME"]).exists(), "a cached run started Prefect's ephemeral server"


DATA = "ingest,structure,regions,captions,filter,manifest"


def _table(stdout: str) -> dict[str, tuple[int, int, int]]:
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in DATA.split(",") and parts[1].isdigit():
            rows[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
    return rows


def test_broken_outputs_corrupt_parts_a_huge_caption_and_a_moved_folder_through_the_cli(workspace):
    import json
    import shutil

    import pyarrow.parquet as pq

    from storage.manifest import read_manifest

    root, env = workspace
    images = root / "images-huge"
    shutil.copytree(root / "images", images)
    lines = (images / "captions.jsonl").read_text().splitlines()
    huge = json.loads(lines[0])
    huge["caption"] = "A dog runs. " * 180_000  # 2.2 MB: more than spaCy takes (E088)
    (images / "captions.jsonl").write_text("\n".join([json.dumps(huge), *lines[1:]]) + "\n")
    out = root / "out-huge"
    args = ["run", str(images), "--out", str(out), "--config", str(root / "config.yaml"), "--stages", DATA]

    first = _cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _table(first.stdout)["captions"] == (3, 0, 1), first.stdout  # the other images of its chunk are ok
    assert f"x {huge['file']}: caption of 2,159,999 characters: more than the 1,000,000 spaCy splits" in first.stdout
    rows = {r["image_id"]: r for r in read_manifest(out).to_pylist()}
    with_crop = next(r for r in rows.values() if r["status"] == "ok" and r["segments"])
    other = next(r for r in rows.values() if r["image_id"] != with_crop["image_id"] and r["structure_path"])

    # Delete a crop, truncate another image's map, corrupt a regions part: exactly those items are recomputed.
    (out / with_crop["segments"][0]["crop_path"]).unlink()
    structure_map = out / other["structure_path"]
    structure_map.write_bytes(structure_map.read_bytes()[:16])
    second = _cli(*args, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    counts = _table(second.stdout)
    assert counts["structure"] == (1, 3, 0) and counts["regions"] == (1, 3, 0), second.stdout
    assert counts["captions"] == (0, 3, 1)  # the cached failure is counted
    assert "missing or changed outputs will be recomputed" in second.stderr
    assert (out / with_crop["segments"][0]["crop_path"]).is_file()

    part = sorted((out / "stages" / "filter").glob("*/part-*.parquet"))[0]
    lost = pq.read_metadata(part).num_rows
    part.write_bytes(b"garbage")
    third = _cli(*args, env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert _table(third.stdout)["filter"] == (lost, 3 - lost, 0)
    assert "unreadable stage part" in third.stderr and part.name in third.stderr

    # A moved output folder: nothing is recomputed.
    moved = root / "moved" / "out-huge"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    fourth = _cli("run", str(images), "--out", str(moved), "--config", str(root / "config.yaml"), "--stages", DATA,
                  env=env)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert all(p == 0 for p, _c, _f in _table(fourth.stdout).values()), fourth.stdout


TRAIN_CONFIG = CONFIG.replace("manifest: {split_ratios: {train: 0.0, val: 0.0, test: 1.0}}",
                              "manifest: {split_ratios: {train: 1.0, val: 0.0, test: 0.0}}").replace(
    "train: {epochs: 1, batch_size: 2, device: cpu}", "train: {epochs: 2, batch_size: 2, device: cpu, "
                                                       "checkpoint_every_steps: 1, lr: 1.0e-3}")


# Long; also covered in CI by test_ddp_stage (kill inside run's train stage) and test_faults (structxlip train).
@pytest.mark.slow
def test_a_run_killed_during_training_resumes_to_the_uninterrupted_weights(workspace):
    """SIGKILL inside `structxlip run`'s train stage (after step 2's checkpoint, then mid-way through writing step 3's
    metrics line); each re-run resumes from the last checkpoint and ends with the uninterrupted run's weights, and
    metrics.jsonl holds every step exactly once."""
    import json

    from safetensors.torch import load_file

    root, env = workspace
    (root / "train.yaml").write_text(TRAIN_CONFIG)
    stages = "ingest,structure,regions,captions,filter,manifest,train"

    def run(out, **extra_env):
        return _cli("run", str(root / "images"), "--out", str(out), "--config", str(root / "train.yaml"), "--stages",
                    stages, env={**env, **extra_env})

    straight = run(root / "train-straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = root / "train-killed"
    # The data stages are cached (a copied folder stays cached): the killed runs only train.
    shutil.copytree(root / "train-straight", out, ignore=shutil.ignore_patterns("train", "runs", ".lock"))
    for point in ("after_checkpoint@2", "metrics_write@3"):
        killed = run(out, STRUCTXLIP_KILL_AT=point)
        assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train              1       0       0" in resumed.stdout

    steps = [json.loads(line)["step"] for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line)["step"] for line in
                 (root / "train-straight" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == reference and len(set(steps)) == len(steps)
    a = load_file(root / "train-straight" / "train" / "model" / "model.safetensors")
    b = load_file(out / "train" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name

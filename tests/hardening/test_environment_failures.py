"""An environment problem is never stored as a fact about an image; a per-item failure is, and --retry-failed
recomputes exactly those.

- CLIP weights that become unreadable after planning (same size, other bytes: the stage key is unchanged): the
  captions stage fails (exit 2, its Prefect flow run Failed), no image gets a failed row, and a re-run after the file
  is restored processes every image.
- A worker process that dies on one image records that image as failed (a fact about it); a plain re-run reuses the
  failure; ``--retry-failed`` recomputes that image through every stage and nothing else.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from tests.flows.test_pipeline_cli import BASE_CONFIG, DATA_STAGES, _make_folder
from tests.hardening.conftest import run_cli, stage_parts

N = 6


def _report(out: Path) -> dict:
    return json.loads(max((out / "runs").glob("*.json")).read_text())


def _counts(out: Path) -> dict[str, tuple[int, int, int]]:
    return {s["stage"]: (s["processed"], s["cached"], s["failed"]) for s in _report(out)["stages"]}


def _stored_statuses(out: Path, stage: str) -> list[str]:
    return [status for part in stage_parts(out, stage) for status in pq.read_table(part, columns=["status"])
            .column("status").to_pylist()]


def test_unreadable_clip_weights_fail_the_stage_and_record_nothing(tmp_path, cli_env):
    model = tmp_path / "clip"
    built = run_cli(cli_env, "build-tiny-clip", str(model))
    assert built.returncode == 0, built.stderr
    config = tmp_path / "config.yaml"
    config.write_text(BASE_CONFIG.replace("structxlip/tiny-clip", str(model)))
    images, out = tmp_path / "images", tmp_path / "out"
    _make_folder(images, range(N))
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(os.urandom(len(good)))  # same size: the model's identity (and the stage key) is unchanged

    started = datetime.now(timezone.utc)  # the session's server holds other tests' runs of the same name
    done = run_cli(cli_env, "run", str(images), "--out", str(out), "--config", str(config),
                   "--stages", ",".join(DATA_STAGES))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("structxlip run: error: stage captions failed") and str(model) in error, error
    report = _report(out)
    captions = next(s for s in report["stages"] if s["stage"] == "captions")
    assert captions["status"] == "failed" and captions["processed"] == 0
    assert report["not_run"] == ["filter", "manifest"]
    assert _stored_statuses(out, "captions") == []  # nothing recorded for any image
    assert _stored_statuses(out, "regions") == ["ok"] * N  # the stages before it are kept

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterStartTime

    from tests.flows.test_server_e2e import sync_client

    with sync_client(cli_env["PREFECT_API_URL"]) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["captions: images -> out"]), start_time=FlowRunFilterStartTime(after_=started)))
    assert runs and all(run.state.is_failed() for run in runs)

    weights.write_bytes(good)  # the cause is fixed: the same command now does the work
    done = run_cli(cli_env, "run", str(images), "--out", str(out), "--config", str(config),
                   "--stages", ",".join(DATA_STAGES))
    assert done.returncode == 0, done.stdout + done.stderr
    counts = _counts(out)
    assert counts["captions"] == (N, 0, 0) and counts["regions"] == (0, N, 0), counts


def test_retry_failed_recomputes_cached_item_failures_and_nothing_else(tmp_path, cli_env):
    crash_on = Path(__file__).resolve().parents[1] / "plugins" / "crash_on.py"
    config = tmp_path / "config.yaml"
    config.write_text(BASE_CONFIG + f"\nplugins: [{crash_on}]\n")
    images, out = tmp_path / "images", tmp_path / "out"
    _make_folder(images, range(N))
    time.sleep(1.2)  # files older than ingest's racy window (1 s), as a user's are: their stat can vouch for them
    stages = ",".join([*DATA_STAGES, "crash_on"])
    command = ["run", str(images), "--out", str(out), "--config", str(config), "--stages", stages,
               "--set", "runtime.workers=2"]
    # The engine worker computing img03.png dies (a decoder crash): a fact about that image, recorded as failed.
    done = run_cli({**cli_env, "CRASH_ON": "img03.png"}, *command)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _counts(out)["crash_on"] == (N - 1, 0, 1)
    assert "img03.png" in done.stdout and "worker process died" in done.stdout

    done = run_cli(cli_env, *command)  # a plain re-run keeps the cached failure
    assert done.returncode == 0 and _counts(out)["crash_on"] == (0, N - 1, 1), done.stdout

    done = run_cli(cli_env, *command, "--retry-failed")
    assert done.returncode == 0, done.stdout + done.stderr
    counts = _counts(out)
    assert counts["crash_on"] == (1, N - 1, 0), counts
    for stage in DATA_STAGES:  # the other stages' results were all ok: none is computed again
        assert counts[stage][0] == 0 and counts[stage][2] == 0, (stage, counts)

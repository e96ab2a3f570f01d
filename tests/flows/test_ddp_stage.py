"""``train.nproc: 2`` makes the train stage of ``structxlip run`` launch 2 DDP processes (torchrun, gloo on CPU), with
the same outputs layout, and a run killed mid-training resumes to the uninterrupted run's weights exactly."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.flows.test_pipeline_cli import BASE_CONFIG, _make_folder
from tests.hardening.conftest import kill_all, kill_alone, run_cli, start_cli, wait_until

pytestmark = pytest.mark.e2e
N_IMAGES = 12
CONFIG = BASE_CONFIG + """
manifest: {split_ratios: {train: 0.75, val: 0.0, test: 0.25}}
train: {epochs: 2, batch_size: 2, device: cpu, max_text_tokens: 77, checkpoint_every_steps: 1, nproc: 2}
evaluate: {split: test, device: cpu}
"""


@pytest.fixture(scope="module")
def ddp_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-stage")
    _make_folder(root / "images", range(N_IMAGES))
    (root / "config.yaml").write_text(CONFIG)
    return root


THROUGH_TRAIN = "ingest,structure,regions,captions,filter,manifest,train"


def _run(env, root: Path, out: Path, *stages: str, **extra_env):
    return run_cli({**env, **extra_env}, "run", str(root / "images"), "--out", str(out), "--config",
                   str(root / "config.yaml"), *stages)


def _train_summary(out: Path) -> dict:
    report = json.loads(max((out / "runs").glob("*.json")).read_text())
    return next(s for s in report["stages"] if s["stage"] == "train")


def _copy_data_stages(source: Path, target: Path) -> None:
    """Copy an output folder without what training and evaluation wrote (a moved folder stays cached)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("train", "evaluate", "eval", "runs", ".lock"))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "train" / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(ddp_folder, prefect_server) -> Path:
    """The uninterrupted run through evaluation."""
    out = ddp_folder / "out-reference"
    done = _run(prefect_server.env(), ddp_folder, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_two_process_training_inside_structxlip_run_resumes_exactly(ddp_folder, reference, prefect_server):
    cli_env = prefect_server.env()
    assert _train_summary(reference)["processed"] == 1
    steps = [json.loads(line) for line in (reference / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps and len({row["step"] for row in steps}) == len(steps)  # rank 0 alone logs, every step once
    assert (reference / "eval" / "metrics.json").is_file()
    results = [json.loads(r) for part in (reference / "stages" / "train").glob("*/part-*.parquet")
               for r in pq.read_table(part, columns=["result"]).column("result").to_pylist() if r]
    assert results and results[-1]["processes"] == 2

    # Killed at step 3 (both ranks die, as on a lost node): the stage fails, nothing is recorded for it...
    killed = ddp_folder / "out-killed"
    _copy_data_stages(reference, killed)  # the data stages are cached: only training runs again
    done = _run(cli_env, ddp_folder, killed, "--stages", THROUGH_TRAIN, STRUCTXLIP_KILL_AT="step@3")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "training on 2 processes failed" in done.stderr.splitlines()[-1]
    assert (killed / "train" / "checkpoints" / "last.pt").is_file()
    # ... and the same command resumes from the last checkpoint to the uninterrupted run's weights.
    done = _run(cli_env, ddp_folder, killed, "--stages", THROUGH_TRAIN)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected, got = _weights(reference), _weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def _ranks(pid: int) -> list[psutil.Process]:
    """The training ranks among ``pid``'s descendants (torchrun's children; torchrun itself is the launcher)."""
    return [child for child in psutil.Process(pid).children(recursive=True)
            if "pipelines.engine.distributed_train" in child.cmdline() and "--standalone" not in child.cmdline()]


def test_a_killed_run_leaves_no_training_process_behind(ddp_folder, reference, prefect_server):
    # A run killed outright (SIGKILL, the out-of-memory killer) during 2-process training left torchrun and both ranks
    # training on, to the end, writing into the output folder under whatever ran there next.
    out = ddp_folder / "out-sigkill"
    _copy_data_stages(reference, out)
    process = start_cli(prefect_server.env(), "run", str(ddp_folder / "images"), "--out", str(out), "--config",
                        str(ddp_folder / "config.yaml"), "--stages", THROUGH_TRAIN, "--set", "train.epochs=1000")
    started: list[psutil.Process] = []
    try:
        wait_until(lambda: len(_ranks(process.pid)) == 2, process, "2 training ranks", interval_s=0.2)
        started = psutil.Process(process.pid).children(recursive=True)
        left = kill_alone(process, started, 15.0)
    finally:
        kill_all(process, started)
    assert len(started) >= 3 and not left, left  # torchrun and its 2 ranks at least
    time.sleep(1.0)
    assert not (out / "train" / "model" / "model.safetensors").exists()

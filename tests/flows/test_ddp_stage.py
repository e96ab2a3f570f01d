"""``train.nproc: 2`` makes the train stage of ``structxlip run`` launch 2 DDP processes (torchrun, gloo on CPU), with
the same outputs layout, and a run killed mid-training resumes to the uninterrupted run's weights exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.flows.test_pipeline_cli import BASE_CONFIG, _make_folder
from tests.hardening.conftest import run_cli

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


def test_two_process_training_inside_structxlip_run_resumes_exactly(ddp_folder, prefect_server):
    cli_env = prefect_server.env()
    reference = ddp_folder / "out-reference"
    done = _run(cli_env, ddp_folder, reference)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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

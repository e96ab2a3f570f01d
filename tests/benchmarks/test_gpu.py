"""The GPU benchmark: one skip line without CUDA, synchronised timing, and every workload's code path run on CPU with
tiny random models (the same functions the CUDA run calls with ``device="cuda"``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import gpu

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU skip")
def test_without_cuda_the_benchmark_prints_one_line_and_records_skipped(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "gpu", "--results", str(tmp_path)],
                               cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    lines = (completed.stdout + completed.stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu: skipped: no CUDA device"), lines
    import json

    payload = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    assert payload["status"] == "skipped" and payload["rows"] == []
    assert "**skipped**" in (tmp_path / "summary.md").read_text(encoding="utf-8")


def test_timed_calls_synchronises_around_each_timed_call_only():
    events = []
    seconds = gpu.timed_calls(lambda: events.append("call"), repeats=2, warmup=1,
                              synchronize=lambda: events.append("sync"))
    assert events == ["call", "sync", "call", "sync", "sync", "call", "sync"]
    assert len(seconds) == 2 and all(s >= 0 for s in seconds)
    with pytest.raises(ValueError, match="repeats >= 1"):
        gpu.timed_calls(lambda: None, repeats=0, warmup=0, synchronize=lambda: None)


def test_synchronizer_is_a_no_op_on_cpu():
    assert gpu.synchronizer("cpu")() is None


def test_summary_rates():
    summary = gpu._summary([0.5, 1.5], 8, "images")
    assert summary["ms_per_call"] == 1000.0 and summary["ms_best"] == 500.0
    assert summary["images_per_s"] == 8.0 and summary["calls_timed"] == 2


def test_structure_workload_on_cpu():
    greys = gpu.grey_batch(2, size=(64, 48))
    assert greys.shape == (2, 48, 64) and greys.dtype == np.uint8
    row = gpu.measure_structure("cpu", greys=greys, repeats=1, warmup=0)
    assert row["items_per_call"] == 2 and row["images_per_s"] > 0


def test_clip_scoring_and_training_workloads_on_cpu_with_the_tiny_clip(tmp_path):
    from structxlip.models import TINY_CLIP, resolve_model_source
    from structxlip.app.synthetic import make_synthetic_manifest

    model = Path(resolve_model_source(TINY_CLIP))
    image_row, text_row = gpu.measure_clip_scoring(model, "cpu", n=3, repeats=1, warmup=0)
    assert image_row["items_per_call"] == 3 and text_row["texts_per_s"] > 0
    manifest = make_synthetic_manifest(tmp_path / "data", n_images=12, image_size=64, seed=0)
    row = gpu.measure_training(model, manifest, "cpu", batch_size=2, repeats=2, warmup=0, precision="bf16")
    assert np.isfinite(row["final_loss"]) and row["calls_timed"] == 2 and row["peak_gpu_memory_mb"] is None


def test_sam_workload_on_cpu_with_a_tiny_sam(tmp_path):
    from tests.pipelines.test_regions_transformers_sam import save_tiny_sam
    from tests.scenes import make_scene

    model = Path(save_tiny_sam(tmp_path / "sam"))
    row = gpu.measure_sam(model, "cpu", images=[make_scene(0, size=(160, 120)).rgb], max_side=256,
                          points_per_side=4, repeats=1, warmup=0)
    assert row["items_per_call"] == 1 and row["masks_per_image"] >= 0

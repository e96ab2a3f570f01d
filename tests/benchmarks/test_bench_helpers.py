"""Benchmark helpers compute what they claim (correctness, never timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import (Target, markdown_table, result_markdown, time_repeats, tolerant_edge_iou,
                               worker_cpu_seconds)
from benchmarks.local_loss import loop_local_loss, make_inputs
from benchmarks.run import BENCHMARKS, run_benchmark

REPO_ROOT = Path(__file__).resolve().parents[2]


def _line(row: int, shape=(20, 30)) -> np.ndarray:
    edges = np.zeros(shape, np.uint8)
    edges[row, :] = 255
    return edges


def test_tolerant_iou_hand_cases():
    a = _line(5)
    assert tolerant_edge_iou(a, a) == 1.0
    assert tolerant_edge_iou(a, _line(6)) == 1.0  # one pixel away: the same edge
    assert tolerant_edge_iou(a, _line(7)) == 0.0  # two pixels away: a different edge
    assert tolerant_edge_iou(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)) == 1.0
    # Half of b's 30 pixels are extra (row 15, far away): matched = 30, union = 30 + 60 - 30 = 60.
    b = _line(5)
    b[15, :] = 255
    assert tolerant_edge_iou(a, b) == pytest.approx(30 / 60)
    # A short segment shifted by one column: all 10 pixels match within 1 px.
    c, d = np.zeros((9, 20), np.uint8), np.zeros((9, 20), np.uint8)
    c[4, 2:12], d[4, 3:13] = 255, 255
    assert tolerant_edge_iou(c, d) == 1.0
    with pytest.raises(ValueError, match="one size"):
        tolerant_edge_iou(a, a[:-1])


def test_target_directions():
    assert Target("x", 4.2, 4.0).met and not Target("x", 3.9, 4.0).met
    assert Target("y", 0.05, 0.1, direction="at_most").met and not Target("y", 0.2, 0.1, direction="at_most").met
    assert not Target("z", None, 1.0).met and not Target("z", float("nan"), 1.0).met


def test_markdown_table_columns_and_formatting():
    table = markdown_table([{"a": 1.23456, "b": "x|y"}, {"a": 1234.5, "c": None}])
    lines = table.strip().splitlines()
    assert lines[0] == "| a | b | c |"
    assert lines[2] == "| 1.23 | x\\|y | - |"
    assert lines[3] == "| 1,234 | - | - |"


def test_result_footer_says_the_load_before_and_after_and_the_versions():
    machine = {"cpus_usable": 2, "load_average_1m": 1.5, "load_average_1m_after": 2.25, "python": "3.11.7",
               "torch_version": "2.1", "prefect_version": "3.8.8", "cv2_version": "5.1.0", "numpy_version": "2.4.6",
               "pyarrow_version": "26.0.1", "cuda_device": None, "date": "2026-01-01"}
    text = result_markdown({"name": "x", "description": "", "rows": [{"a": 1}], "targets": [], "machine": machine})
    assert ("_2 CPUs (load 1.50 before, 2.25 after), Python 3.11.7, torch 2.1, Prefect 3.8.8, OpenCV 5.1.0, "
            "NumPy 2.4.6, pyarrow 26.0.1, GPU none, 2026-01-01_") in text
    del machine["prefect_version"]  # an older result: not recorded, so not shown
    assert "torch 2.1, OpenCV 5.1.0," in result_markdown({"name": "x", "description": "", "rows": [], "targets": [],
                                                          "machine": machine})


def test_time_repeats_counts_calls_and_runs_setup_each_time():
    calls = []
    timing = time_repeats(lambda: calls.append("run"), 3, setup=lambda: calls.append("setup"))
    assert calls == ["setup", "run"] * 3
    assert timing["runs"] == 3 and 0 <= timing["best_s"] <= timing["median_s"]


def _spin(seconds: float) -> int:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return os.getpid()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_worker_cpu_counts_the_engine_workers_only():
    from pipelines.engine import workers
    workers.shutdown()
    try:
        pool = workers.pool(2)
        [f.result() for f in [pool.submit(_spin, 0.1) for _ in range(2)]]  # both workers started and initialised
        before = worker_cpu_seconds()
        pool.submit(_spin, 0.5).result()
        # The worker's 0.5 CPU-s spin (its own clock; /proc counts 10 ms ticks, which can fall a tick short, and the
        # difference of two tick sums is a float: 3.46 - 2.97 < 0.49); this test process's own CPU is not counted.
        _spin(0.5)
        assert 0.48 <= worker_cpu_seconds() - before < 0.95
    finally:
        workers.shutdown()


def _slow_reference(chunks, owner, crops, valid, scale, tau=0.07):
    """Chunk-by-chunk, crop-by-crop reference (no logsumexp): the formula of METHOD.md written out."""
    g = min(float(scale) / tau, 100.0)

    def unit(v):
        return v / (float(np.linalg.norm(v)) + 1e-8)

    chunks, crops, valid = chunks.double().numpy(), crops.double().numpy(), valid.numpy()
    per_sample = []
    for b in range(crops.shape[0]):
        mine = [c for c in range(len(owner)) if int(owner[c]) == b]
        if not mine or not valid[b].any():
            continue
        losses = []
        for c in mine:
            own = sum(np.exp(g * unit(chunks[c]) @ unit(crops[b, k])) for k in range(crops.shape[1]) if valid[b, k])
            everyone = sum(np.exp(g * unit(chunks[c]) @ unit(crops[j, k]))
                           for j in range(crops.shape[0]) for k in range(crops.shape[1]) if valid[j, k])
            losses.append(-(np.log(own) - np.log(everyone)))
        per_sample.append(np.mean(losses))
    return float(np.mean(per_sample))


def test_loop_local_loss_matches_the_written_out_formula_and_the_project_loss():
    from structxlip.losses import local_structure_centric_loss

    inputs = make_inputs(batch=4, slots=3, chunks_per_caption=5, dim=8, seed=1)
    inputs["scale"] = torch.tensor(3.0)  # g = 42.9 < 100: exp stays finite in the slow reference
    expected = _slow_reference(inputs["chunk_embeds"], inputs["chunk_owner"], inputs["crop_embeds"],
                               inputs["crop_valid"], inputs["scale"])
    assert float(loop_local_loss(**inputs)) == pytest.approx(expected, abs=1e-5)
    assert float(local_structure_centric_loss(**inputs)) == pytest.approx(expected, abs=1e-5)
    assert not inputs["crop_valid"][-1].any()  # the skipped sample is really there


def test_registry_says_what_missing_benchmarks_need(tmp_path, monkeypatch):
    from benchmarks import run as runner

    assert {"structure", "local_loss", "scale", "clip_scoring", "training"} <= set(BENCHMARKS)
    def future(quick: bool):
        raise runner.NotImplementedYet("not implemented yet: needs structxlip/future.py")

    monkeypatch.setitem(runner.BENCHMARKS, "future", future)
    payload = run_benchmark("future", quick=True, results_dir=tmp_path)
    assert payload["status"] == "not implemented"
    assert payload["error"] == "not implemented yet: needs structxlip/future.py"
    written = json.loads((tmp_path / "future.json").read_text())
    assert written["machine"]["cpu_count"] >= 1 and written["rows"] == []
    assert "**not implemented**: not implemented yet: needs structxlip/future.py" in runner.result_markdown(written)
    with pytest.raises(KeyError, match="unknown benchmark"):
        run_benchmark("nope", quick=True, results_dir=tmp_path)


def test_quick_structure_benchmark_writes_json_with_agreeing_maps(tmp_path):
    # The real entry point, as `make bench` runs it (a subprocess: the stage's worker pool needs a __main__ guard).
    completed = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--only", "structure",
                                "--results", str(tmp_path)], check=False, cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads((tmp_path / "structure.json").read_text())
    assert result["status"] == "ok" and result["quick"] is True
    assert {"name", "description", "params", "rows", "targets", "notes", "machine", "seconds"} <= set(result)
    assert {"cpu_count", "python", "torch_version", "date"} <= set(result["machine"])
    methods = [row["method"] for row in result["rows"]]
    assert methods[0].startswith("baseline") and "opencv" in methods[1]
    project = result["rows"][1]
    assert project["images_per_s"] > 0 and project["speedup"] > 0
    assert project["iou_mean"] >= 0.9 and 0.5 <= project["iou_min"] <= project["iou_mean"]
    assert any(t["name"].startswith("opencv speed-up") for t in result["targets"])
    summary = (tmp_path / "summary.md").read_text()
    assert "## structure" in summary and "| method |" in summary


def test_readme_blocks_get_the_results_tables(tmp_path):
    import json

    from benchmarks.run import README, RESULTS_DIR, readme_with_results

    rows = [{"run": "cold", "images": 1000}, {"run": "cached", "images": 0}]
    (tmp_path / "demo.json").write_text(json.dumps({"rows": rows}))
    text = ("intro\n<!-- bench:demo -->\n| old | table |\n<!-- /bench:demo -->\n"
            "<!-- bench:absent -->\nkept\n<!-- /bench:absent -->\nend\n")
    expected = ("intro\n<!-- bench:demo -->\n| run | images |\n|---|---|\n| cold | 1000 |\n| cached | 0 |\n"
                "<!-- /bench:demo -->\n<!-- bench:absent -->\nkept\n<!-- /bench:absent -->\nend\n")
    assert readme_with_results(text, tmp_path) == expected
    # The committed README shows exactly what the committed results generate.
    readme = README.read_text(encoding="utf-8")
    assert "<!-- bench:scale -->" in readme and readme_with_results(readme, RESULTS_DIR) == readme


def test_the_targets_block_lists_every_results_targets_with_its_load_and_machine(tmp_path, monkeypatch):
    import json

    from benchmarks import run as bench_run

    monkeypatch.setattr(bench_run, "BENCHMARKS", {"first": None, "second": None, "third": None})
    machine = {"date": "2026-12-05T10:00:00+00:00", "cpus_usable": 2, "load_average_1m": 0.5,
               "load_average_1m_after": 1.25, "cuda_device": None}
    (tmp_path / "second.json").write_text(json.dumps({"machine": {**machine, "cuda_device": "H100"}, "targets": [
        {"name": "speed", "value": 12.5, "goal": 150.0, "direction": "at_least", "unit": " img/s", "met": False}]}))
    (tmp_path / "first.json").write_text(json.dumps({"machine": machine, "targets": [
        {"name": "wall", "value": 2.0, "goal": 3.0, "direction": "at_most", "unit": " s", "met": True}]}))
    text = "a\n<!-- bench:targets -->\nold\n<!-- /bench:targets -->\nb\n"
    assert bench_run.readme_with_results(text, tmp_path) == (
        "a\n<!-- bench:targets -->\n"
        "| benchmark | target | measured | goal | status | load_1m | measured_on |\n|---|---|---|---|---|---|---|\n"
        "| first | wall | 2.00 s | ≤ 3.00 s | met | 0.50 -> 1.25 | 2026-12-05, 2 CPUs, no GPU |\n"
        "| second | speed | 12.50 img/s | ≥ 150 img/s | **missed** | 0.50 -> 1.25 | 2026-12-05, 2 CPUs, H100 |\n"
        "<!-- /bench:targets -->\nb\n")


def test_numbers_that_do_not_reproduce_within_a_quarter_are_listed():
    from benchmarks.run import unreproduced

    previous = {"rows": [{"run": "cold", "wall_s": 100.0, "img_s": 10.0, "load_1m": 0.5, "stages": "a/b"},
                         {"run": "cached", "wall_s": 2.0, "processed": 0}],
                "targets": [{"name": "speed", "value": 10.0}]}
    current = {"rows": [{"run": "cached", "wall_s": 2.4, "processed": 0},  # any order; +20% is within
                        {"run": "cold", "wall_s": 130.0, "img_s": 7.4, "load_1m": 4.0, "stages": "a/b"},
                        {"run": "new row", "wall_s": 1.0}],
                "targets": [{"name": "speed", "value": 7.4}]}
    assert unreproduced(previous, current) == [
        {"row": "cold", "column": "img_s", "before": 10.0, "now": 7.4, "ratio": 0.74},
        {"row": "cold", "column": "wall_s", "before": 100.0, "now": 130.0, "ratio": 1.3},
        {"row": "target: speed", "column": "value", "before": 10.0, "now": 7.4, "ratio": 0.74},
    ]
    assert unreproduced(previous, previous) == []

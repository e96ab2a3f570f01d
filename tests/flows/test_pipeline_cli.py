"""End to end through the real CLI (``structxlip run`` in a subprocess) on a small generated image folder, against the
session's Prefect server: cached re-runs, incremental additions, parameter changes, --refresh, a SIGKILLed run that
resumes to the same manifest, and the one-run-per-folder lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from storage.manifest import read_manifest
from tests.manifests import assert_same
from tests.zygote import run_python

pytestmark = pytest.mark.e2e

DATA_STAGES = ["ingest", "structure", "regions", "captions", "filter", "manifest"]
BASE_CONFIG = """
model: {clip_model: structxlip/tiny-clip}
structure: {batch_size: 32}
regions: {method: structure, max_regions: 4}
captions: {batch_size: 16}
runtime: {chunk_size: 2, task_retries: 0}
"""
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "brown"]
SHAPES = ["square", "circle", "bar", "ring", "cross"]
# The caching tests run the stages in the CLI's own process (a documented setting; keys leave it out): which process
# computes a chunk is not what they test, and a worker process would import torch and spaCy again for every run.
# Worker processes are exercised by the hardening baseline, the interrupt and kill tests, and tests/pipelines.
IN_PROCESS_CONFIG = BASE_CONFIG.replace("task_retries: 0}", "task_retries: 0, workers: 1}")
CLI_TIMEOUT_S = 240
_reference: dict[str, list[dict]] = {}


def _write_image(folder: Path, n: int, captions: list[dict]) -> None:
    """A distinct 96x80 picture: a coloured shape on a two-tone background, with a caption naming them."""
    rng = np.random.default_rng(n)
    image = np.full((80, 96, 3), 30 + 20 * (n % 5), np.uint8)
    image[:, 48:] = 200 - 15 * (n % 7)
    colour = tuple(int(c) for c in rng.integers(40, 255, 3))
    shape = SHAPES[n % len(SHAPES)]
    x, y = 20 + 4 * (n % 6), 15 + 3 * (n % 5)
    if shape in ("square", "bar"):
        cv2.rectangle(image, (x, y), (x + 30 + (n % 3) * 8, y + (12 if shape == "bar" else 30)), colour, -1)
    elif shape == "circle":
        cv2.circle(image, (x + 20, y + 20), 16, colour, -1)
    elif shape == "ring":
        cv2.circle(image, (x + 20, y + 20), 16, colour, 4)
    else:
        cv2.line(image, (x, y), (x + 40, y + 40), colour, 5)
        cv2.line(image, (x + 40, y), (x, y + 40), colour, 5)
    name = f"img{n:02d}.png"
    cv2.imwrite(str(folder / name), image)
    word = COLOURS[n % len(COLOURS)]
    captions.append({"file": name, "caption": f"A {word} {shape} on a plain background. The left half is dark; "
                                              f"the right half is light."})


def _make_folder(folder: Path, numbers) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / "captions.jsonl"
    captions = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for n in numbers:
        _write_image(folder, n, captions)
    path.write_text("".join(json.dumps(c) + "\n" for c in captions))


def _cli(env, images: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", str(images), "--out", str(out), "--config", str(config),
            "--stages", ",".join(DATA_STAGES), *extra]


def _run(env, *args, **kwargs) -> dict:
    """Run the CLI to completion; return ``{stage: summary}`` from the run's JSON summary (newest in OUT/runs)."""
    command = _cli(env, *args, *kwargs.pop("extra", ()))
    done = run_python(command[1:], env=env, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, f"CLI failed ({done.returncode}):\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}"
    out = args[1]
    assert "stage      processed  cached  failed  seconds" in done.stdout
    report = json.loads(max((out / "runs").glob("*.json")).read_text())
    return {s["stage"]: s for s in report["stages"]}


def _counts(summary: dict) -> dict[str, tuple[int, int, int]]:
    return {stage: (s["processed"], s["cached"], s["failed"]) for stage, s in summary.items()}


def _manifest_rows(out: Path) -> list[dict]:
    return sorted(read_manifest(out).to_pylist(), key=lambda r: r["image_id"])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("pipeline-cli")
    (root / "base.yaml").write_text(IN_PROCESS_CONFIG)
    (root / "canny.yaml").write_text(IN_PROCESS_CONFIG.replace("structure: {batch_size: 32}",
                                                         "structure: {batch_size: 32, canny_low: 40, canny_high: 120}"))
    env = prefect_server.env()
    env["STRUCTXLIP_CACHE"] = str(root / "cache")  # one tiny CLIP for every run of this module
    env["XDG_CACHE_HOME"] = str(root / "cache")
    return root, env


def test_rerun_add_change_and_refresh(workspace):
    root, env = workspace
    images, out = root / "images", root / "out"
    _make_folder(images, range(7))

    first = _run(env, images, out, root / "base.yaml")
    assert _counts(first) == {s: (7, 0, 0) for s in DATA_STAGES}, _counts(first)

    # 1. Nothing changed: nothing is recomputed.
    again = _run(env, images, out, root / "base.yaml")
    assert _counts(again) == {s: (0, 7, 0) for s in DATA_STAGES}, _counts(again)

    # 2. Three new images: exactly those are processed by every data stage; the manifest holds all 10 once.
    _make_folder(images, range(7, 10))
    added = _run(env, images, out, root / "base.yaml")
    assert _counts(added) == {s: (3, 7, 0) for s in DATA_STAGES}, _counts(added)
    rows = _manifest_rows(out)
    assert len(rows) == 10 and len({r["image_id"] for r in rows}) == 10
    assert all(r["status"] == "ok" and r["filtered_caption"] and r["structure_path"] for r in rows), rows
    assert sorted(Path(r["source_path"]).name for r in rows) == [f"img{n:02d}.png" for n in range(10)]
    _reference["manifest"] = rows

    # 3. New Canny thresholds: structure and every later stage recompute, ingest does not.
    canny = _run(env, images, out, root / "canny.yaml")
    assert _counts(canny) == {"ingest": (0, 10, 0), **{s: (10, 0, 0) for s in DATA_STAGES[1:]}}, _counts(canny)
    changed = _manifest_rows(out)
    assert all(a["structure_path"] != b["structure_path"] for a, b in zip(rows, changed))
    assert len(list((out / "manifest").glob("*.parquet"))) == 1  # stale parts were replaced, not added to

    # 4. --refresh recomputes that stage although it is cached; the stages around it stay cached.
    refreshed = _run(env, images, out, root / "canny.yaml", extra=["--refresh", "regions"])
    assert _counts(refreshed) == {"ingest": (0, 10, 0), "structure": (0, 10, 0), "regions": (10, 0, 0),
                                  "captions": (0, 10, 0), "filter": (0, 10, 0), "manifest": (0, 10, 0)}
    assert _manifest_rows(out) == changed

    # 5. A single-stage re-run with another value: the run says which later stages now hold older results.
    (root / "canny60.yaml").write_text(IN_PROCESS_CONFIG.replace("structure: {batch_size: 32}",
                                                           "structure: {batch_size: 32, canny_low: 60}"))
    command = _cli(env, images, out, root / "canny60.yaml", "--stages", "structure")
    done = run_python(command[1:], env=env, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(max((out / "runs").glob("*.json")).read_text())
    assert [s["stage"] for s in report["stages"]] == ["structure"] and report["stages"][0]["processed"] == 10
    assert report["stale"] == ["regions", "captions", "filter", "manifest"], report["stale"]
    assert "computed from older inputs now: regions, captions, filter, manifest" in done.stdout


def _parts(out: Path, stage: str) -> list[Path]:
    return list((out / "stages" / stage).glob("*/part-*.parquet"))


def test_killed_run_resumes_to_the_same_manifest_and_lock_refuses_a_second_run(workspace):
    root, env = workspace
    images, out = root / "images", root / "out-killed"
    if not (images / "img09.png").exists():  # this test alone: build the same 10-image folder
        _make_folder(images, range(10))
    process = subprocess.Popen(_cli(env, images, out, root / "base.yaml"), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while not (_parts(out, "structure") or _parts(out, "regions")):
            assert process.poll() is None, f"run ended before it could be killed:\n{process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no structure part appeared in time"
            time.sleep(0.02)
        # Freeze the run (it keeps holding its lock), so the checks below cannot race with it finishing on a fast or
        # loaded machine; SIGKILL ends it, stopped or not.
        os.killpg(process.pid, signal.SIGSTOP)

        # 6. A second run on the same folder while the first holds it: a one-line error naming the holder.
        second = run_python(_cli(env, images, out, root / "base.yaml")[1:], env=env, timeout=120)
        assert process.poll() is None, "the first run finished before the lock could be tested; use more images"
        assert second.returncode == 2
        assert f"output folder {out.resolve()} is in use by run pid {process.pid} (started " in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr

        # 5. SIGKILL the whole run mid-pipeline.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert not (out / "manifest").exists(), "the run was not interrupted before its manifest stage"
    partial = {s: len(_parts(out, s)) for s in DATA_STAGES[:5]}

    resumed = _run(env, images, out, root / "base.yaml")
    assert resumed["ingest"]["cached"] == 10 and resumed["structure"]["cached"] >= 1, (partial, _counts(resumed))
    assert all(s["processed"] + s["cached"] == 10 for s in resumed.values()), _counts(resumed)
    reference = _reference.get("manifest")
    if reference is None:  # this test alone: an uninterrupted run gives the reference
        reference_out = root / "out-reference"
        _run(env, images, reference_out, root / "base.yaml")
        reference = _manifest_rows(reference_out)
    got = _manifest_rows(out)
    assert len(got) == len(reference), partial
    for a, b in zip(reference, got):
        assert_same(a, b, a["image_id"][:8])

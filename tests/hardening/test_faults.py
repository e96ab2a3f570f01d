"""Faults during real CLI runs: SIGKILL in each data stage and during training (the re-run ends where an
uninterrupted run ends), a full disk (a clear failure that leaves earlier outputs intact), and the Prefect server
going away mid-run (the re-run against the restarted server resumes from what was done)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from storage.layout import OutputLayout
from storage.manifest import read_manifest
from tests.flows.test_pipeline_cli import _manifest_rows, _run
from tests.hardening.conftest import (
    DATA_STAGES,
    N_IMAGES,
    assert_one_line_error,
    kill_group,
    run_cli,
    stage_parts,
    start_cli,
    wait_until,
)
from tests.manifests import assert_same
from tests.prefect_server import BIN_DIR, free_port, home_with_database, prefect_env, stop_process, wait_for_health

pytestmark = pytest.mark.e2e


def _data_run_args(baseline, out: Path, config: Path | None = None, stages=DATA_STAGES) -> list[str]:
    return ["run", str(baseline.images), "--out", str(out), "--config", str(config or baseline.config),
            "--stages", ",".join(stages)]


def _assert_complete_outputs(out: Path) -> None:
    """Every visible Parquet part and PNG under ``out`` is whole (readable), whatever happened to the run."""
    for part in out.rglob("*.parquet"):
        if not part.name.startswith("."):
            pq.read_table(part)
    for png in out.rglob("*.png"):
        if not png.name.startswith("."):
            with Image.open(png) as image:
                image.load()


# ---- (a) SIGKILL in each data stage ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed_out(baseline) -> Path:
    """One output folder that every kill below hits in turn: each run resumes the previous killed one."""
    return baseline.root / "out-killed"


@pytest.mark.parametrize("stage", DATA_STAGES[:5])
def test_sigkill_in_a_data_stage_leaves_only_complete_parts(stage, baseline, killed_out):
    # The runs chain: the run killed in `structure` first resumes the one killed in `ingest`, and so on, so each
    # stage is interrupted once and every stage before it is resumed from a killed run's leftovers.
    before = {s: len(stage_parts(killed_out, s)) for s in DATA_STAGES[:5]}
    assert before[stage] == 0, f"{stage} already has parts: {before}"
    process = start_cli(baseline.env, *_data_run_args(baseline, killed_out))
    try:
        wait_until(lambda: stage_parts(killed_out, stage), process, f"the first {stage} part")
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        kill_group(process)
    assert process.returncode == -signal.SIGKILL, process.returncode
    assert not (killed_out / "manifest").exists(), "the run was not interrupted before its manifest stage"
    _assert_complete_outputs(killed_out)
    earlier = DATA_STAGES[: DATA_STAGES.index(stage)]
    for done_stage in earlier:  # the stages before the killed one finished in this run (they were resumed)
        keys = {k for p in stage_parts(killed_out, done_stage) for k in pq.read_table(p).column("item_key").to_pylist()}
        assert len(keys) >= (N_IMAGES if done_stage in ("ingest", "structure", "regions") else 1), (done_stage, keys)


def test_the_run_after_the_kills_equals_an_uninterrupted_run(baseline, killed_out):
    summary = _run(baseline.env, baseline.images, killed_out, baseline.config)
    assert all(s["processed"] + s["cached"] == N_IMAGES and not s["chunk_errors"] for s in summary.values()), summary
    rows = _manifest_rows(killed_out)
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in baseline.rows]
    assert len(rows) == len(baseline.rows)
    for got, expected in zip(rows, baseline.rows):
        assert_same(got, expected, expected["image_id"][:8])


# ---- (b) SIGKILL during training, then --resume -------------------------------------------------------------------
@pytest.fixture(scope="module")
def training(tmp_path_factory, tiny_clip_dir):
    from structxlip.app.synthetic import make_synthetic_manifest

    root = tmp_path_factory.mktemp("train-kill")
    manifest = make_synthetic_manifest(root / "data", n_images=16, image_size=48, seed=1)  # 10 train images
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"clip_model": str(tiny_clip_dir)},
        "train": {"epochs": 3, "batch_size": 4, "lr": 1e-3, "max_text_tokens": 77, "seed": 5, "logit_scale_max": 2.0,
                  "checkpoint_every_steps": 1, "device": "cpu"},
    }))
    return root, manifest, config


def _train_args(training, out: Path, *extra: str) -> list[str]:
    _, manifest, config = training
    return ["train", str(manifest), "--out", str(out), "--config", str(config), "--no-progress", *extra]


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    (path,) = model_dir.glob("*.safetensors")
    return load_file(path)


def test_sigkill_during_training_then_resume_gives_the_uninterrupted_weights(training, no_server_env):
    import torch

    from structxlip.checkpoint import load_checkpoint

    root, _, _ = training
    # Every run is a CLI process with the same fixed thread count (float sums, so the weights, depend on it; this test
    # process's own torch settings are whatever earlier tests left), and the kill lands at a fixed point whatever the
    # load: mid epoch 2, step 5's optimiser step taken but not logged or saved.
    env = {**no_server_env, "OMP_NUM_THREADS": "1"}
    straight = run_cli(env, *_train_args(training, root / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    steps = int(straight.stdout.split(" steps")[0].rsplit(" ", 1)[-1])
    assert steps >= 6, straight.stdout
    killed = root / "killed"
    interrupted = run_cli({**env, "STRUCTXLIP_KILL_AT": "step@5"}, *_train_args(training, killed))
    assert interrupted.returncode == -signal.SIGKILL, interrupted.stderr[-3000:]
    assert load_checkpoint(OutputLayout(killed).checkpoint("last")).step == 4
    assert not OutputLayout(killed).model_dir.exists()

    resumed = run_cli(env, *_train_args(training, killed, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and f"{steps} steps" in resumed.stdout, resumed.stdout
    expected, got = _weights(OutputLayout(root / "straight").model_dir), _weights(OutputLayout(killed).model_dir)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)
    logged = [json.loads(line)["step"] for line in OutputLayout(killed).train_metrics.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # steps logged after the checkpoint were dropped, then redone


# ---- (c) disk full ----------------------------------------------------------------------------------------------------
def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _small_disk(path: Path, size: str = "3M"):
    """Yield True with a ``size`` tmpfs mounted on ``path``, or False when mounting is not permitted here."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: Path) -> None:
    """Write a filler file until the file system under ``folder`` is full."""
    with open(folder / "filler.bin", "wb", buffering=0) as handle:
        for block in (1 << 16, 1 << 12, 1 << 8, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * block)


def _limit_file_size(limit: int):
    def apply() -> None:  # runs in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@dataclass(frozen=True)
class FullDisk:
    """An earlier complete output folder on a full file system, and the runs made there."""

    out: Path
    mounted: bool  # a real full tmpfs (else a file-size limit stood in for it)
    before: dict[str, str]
    rows_before: list[dict]
    lock_run: subprocess.CompletedProcess  # the disk full before the run could even record its lock
    stage_run: subprocess.CompletedProcess  # the lock record fits; the stages' outputs do not


@pytest.fixture(scope="module")
def full_disk(baseline, tmp_path_factory):
    root = tmp_path_factory.mktemp("full-disk")
    canny = root / "canny.yaml"  # new thresholds: structure and every later stage must write new files
    canny.write_text(baseline.config.read_text().replace("structure: {batch_size: 32}",
                                                         "structure: {batch_size: 32, canny_low: 40, canny_high: 120}"))
    with _small_disk(root / "disk") as mounted:
        out = root / "disk" / "out"
        shutil.copytree(baseline.out, out, symlinks=True)
        args = _data_run_args(baseline, out, canny)
        limit = {} if mounted else {"preexec_fn": _limit_file_size(512)}  # no mount permission: EFBIG instead
        (out / ".lock").write_bytes(b"")  # released by the earlier run: writing the holder record needs space
        before = _digests(out)
        rows_before = read_manifest(out).to_pylist()
        if mounted:
            _fill(root / "disk")
        lock_run = run_cli(baseline.env, *args, **limit)
        # As left by a killed run: the lock file still holds a record, so the next record fits in its place.
        if mounted:
            (root / "disk" / "filler.bin").unlink()
        (out / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
        before[".lock"] = _digests(out)[".lock"]
        if mounted:
            _fill(root / "disk")
        stage_run = run_cli(baseline.env, *args, **limit)
        (root / "disk" / "filler.bin").unlink(missing_ok=True)
        yield FullDisk(out, mounted, before, rows_before, lock_run, stage_run)


def _report(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}"


def _disk_error(text: str) -> bool:
    return "No space left on device" in text or "File too large" in text


def test_a_full_disk_at_the_start_is_one_clear_line(full_disk):
    if not full_disk.mounted:
        pytest.skip("no tmpfs mount permission: a file-size limit lets the small lock record through")
    line = assert_one_line_error(full_disk.lock_run, "cannot write to output folder")
    assert _disk_error(line), line


def test_a_full_disk_in_a_stage_fails_and_keeps_the_previous_outputs(full_disk):
    done, out = full_disk.stage_run, full_disk.out
    assert done.returncode != 0 and _disk_error(done.stderr), _report(done)
    after = _digests(out)
    changed = [name for name, digest in full_disk.before.items() if name != ".lock" and after.get(name) != digest]
    assert not changed, f"earlier outputs changed or vanished: {changed}"
    assert read_manifest(out).to_pylist() == full_disk.rows_before
    _assert_complete_outputs(out)
    leftovers = [name for name in after if Path(name).name.startswith(".") and name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    for name in set(after) - set(full_disk.before):  # whatever new file did get written is whole
        text = (out / name).read_text()
        # Prefect leaves an empty result file when persisting a failed chunk's result hits ENOSPC ("Failed to write
        # result"); a later run ignores it (checked: it recomputes those chunks), so only non-empty ones must parse.
        if name.startswith(".prefect/results/") and text:
            json.loads(text)


def test_a_full_disk_in_a_stage_is_reported_without_tracebacks(full_disk):
    done = full_disk.stage_run
    assert done.returncode == 2 and "Traceback" not in done.stderr, _report(done)
    assert done.stderr.strip().splitlines()[-1].startswith("structxlip run: error:"), _report(done)


# ---- (d) the Prefect server goes away mid-run -----------------------------------------------------------------------
def _start_server(home: Path, port: int) -> subprocess.Popen:
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(api_url, home)
    del env["PREFECT_API_URL"]
    with open(home / "server.log", "ab") as log:
        process = subprocess.Popen([str(BIN_DIR / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                    str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_health(api_url, process, home / "server.log", 180)
    return process


OUTAGE_WAIT_S = 30  # how long a run may take to notice that its server is gone


@dataclass(frozen=True)
class ServerOutage:
    """A run whose Prefect server stopped mid-structure, then a re-run against the restarted server."""

    interrupted_code: int | None  # exit code of the interrupted run, None when it was still running after the wait
    interrupted_stderr: str
    out: Path
    parts_before: dict[str, dict[str, int]]  # stage -> {part name: mtime_ns} when the re-run started
    done_before: dict[str, int]  # stage -> items done when the re-run started
    rerun: dict  # stage -> summary of the re-run


@pytest.fixture(scope="module")
def server_outage(baseline, tmp_path_factory, prefect_database_template) -> ServerOutage:
    root = tmp_path_factory.mktemp("server-outage")
    home, port = home_with_database(root / "prefect-home", prefect_database_template), free_port()
    env = {**prefect_env(f"http://127.0.0.1:{port}/api", home), "STRUCTXLIP_CACHE": baseline.env["STRUCTXLIP_CACHE"]}
    stages = ["ingest", "structure", "regions"]
    out = root / "out"
    server = _start_server(home, port)
    try:
        process = start_cli(env, *_data_run_args(baseline, out, stages=stages))
        try:
            wait_until(lambda: stage_parts(out, "structure"), process, "the first structure part")
            stop_process(server)
            try:
                _, stderr = process.communicate(timeout=OUTAGE_WAIT_S)
            except subprocess.TimeoutExpired:
                stderr = ""
            code = process.poll()
        finally:
            kill_group(process)
        _assert_complete_outputs(out)
        parts_before = {s: _mtimes(out, s) for s in stages}
        done_before = {s: len({k for p in stage_parts(out, s) for k in pq.read_table(p).column("item_key").to_pylist()})
                       for s in stages}
        server = _start_server(home, port)  # same port, same home (database)
        rerun = _run_stages(env, baseline, out, stages)
    finally:
        stop_process(server)
    return ServerOutage(code, stderr, out, parts_before, done_before, rerun)


def test_a_run_whose_server_stops_ends_cleanly(server_outage):
    assert server_outage.interrupted_code is not None, f"still running {OUTAGE_WAIT_S} s after the server stopped"
    if server_outage.interrupted_code != 0:  # failing is fine if it is clean: one clear last line, no traceback
        stderr = server_outage.interrupted_stderr
        assert "Traceback" not in stderr, stderr[-4000:]
        assert stderr.strip().splitlines()[-1].startswith("structxlip run: error:"), stderr[-4000:]


def test_a_rerun_against_the_restarted_server_resumes_from_cache(server_outage):
    summary, done = server_outage.rerun, server_outage.done_before
    assert done["ingest"] == N_IMAGES and done["structure"] >= 1, done
    for stage, count in done.items():  # exactly what was done before is cached, the rest is computed
        assert (summary[stage]["cached"], summary[stage]["processed"]) == (count, N_IMAGES - count), (stage, summary)
        assert not summary[stage]["chunk_errors"], summary[stage]
        now = _mtimes(server_outage.out, stage)
        assert all(now[name] == mtime for name, mtime in server_outage.parts_before[stage].items()), \
            f"{stage} parts were rewritten"


def _mtimes(out: Path, stage: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in stage_parts(out, stage)}


def _run_stages(env, baseline, out: Path, stages: list[str]) -> dict:
    done = run_cli(env, *_data_run_args(baseline, out, stages=stages))
    assert done.returncode == 0, f"re-run failed ({done.returncode}):\n{done.stderr[-4000:]}"
    report = json.loads(max((out / "runs").glob("*.json")).read_text())
    return {s["stage"]: s for s in report["stages"]}

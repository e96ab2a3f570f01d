"""A disk that fills up during a run, through the real CLI on a real small file system (a 1 MiB tmpfs, mounted by the
test; skipped where mounting is not allowed): the stage fails without recording anything, the table is printed with
the later stages "not run", the last line names the file and the free space, and failing to write the run record
never hides the table. After space is freed, the same command completes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.corpus import make_generated_images
from tests.flows.test_pipeline_cli import BASE_CONFIG
from tests.hardening.conftest import run_cli, stage_parts

pytestmark = pytest.mark.e2e


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_prints_the_table_and_one_line_naming_the_file_and_free_space(small_disk, tmp_path, cli_env):
    images = tmp_path / "images"
    make_generated_images(images, 24, size=(640, 480), seed=11)
    config = tmp_path / "config.yaml"
    config.write_text(BASE_CONFIG)
    out = small_disk / "out"
    args = ["run", str(images), "--out", str(out), "--config", str(config), "--stages",
            "ingest,structure,regions,captions,filter,manifest"]
    done = run_cli(cli_env, *args)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("structxlip run: error: stage ") and "disk full while writing " in last, last
    assert str(out) in last and "free of" in last, last
    table = done.stdout
    assert "stage      processed  cached  failed  seconds" in table
    assert "manifest" in table and "not run (an earlier stage failed)" in table, table
    failed_stage = last.split("stage ", 1)[1].split(" ", 1)[0]
    # Nothing of the failed chunks is recorded as a per-item failure: every stored row of that stage is ok.
    import pyarrow.parquet as pq

    statuses = [s for part in stage_parts(out, failed_stage) for s in pq.read_table(part).column("status").to_pylist()]
    assert all(status == "ok" for status in statuses), statuses
    if not list((out / "runs").glob("*.json")):  # the record could not be written either: said, not hidden
        assert "the run record was not written" in table

    # Space is freed (the folder moves to a large disk): the same command completes from what was kept.
    moved = tmp_path / "out"
    shutil.copytree(out, moved, symlinks=True)
    done = run_cli(cli_env, *[str(moved) if a == str(out) else a for a in args])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not run" not in done.stdout

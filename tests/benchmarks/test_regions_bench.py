"""The regions benchmark's helpers: whole-tree PSS counts a child's memory; the stage's scene files and chunk entry
write what the stage writes; the floor times the compiled segmentation (no timing assertions)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.common import PeakTreePss, process_pss_mb, tree_pss_mb

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")

# Touches 150 MiB of private memory, says so, then waits for its stdin to close.
HOLD_CHILD = ("import sys\n"
              "block = bytearray(150 * 1024 * 1024)\n"
              "for i in range(0, len(block), 4096): block[i] = 1\n"
              "print('ready', flush=True)\n"
              "sys.stdin.read()\n")


def test_tree_pss_counts_a_live_child():
    alone = tree_pss_mb()
    assert process_pss_mb(os.getpid()) > 0 and alone >= process_pss_mb(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", HOLD_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert process_pss_mb(child.pid) >= 140
        with PeakTreePss(interval=0.05) as memory:
            pass
        # This process and the child at least (another test's child still exiting may add, never subtract).
        assert memory.peak_mb >= process_pss_mb(os.getpid()) + 140
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert process_pss_mb(child.pid) == 0.0  # gone: unreadable counts as nothing


def test_stage_chunk_writes_each_scenes_crops(tmp_path):
    from benchmarks.regions import segmentation_floor_s, stage_chunk, write_scene_files
    from tests.scenes import make_scene

    scenes = [make_scene(i, size=(160, 120)) for i in range(2)]
    records = write_scene_files(scenes, tmp_path)
    assert [r["structure_path"] for r in records] == ["maps/00000.png", "maps/00001.png"]
    segments = stage_chunk(records, str(tmp_path), "k", 4)
    assert 2 <= segments <= 8
    assert len(list(tmp_path.glob("crops/k/**/*.jpg"))) == segments
    assert segmentation_floor_s([s.rgb for s in scenes], repeats=1) > 0

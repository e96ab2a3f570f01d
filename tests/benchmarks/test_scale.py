"""The scale benchmark's helpers: a process tree's peak PSS and CPU (exited and orphaned processes included) against
what its processes are made to allocate and spend, and the row arithmetic on a hand-made run report."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from benchmarks.scale import TreeUsage, measure_tree, new_run_report, timing_row

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child subreaper and PSS are Linux")

# Touches MIB MiB of private memory, then holds it for 1.5 s (15 samples at 0.1 s).
HOLD = ("import time\n"
        "block = bytearray({mib} * 1024 * 1024)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "time.sleep(1.5)\n")
# Starts GRANDCHILD in a session of its own and exits at once without waiting for it: the grandchild is orphaned.
ORPHANING = ("import subprocess, sys\n"
             "grandchild = subprocess.Popen([sys.executable, '-c', sys.argv[1]], start_new_session=True)\n"
             "print(grandchild.pid, flush=True)\n")
# Holds 100 MiB while it spins until it has used 0.5 s of CPU itself.
SPIN = ("import time\n"
        "block = bytearray(100 * 1024 * 1024)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "while time.process_time() < 0.5: pass\n")


def _measure(tmp_path, code: str, *args: str, **kwargs) -> TreeUsage:
    return measure_tree([sys.executable, "-c", code, *args], log=tmp_path / "out.log", **kwargs)


def test_peak_pss_counts_what_the_child_allocates(tmp_path):
    bare = _measure(tmp_path, HOLD.format(mib=0))
    loaded = _measure(tmp_path, HOLD.format(mib=200))
    assert bare.returncode == loaded.returncode == 0 and loaded.left_running == 0
    assert 190 <= loaded.peak_pss_mb - bare.peak_pss_mb <= 215  # the 200 MiB block, nothing counted twice


def test_an_orphaned_grandchilds_cpu_and_memory_count(tmp_path):
    usage = _measure(tmp_path, ORPHANING, SPIN)
    assert usage.returncode == 0 and usage.left_running == 0
    # The grandchild alone spent 0.5 CPU-s (its own clock, 10 ms ticks) after its parent exited; two interpreter
    # starts add well under 3 s.
    assert 0.49 <= usage.cpu_s <= 3.5
    assert usage.peak_pss_mb >= 100
    grandchild = int((tmp_path / "out.log").read_text().split()[0])
    assert not psutil.pid_exists(grandchild)  # reaped here, not left a zombie


def test_leftovers_are_killed_and_other_children_untouched(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        usage = _measure(tmp_path, ORPHANING, "import time; time.sleep(60)", grace_s=0.5)
        assert usage.returncode == 0 and usage.left_running == 1
        assert not psutil.pid_exists(int((tmp_path / "out.log").read_text().split()[0]))
        assert bystander.poll() is None  # a child of this process the command did not start
    finally:
        bystander.kill()
        bystander.wait()


def _report(path, seconds: list[float], processed: list[int]) -> None:
    stages = [{"stage": f"s{i}", "seconds": s, "processed": p} for i, (s, p) in enumerate(zip(seconds, processed))]
    path.write_text(json.dumps({"stages": stages, "seconds": 99.0}))


def test_beyond_stages_arithmetic_on_a_hand_made_report(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    _report(runs / "20260101T000000000000.json", [9.0], [1])  # an earlier run
    known = {p.name for p in runs.iterdir()}
    _report(runs / "20260101T000100000000.json", [1.5, 2.25, 0.25], [40, 40, 0])
    stages = new_run_report(runs, known)["stages"]
    row = timing_row("cold", TreeUsage(wall_s=10.0, peak_pss_mb=512.0, cpu_s=6.0, returncode=0, left_running=0),
                     stages, load_1m=1.5)
    assert row["stages_s"] == pytest.approx(4.0) and row["beyond_stages_s"] == pytest.approx(6.0)
    assert row["images_computed"] == 40 and row["img_s"] == pytest.approx(4.0)  # 40 images / 10 s
    assert row["cpu_ms_per_img"] == pytest.approx(150.0)  # 6 CPU-s / 40 images
    assert row["processed_per_stage"] == "40/40/0" and row["load_1m"] == 1.5
    cached = timing_row("cached", TreeUsage(2.0, 300.0, 1.0, 0, 0), [{"seconds": 0.0, "processed": 0}], 0.0)
    assert cached["img_s"] is None and cached["cpu_ms_per_img"] is None and cached["beyond_stages_s"] == 2.0
    with pytest.raises(RuntimeError, match="expected one new run report"):
        new_run_report(runs, set())

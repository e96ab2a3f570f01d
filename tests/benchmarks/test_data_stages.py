"""The benchmarks' census: descendants, their threads and CPU time read from /proc, and the engine workers' share."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.common import Census, _descendants, _threads, cpu_seconds as _cpu_seconds, worker_cpu_seconds

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")

# Spins until it has used 0.3 s of CPU, then says so and waits for its stdin to close.
BUSY_CHILD = ("import sys, time\n"
              "while time.process_time() < 0.3: pass\n"
              "print('ready', flush=True)\n"
              "sys.stdin.read()\n")


def test_live_child_counted_in_processes_and_cpu():
    before = _cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", BUSY_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.pid in _descendants(os.getpid())
        assert _threads(child.pid) >= 1
        # The live child's CPU (not yet in RUSAGE_CHILDREN); /proc counts whole clock ticks (10 ms here).
        assert _cpu_seconds() - before >= 0.25
        with Census(interval=0.01) as census:
            census._stop.wait(0.05)
        assert census.max_processes >= 2 and census.max_threads >= 2
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert child.pid not in _descendants(os.getpid())


def _spin(seconds: float) -> int:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return os.getpid()


def test_worker_cpu_counts_the_engine_workers_only():
    from pipelines.engine import workers
    workers.shutdown()
    try:
        pool = workers.pool(2)
        pool.submit(os.getpid).result()  # started
        before_workers, before_all = worker_cpu_seconds(), _cpu_seconds()
        pool.submit(_spin, 0.5).result()
        spent_workers, spent_all = worker_cpu_seconds() - before_workers, _cpu_seconds() - before_all
        assert 0.3 <= spent_workers <= spent_all + 0.05
    finally:
        workers.shutdown()

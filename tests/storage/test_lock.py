"""The output-folder lock: exclusive across processes, re-entrant within one, released by the kernel on SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from storage import lock
from storage.layout import OutputLayout

HOLDER = textwrap.dedent(
    """
    import sys, time
    from storage import lock
    from storage.layout import OutputLayout
    lock.acquire(OutputLayout(sys.argv[1]))
    lock.note(OutputLayout(sys.argv[1]), runs=["a", "b"])
    print("locked", flush=True)
    time.sleep(60)
    """
)


def _start_holder(out_dir) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_second_process_gets_one_line_error_naming_the_holder(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(lock.OutputFolderBusy) as error:
            lock.acquire(OutputLayout(tmp_path))
        message = str(error.value)
        assert message.startswith(f"output folder {tmp_path.resolve()} is in use by run pid {holder.pid} (started ")
        assert "\n" not in message
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == holder.pid and record["host"]
    finally:
        holder.kill()
        holder.wait()


def test_sigkilled_holder_does_not_block(tmp_path):
    holder = _start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / ".lock").exists()  # the stale file stays; only the kernel lock mattered
    with lock.output_lock(OutputLayout(tmp_path)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_killed_holders_record_reaches_the_next_holders_until_one_settles_it(tmp_path):
    layout = OutputLayout(tmp_path)
    holder = _start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with lock.output_lock(layout):
        left = lock.left_behind(layout)
        assert left["pid"] == holder.pid and left["runs"] == ["a", "b"]
        with lock.output_lock(layout):  # re-entered: the same record
            assert lock.left_behind(layout) == left
    # Not settled: the next holder finds it again (the file holds it while nobody holds the lock)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    with lock.output_lock(layout):
        assert lock.left_behind(layout) == left
        lock.note(layout, runs=["c"])  # this holder's own record is written over it meanwhile
        mine = json.loads((tmp_path / ".lock").read_text())
        assert mine["pid"] == os.getpid() and mine["runs"] == ["c"]
        lock.left_behind_settled(layout)
        assert lock.left_behind(layout) is None
    assert (tmp_path / ".lock").read_text() == ""  # released normally: nothing left for the next holder
    with lock.output_lock(layout):
        assert lock.left_behind(layout) is None


def test_a_holder_killed_before_settling_passes_the_earlier_record_on(tmp_path):
    layout = OutputLayout(tmp_path)
    first = _start_holder(tmp_path)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    second = _start_holder(tmp_path)  # finds the first's record, and is killed before it settles it
    os.kill(second.pid, signal.SIGKILL)
    second.wait()
    with lock.output_lock(layout):
        left = lock.left_behind(layout)
        assert left["pid"] == second.pid and left["left_behind"]["pid"] == first.pid
        assert left["left_behind"]["runs"] == ["a", "b"] and "left_behind" not in left["left_behind"]
        assert json.loads((tmp_path / ".lock").read_text())["left_behind"] == left  # passed on if this one dies too
        lock.left_behind_settled(layout)
        assert "left_behind" not in json.loads((tmp_path / ".lock").read_text())


def test_a_released_lock_leaves_no_record(tmp_path):
    layout = OutputLayout(tmp_path)
    with lock.output_lock(layout):
        lock.note(layout, runs=["a"])
        assert lock.left_behind(layout) is None
    with lock.output_lock(layout):
        assert lock.left_behind(layout) is None
    assert lock.left_behind(layout) is None  # not held: nothing
    lock.note(layout, runs=["b"])  # not held: ignored
    assert (tmp_path / ".lock").read_text() == ""


def test_reentrant_in_process_and_released_after_last_exit(tmp_path):
    layout = OutputLayout(tmp_path)
    with lock.output_lock(layout):
        with lock.output_lock(layout):
            pass
        # Still held by the outer block: another process must be refused.
        probe = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom storage import lock\nfrom storage.layout import OutputLayout\n"
             "try:\n    lock.acquire(OutputLayout(sys.argv[1]))\nexcept lock.OutputFolderBusy as e:\n    print(e)\n",
             str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert f"in use by run pid {os.getpid()}" in probe.stdout
    holder = _start_holder(tmp_path)  # released: another process can take it
    holder.kill()
    holder.wait()


def test_forked_child_does_not_keep_the_lock_after_parent_exits(tmp_path):
    """A child forked while the lock is held (a process pool) must not hold the folder once the parent dies."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from storage import lock
        from storage.layout import OutputLayout
        lock.acquire(OutputLayout(sys.argv[1]))
        if os.fork() == 0:
            time.sleep(8)  # the orphan outlives its parent
            os._exit(0)
        print("forked", flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "forked"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while True:
        try:
            lock.acquire(OutputLayout(tmp_path))
            break
        except lock.OutputFolderBusy:
            assert time.monotonic() < deadline, "an orphaned forked child kept the output folder locked"
            time.sleep(0.05)
    lock.release(OutputLayout(tmp_path))

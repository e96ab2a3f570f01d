"""One run per output folder: an exclusive ``flock`` on ``OUT/.lock`` that records the holder's pid, host and start time.

The kernel drops a ``flock`` when the holder dies (even by SIGKILL), so a stale lock file never blocks a new run. The
lock is re-entrant within one process (the parent flow and its stage subflows share it), and forked children (process
pools, Dask workers) close their copy of the descriptor so an orphaned child cannot keep the folder locked.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from storage.layout import OutputLayout


class OutputFolderBusy(RuntimeError):
    """Another live run holds the output folder's lock; the message names its pid and start time."""


class OutputFolderUnwritable(RuntimeError):
    """The output folder's lock record cannot be written (disk full, read-only); the message says why."""


_held: dict[Path, list] = {}  # lock path -> [fd, depth, folder created by us]; re-entrancy inside this process
_guard = threading.Lock()


def _close_in_child() -> None:
    # A forked child shares the parent's open file description; closing its descriptor drops the child's reference
    # without releasing the parent's lock, and keeps an orphaned child from holding the folder after the parent dies.
    for fd, *_rest in list(_held.values()):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _describe_holder(path: Path) -> str:
    """Return ``pid N (started TIME on HOST)`` from the lock file, or a generic text if it cannot be read yet."""
    for _ in range(20):  # the holder writes its record right after locking; give it a moment
        try:
            info = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        if info.get("pid"):
            return f"pid {info['pid']} (started {info.get('started', '?')} on {info.get('host', '?')})"
        time.sleep(0.05)
    return "another process"


def acquire(layout: OutputLayout) -> None:
    """Take the folder's lock (re-entrant in this process); raise ``OutputFolderBusy`` at once if another run holds it."""
    path = layout.lock_path
    with _guard:
        if path in _held:
            _held[path][1] += 1
            return
        created = not path.parent.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _remove_if_unused(path, created)
            raise OutputFolderBusy(f"output folder {layout.root} is in use by run {_describe_holder(path)}") from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        except OSError as exc:  # e.g. a full disk: nothing of the run could be written either
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            _remove_if_unused(path, created)
            raise OutputFolderUnwritable(f"cannot write to output folder {layout.root}: {exc.strerror or exc}") \
                from None
        _held[path] = [fd, 1, created]


def release(layout: OutputLayout) -> None:
    """Drop one level of this process's hold on the folder's lock; the last release unlocks it."""
    path = layout.lock_path
    with _guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[path]
        fd = entry[0]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty file reads as "not held by anyone we know"
        # Still locked while the unused folder is removed: nobody else can be between our unlink and rmdir.
        _remove_if_unused(path, entry[2])
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def release_all() -> None:
    """Release every lock this process holds (an interrupted run, just before it exits)."""
    with _guard:
        paths = list(_held)
    for path in paths:
        with _guard:
            entry = _held.get(path)
            if entry is None:
                continue
            entry[1] = 1
        release(OutputLayout(path.parent))


def _remove_if_unused(path: Path, created: bool) -> None:
    """Remove the lock file and the output folder that taking the lock created, when the run wrote nothing else
    there (a run refused by its preflight leaves no empty folder holding a ``.lock``)."""
    if not created:
        return
    with contextlib.suppress(OSError):
        if [entry.name for entry in os.scandir(path.parent)] == [path.name]:
            path.unlink()
            path.parent.rmdir()


@contextlib.contextmanager
def output_lock(layout: OutputLayout) -> Iterator[None]:
    """Hold the output folder's lock for the duration of the block."""
    acquire(layout)
    try:
        yield
    finally:
        release(layout)

"""One run per output folder: an exclusive ``flock`` on ``OUT/.lock`` that records the holder's pid, host and start time.

The kernel drops a ``flock`` when the holder dies (even by SIGKILL), so a stale lock file never blocks a new run. A
holder that releases the lock empties the file; one that was killed (SIGKILL, the out-of-memory killer) leaves its
record there, with what it noted while it ran (``note``: the Prefect runs in progress), and the next holder can read
it (``left_behind``) to settle what the killed run left unfinished. The lock is re-entrant within one process (the
parent flow and its stage subflows share it), and forked children (process pools, Dask workers) close their copy of
the descriptor so an orphaned child cannot keep the folder locked.
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


# lock path -> [fd, depth, folder created by us, our record, a killed holder's record not yet settled];
# re-entrancy inside this process
_held: dict[Path, list] = {}
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
        left_behind = _read_record(fd)  # a holder that released the lock emptied the file: this one was killed
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        if left_behind is not None:  # kept in ours until settled: killed too, this run passes it on
            record["left_behind"] = left_behind
        try:
            _write_record(fd, record)
        except OSError as exc:  # e.g. a full disk: nothing of the run could be written either
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            _remove_if_unused(path, created)
            raise OutputFolderUnwritable(f"cannot write to output folder {layout.root}: {exc.strerror or exc}") \
                from None
        _held[path] = [fd, 1, created, record, left_behind]


def _read_record(fd: int) -> dict | None:
    """The holder record in the lock file, or None (empty: released; unreadable: not ours to interpret)."""
    try:
        record = json.loads(os.pread(fd, 1 << 20, 0) or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("pid") else None


def _write_record(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)


def note(layout: OutputLayout, **fields) -> None:
    """Add ``fields`` to this process's record in the held lock file (what a run killed now leaves for the next
    holder, ``left_behind``). Nothing when the lock is not held here; a write error is ignored (a record only)."""
    with _guard:
        entry = _held.get(layout.lock_path)
        if entry is None:
            return
        entry[3] = {**entry[3], **fields}
        with contextlib.suppress(OSError):
            _write_record(entry[0], entry[3])


def left_behind(layout: OutputLayout) -> dict | None:
    """The record of a holder that was killed while it held the folder (its pid, host, start time, what it ``note``d
    and, under ``left_behind``, the record of a killed holder before it that it had not settled), found when this
    process took the lock; None if the last holder released it, or once ``left_behind_settled``. Not settled by the
    time this process releases the lock, it stays in the file for the next holder."""
    with _guard:
        entry = _held.get(layout.lock_path)
        return None if entry is None else entry[4]


def left_behind_settled(layout: OutputLayout) -> None:
    """Forget the killed holder's record (``left_behind``): what it left unfinished has been dealt with."""
    with _guard:
        entry = _held.get(layout.lock_path)
        if entry is not None and entry[4] is not None:
            entry[4] = None
            entry[3].pop("left_behind", None)
            with contextlib.suppress(OSError):
                _write_record(entry[0], entry[3])


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
            if entry[4] is not None:  # a killed holder's record nobody took: the next holder's to settle
                _write_record(fd, entry[4])
            else:
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

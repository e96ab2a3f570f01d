"""storage.atomic: files and folders follow the umask; disk-full errors become one clear line."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from storage.atomic import (
    atomic_directory,
    atomic_path,
    atomic_write_bytes,
    atomic_writer,
    current_umask,
    storage_error_from,
    write_png,
)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                       (0o077, 0o600, 0o700), (0o027, 0o640, 0o750)])
def test_every_atomic_write_follows_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    import numpy as np
    import pyarrow as pa

    from storage.parquet import write_parquet_atomic

    umask(mask)
    assert current_umask() == mask
    written = [
        atomic_write_bytes(tmp_path / "a.bin", b"x"),
        write_png(tmp_path / "map.png", np.zeros((2, 2), np.uint8)),
        write_parquet_atomic(pa.table({"x": [1]}), tmp_path / "part.parquet"),
    ]
    with atomic_writer(tmp_path / "b.txt", "w") as handle:
        handle.write("y")
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"z")  # a library writing into the given temporary path (torch.save, pyarrow)
    with atomic_path(tmp_path / "d.bin") as tmp:
        tmp.unlink()  # a library that replaces the file: it gets open()'s umask mode itself
        tmp.write_bytes(b"w")
    written += [tmp_path / "b.txt", tmp_path / "c.bin", tmp_path / "d.bin"]
    for path in written:
        assert _mode(path) == file_mode, (path.name, oct(_mode(path)))
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "weights.bin").write_bytes(b"w")
    assert _mode(tmp_path / "model") == dir_mode
    assert _mode(tmp_path / "model" / "weights.bin") == file_mode
    # The reference: what a plain open()/mkdir() gives under the same umask.
    (tmp_path / "plain.txt").write_text("p")
    (tmp_path / "plain").mkdir()
    assert (_mode(tmp_path / "plain.txt"), _mode(tmp_path / "plain")) == (file_mode, dir_mode)


def test_a_checkpoint_is_readable_by_the_group_under_umask_002(tmp_path, umask):
    import torch

    from structxlip.checkpoint import save_checkpoint

    umask(0o002)
    path = save_checkpoint(tmp_path / "last.pt", model_state={"w": torch.zeros(2)}, optimizer_state={}, step=1,
                           epoch=0, batch_in_epoch=1, rng={"python": 0})
    assert _mode(path) == 0o664


def test_current_umask_does_not_change_it(umask):
    umask(0o037)
    assert current_umask() == 0o037 and current_umask() == 0o037
    assert os.umask(0o022) == 0o037


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 11648 vs 11536"),
    RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_disk_full_is_named_with_the_file_and_the_space_left(tmp_path, error):
    target = tmp_path / "train" / "checkpoints" / "last.pt"
    converted = storage_error_from(error, target)
    assert isinstance(converted, OSError) and converted.errno == errno.ENOSPC
    message = str(converted)
    assert message.startswith(f"[Errno 28] disk full while writing {target} (on the disk of {tmp_path}: ")
    assert "MiB free of" in message and "\n" not in message and "inline_container" not in message


def test_other_errors_are_not_called_a_full_disk(tmp_path):
    assert storage_error_from(RuntimeError("CUDA out of memory"), tmp_path / "x") is None
    assert storage_error_from(OSError(errno.EACCES, "Permission denied"), tmp_path / "x") is None
    read_only = storage_error_from(OSError(errno.EROFS, "Read-only file system"), tmp_path / "x")
    assert read_only.errno == errno.EROFS and "read-only file system while writing" in str(read_only)


def test_save_checkpoint_on_a_full_disk_raises_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import torch

    from structxlip import checkpoint
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, model_state={"w": torch.ones(2)}, optimizer_state={}, step=1, epoch=0,
                               batch_in_epoch=1, rng={"python": 0})

    def full_disk(payload, target):
        Path(target).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as caught:
        checkpoint.save_checkpoint(path, model_state={"w": torch.zeros(2)}, optimizer_state={}, step=2, epoch=0,
                                   batch_in_epoch=2, rng={"python": 0})
    assert caught.value.errno == errno.ENOSPC and f"disk full while writing {path}" in str(caught.value)
    assert checkpoint.load_checkpoint(path).step == 1  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_exporting_the_model_on_a_full_disk_says_so(tmp_path, monkeypatch):
    from structxlip.app import train
    class SafetensorError(Exception):  # what safetensors raises for an I/O error: not an OSError
        pass

    class Model:
        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')

    with pytest.raises(OSError) as caught:
        train.export_model(Model(), None, None, tmp_path / "train" / "model")
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value).startswith(f"[Errno 28] disk full while writing {tmp_path / 'train' / 'model'}")
    assert not (tmp_path / "train" / "model").exists()  # the staging folder is removed, nothing half-written stays
    assert [p.name for p in (tmp_path / "train").iterdir()] == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "maps" / "a.png"
    atomic_write_bytes(target, b"old")  # creates the missing folder
    real_write = os.write
    calls = []

    def write_then_fill_the_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:3]))  # a short write: the rest must follow
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write_then_fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new content", durable=False)
    assert calls == [11, 8]
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == ["a.png"]
    atomic_write_bytes(target, b"new content", durable=False)
    assert target.read_bytes() == b"new content"

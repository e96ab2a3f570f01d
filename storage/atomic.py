"""Atomic file writes: write to a temporary sibling, fsync, then rename over the target.

Every file and folder written here gets the permissions a plain ``open``/``mkdir`` would give under the process
umask (e.g. 0644 / 0755 under umask 022): ``tempfile`` creates its files 0600 and folders 0700, which would keep a
colleague or another container user from reading the manifest, metrics or checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import threading
from pathlib import Path
from typing import IO, Iterator

import numpy as np


_umask_lock = threading.Lock()


def current_umask() -> int:
    """Return the process umask without changing it (Linux: /proc/self/status; elsewhere a locked set-and-restore)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give ``path`` the mode a new file (0666) or folder (0777) gets under the umask, as ``open``/``mkdir`` would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


_temp_counter = itertools.count()


def _create_temp(target: str | os.PathLike) -> tuple[int, str]:
    """Create an empty temporary sibling ``.<name>.<pid>-<n>.tmp`` of ``target`` (its folder made if missing) and
    return its descriptor and name. Created with mode 0666, so the kernel applies the umask as for a plain ``open``
    (no umask lookup, no chmod: ~0.1 ms less per file than ``tempfile.mkstemp`` + ``fchmod``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return _temp_sibling(target, lambda temp: os.open(temp, flags, 0o666))


def _create_temp_directory(target: Path) -> str:
    """Create an empty sibling folder of ``target`` named as ``_create_temp`` names files and return its name; mode
    0777, so the kernel applies the umask as for a plain ``mkdir`` (the regions stage makes one per image)."""
    return _temp_sibling(target, lambda temp: os.mkdir(temp, 0o777))[1]


def _temp_sibling(target: str | os.PathLike, create) -> tuple:
    """Return ``(create(temp), temp)`` for the first free name ``.<name>.<pid>-<n>.tmp`` beside ``target``."""
    folder, name = os.path.split(os.fspath(target))
    while True:
        temp = os.path.join(folder, f".{name}.{os.getpid()}-{next(_temp_counter)}.tmp")
        try:
            return create(temp), temp
        except FileExistsError:  # left by a killed process that had the same pid
            continue
        except FileNotFoundError:
            os.makedirs(folder or ".", exist_ok=True)
            return create(temp), temp


def _discard(temp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb", *, durable: bool = True) -> Iterator[IO]:
    """Yield a file object whose content replaces ``path`` only if the block finishes without error.

    ``durable=False`` skips the fsync (about 1.5 ms a file here): the rename still guarantees that a killed process
    never leaves a half-written file, only a power loss could; used for the many small, regenerable map/crop images.
    """
    fd, tmp_name = _create_temp(path)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        _discard(tmp_name)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write with any library; it is renamed onto ``path`` on success."""
    fd, tmp_name = _create_temp(path)
    os.close(fd)
    try:
        yield Path(tmp_name)
        if os.path.isfile(tmp_name):  # a writer that replaced the file (unlink + create) got its own mode already
            apply_umask(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        _discard(tmp_name)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (as ``atomic_writer``, on the bare descriptor: ~0.1 ms less per file, which
    the regions stage pays 16-32 times per image) and return the path."""
    fd, tmp_name = _create_temp(path)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:
        _discard(tmp_name)
        raise
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Encode a uint8 (H, W) grey or (H, W, 3) RGB array as PNG and write it atomically."""
    import cv2

    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) array, got {image.dtype} {image.shape}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    return atomic_write_bytes(path, buf.tobytes(), durable=False)


def write_jpeg(path: str | os.PathLike, image: np.ndarray, quality: int = 92, *, bgr: bool = False) -> Path:
    """Encode a uint8 (H, W, 3) RGB array (BGR with ``bgr``: crops of one image converted once) as JPEG and write
    it atomically. A view into a larger image (a crop) is encoded without a copy."""
    return atomic_write_bytes(path, encode_jpeg(image, quality, bgr=bgr, name=path), durable=False)


def encode_jpeg(image: np.ndarray, quality: int = 92, *, bgr: bool = False, name: str | os.PathLike = "image") -> bytes:
    """Return ``write_jpeg``'s bytes of ``image`` (``name``: the file, for the error)."""
    import cv2

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}")
    ok, buf = cv2.imencode(".jpg", image if bgr else cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"JPEG encoding failed for {name}")
    return buf.tobytes()


def write_new_file(path: str | os.PathLike, data: bytes) -> None:
    """Create ``path``, which must not exist, and write ``data`` to it: for files in a staging folder of
    ``atomic_directory``, which makes them all appear at once (no temporary name and rename per file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _renameat2():
    """Return libc's ``renameat2``, or None where there is none (not Linux, an old C library). Looked up once per
    process: ``ctypes.util.find_library`` runs ``ldconfig -p`` in a subprocess, a fork of this process each time
    (~1.5 ms of this process's CPU and the subprocess's own per call: per image when regions are recomputed)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return getattr(libc, "renameat2", None)


def exchange_directories(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two folders with Linux ``renameat2(RENAME_EXCHANGE)``; return False where unsupported."""
    import ctypes

    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise OSError(err, os.strerror(err), str(a))
    return True


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``path`` whole, in one atomic exchange where the kernel
    can (a reader sees the old folder or the new one, never a missing or half-written one), else by two renames.
    The old content is removed afterwards."""
    import shutil
    import uuid

    target = Path(path)
    staging = Path(_create_temp_directory(target))
    try:
        yield staging
        if not target.exists():
            staging.rename(target)
        elif exchange_directories(staging, target):
            shutil.rmtree(staging, ignore_errors=True)  # it now holds the old content
        else:
            retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def storage_error_from(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """Return a one-line OSError (ENOSPC) when ``exc`` is a disk-full failure while writing ``path``, else None.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:...] ... file write
    failed`` (or ``unexpected pos``), without an errno; this names the disk, the file and the space left instead.
    """
    if isinstance(exc, OSError) and exc.errno not in STORAGE_ERRNOS:
        return None
    text = str(exc)
    if not isinstance(exc, OSError) and not any(
        marker in text
        for marker in ("inline_container", "file write failed", "No space left", "unexpected pos", "StorageFull",
                       "Disk quota exceeded")
    ):
        return None
    import shutil

    target = Path(path)
    folder = next((p for p in (target.parent, *target.parents) if p.exists()), Path("/"))
    try:
        usage = shutil.disk_usage(folder)
        space = f"{usage.free / 2**20:.0f} MiB free of {usage.total / 2**30:.1f} GiB"
    except OSError:
        space = "free space unknown"
    error_number = exc.errno if isinstance(exc, OSError) and exc.errno else errno.ENOSPC
    reason = "disk full" if error_number in (errno.ENOSPC, errno.EDQUOT) else os.strerror(error_number).lower()
    return OSError(error_number, f"{reason} while writing {target} (on the disk of {folder}: {space}); free space "
                                 f"there or point the output folder at a larger disk")


def raise_if_storage_error(exc: BaseException) -> None:
    """Re-raise ``exc`` when the output storage itself failed (disk full, quota, read-only, file too large).

    Stages record a bad *image* as a per-item failure that is cached; a failing *disk* must instead fail the chunk,
    so that nothing is cached and the next run retries once space is freed.
    """
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        raise exc

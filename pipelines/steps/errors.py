"""What a failure is about: one item (recorded as its failed row) or the environment (never recorded).

An undecodable image or an over-long caption is a fact about that item: it is stored as the item's failed row and
the run goes on. A model that cannot load, CUDA out of memory, a lost network, a full disk or a worker pool that
cannot start says nothing about the item being processed: recording it would cache the failure, and "fix the cause
and run the same command again" would not work. Such a failure fails the chunk and the stage, and records nothing.
"""

from __future__ import annotations

import errno
from pathlib import Path

from storage.atomic import STORAGE_ERRNOS, storage_error_from

REASON_CHARS = 300
# Exceptions raised by the network stacks the model loaders use, matched by name (no import of httpx/requests here).
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError", "ProxyError",
                   "SSLError", "HfHubHTTPError", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
                   "RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}
_CUDA_MARKERS = ("CUDA error", "CUDA out of memory", "CUDA driver", "cuDNN error", "NCCL error", "no CUDA GPUs",
                 "CUBLAS_STATUS", "device-side assert")


class EnvironmentFailure(RuntimeError):
    """Something the run needs is broken (a model file, the GPU, the network, the disk): not a fact about an item."""


def one_line(exc: BaseException) -> str:
    """Return ``Type: message`` on one line, at most ``REASON_CHARS`` characters."""
    text = " ".join(str(exc).split())
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:REASON_CHARS]


def is_storage_error(exc: BaseException, out_root: Path) -> bool:
    """True when the output storage itself failed: disk full, quota, read-only, or no permission inside OUT."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in STORAGE_ERRNOS:
        return True
    if exc.errno in (errno.EACCES, errno.EPERM) and exc.filename:
        path = Path(str(exc.filename)).resolve()
        return path == out_root or out_root in path.parents
    return False


def is_environment_error(exc: BaseException, out_root: Path) -> bool:
    """True when ``exc`` is about the environment, not the item being processed (see the module docstring)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # a wrapped cause counts too
        seen.add(id(current))
        if isinstance(current, EnvironmentFailure) or is_storage_error(current, out_root):
            return True
        name = type(current).__name__
        lineage = {cls.__name__ for cls in type(current).__mro__}  # CorruptCheckpointError is a ModelLoadError
        if name in _NETWORK_ERRORS or lineage & {"OutOfMemoryError", "ModelLoadError", "DeviceUnavailableError"}:
            return True
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if isinstance(current, RuntimeError) and any(m in str(current) for m in _CUDA_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def describe_failure(exc: BaseException, out_root: Path | None = None) -> str:
    """Return one line for a failure that stops a stage: a full disk names the file (else the output folder), the
    disk and its free space."""
    found: BaseException | None = exc
    while found is not None:
        if isinstance(found, OSError) and found.errno in (errno.ENOSPC, errno.EDQUOT):
            described = storage_error_from(found, found.filename or out_root or ".")
            if described is not None:
                return one_line(described)
        found = found.__cause__ or found.__context__
    return one_line(exc)

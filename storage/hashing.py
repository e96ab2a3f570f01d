"""Content addressing: stable hashes of files and of JSON-able parameter sets."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    """Return the hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def content_key(*parts: Any, length: int = 16) -> str:
    """Return a short hex key for JSON-serialisable ``parts`` (dict keys sorted, so order-independent)."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]

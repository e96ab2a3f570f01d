"""Content addressing: stable hashes of files and of JSON-able parameter sets."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

_CHUNK = 1 << 20
# One encoder for every key (json.dumps builds one per call with these options).
_KEY_ENCODER = json.JSONEncoder(sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)


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
    payload = _KEY_ENCODER.encode(parts)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def table_digest(table) -> str:
    """Return a hex key (32 chars) of an Arrow table's values: its record batches as Arrow IPC messages (the same
    values in the same order give the same bytes), without building a Python object per value."""
    h = hashlib.sha256(f"{table.num_rows}:{table.schema.names}".encode())
    for batch in table.combine_chunks().to_batches():
        h.update(batch.serialize())
    return h.hexdigest()[:32]

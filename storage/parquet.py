"""Parquet I/O: atomic part writes and reading a folder of parts as one table."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_path

log = logging.getLogger("structxlip.storage")
_DERIVED_KEY = b"structxlip.derived"


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` (zstd) via a temporary file and rename; return the path."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def read_part(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file. ``ParquetFile`` rather than ``pq.read_table``: the latter imports ``pyarrow.dataset``
    and with it pandas (~1.4 s), which a fully cached run would otherwise pay just to read its store."""
    with pq.ParquetFile(path) as handle:
        return handle.read(columns=columns)


def parquet_parts(folder: str | os.PathLike) -> list[Path]:
    """Return the complete Parquet parts in ``folder`` (temporary files are ignored), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


def read_parquet_dir(
    folder: str | os.PathLike, columns: list[str] | None = None, schema: pa.Schema | None = None
) -> pa.Table:
    """Read every part in ``folder`` into one table (empty table with ``schema`` when there are none)."""
    parts = parquet_parts(folder)
    if not parts:
        if schema is None:
            return pa.table({})
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    return pa.concat_tables([read_part(p, columns=columns) for p in parts], promote_options="permissive")


def read_derived(path: str | os.PathLike, key: str, columns: list[str]) -> tuple[pa.Table, dict] | None:
    """Return ``(table, notes)`` kept at ``path`` by ``write_derived`` under ``key``; None when absent, kept under
    another key, or unreadable: the caller derives the table again (and keeps it)."""
    try:
        with pq.ParquetFile(path) as handle:
            kept = json.loads((handle.schema_arrow.metadata or {}).get(_DERIVED_KEY, b"{}"))
            if kept.get("key") != key:
                return None
            table = handle.read(columns=columns)
        return table.replace_schema_metadata(None), kept.get("notes", {})
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as exc:
        log.debug("%s not reused: %s", path, exc)
        return None


def write_derived(path: str | os.PathLike, key: str, table: pa.Table, notes: dict | None = None) -> None:
    """Keep ``table`` (derived from inputs that ``key`` names) and JSON-able ``notes`` at ``path`` for the next run,
    atomically; a folder that cannot take it only loses the shortcut."""
    kept = json.dumps({"key": key, "notes": notes or {}}, ensure_ascii=False).encode("utf-8")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(table.replace_schema_metadata({_DERIVED_KEY: kept}), path)
    except OSError as exc:
        log.debug("%s not kept: %s", path, exc)

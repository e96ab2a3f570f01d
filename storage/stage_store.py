"""Per-stage result parts: ``OUT/stages/<stage>/<stage_key>/part-<key>.parquet``, one part per processed chunk.

An item (image, or image + caption for text stages) is *done* for a stage when its ``item_key`` appears in a part.
Parts are written atomically, so a run killed mid-stage leaves only complete parts and resumes from them.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.hashing import content_key
from storage.layout import OutputLayout
from storage.parquet import parquet_parts, write_parquet_atomic

ITEM_KEY = "item_key"


class StageStore:
    """The Parquet parts of one stage under one stage key; rows carry an ``item_key`` column."""

    def __init__(self, layout: OutputLayout, stage: str, stage_key: str, schema: pa.Schema | None = None):
        if schema is not None and ITEM_KEY not in schema.names:
            raise ValueError(f"expected a schema with an {ITEM_KEY!r} column for stage {stage}, got {schema.names}")
        self.layout = layout
        self.stage = stage
        self.stage_key = stage_key
        self.schema = schema

    def __repr__(self) -> str:
        return f"StageStore({self.stage!r}, {self.stage_key!r}, {self.folder})"

    @property
    def folder(self) -> Path:
        return self.layout.stage_dir(self.stage, self.stage_key)

    def parts(self) -> list[Path]:
        """Return the complete parts, oldest first (modification time, then name), so later parts override."""
        parts = parquet_parts(self.folder)
        return sorted(parts, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def done_keys(self) -> set[str]:
        """Return the item keys present in any part (reads only the ``item_key`` column)."""
        done: set[str] = set()
        for part in self.parts():
            done.update(pq.read_table(part, columns=[ITEM_KEY]).column(ITEM_KEY).to_pylist())
        return done

    def table(self, rows: list[dict]) -> pa.Table:
        """Return ``rows`` as a table of this store's schema (missing columns null; inferred when no schema)."""
        for row in rows:
            if not row.get(ITEM_KEY):
                raise ValueError(f"expected every {self.stage} row to have an {ITEM_KEY}, got keys {sorted(row)}")
        if self.schema is None:
            return pa.Table.from_pylist(rows)
        names = self.schema.names
        return pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows], schema=self.schema)

    def write_part(self, rows: list[dict]) -> Path:
        """Write ``rows`` as one part named by the content key of their item keys; return its path."""
        if not rows:
            raise ValueError(f"expected at least one row to write for stage {self.stage}, got none")
        table = self.table(rows)
        part_key = content_key(sorted(table.column(ITEM_KEY).to_pylist()))
        return write_parquet_atomic(table, self.layout.stage_part(self.stage, self.stage_key, part_key))

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Return every stored row once per item key (the newest part wins), in part order."""
        if columns is not None and ITEM_KEY not in columns:
            columns = [ITEM_KEY, *columns]
        parts = self.parts()
        if not parts:
            if self.schema is not None:
                empty = self.schema.empty_table()
                return empty if columns is None else empty.select(columns)
            return pa.table({ITEM_KEY: pa.array([], pa.string())})
        tables = [pq.read_table(p, columns=columns) for p in parts]
        if self.schema is not None:
            # Parts written by this code share the schema; cast anyway so a part from an older writer concatenates.
            target = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
            tables = [t.select(target.names).cast(target) for t in tables]
            table = pa.concat_tables(tables)
        else:
            table = pa.concat_tables(tables, promote_options="permissive")
        last: dict[str, int] = {}
        for index, key in enumerate(table.column(ITEM_KEY).to_pylist()):
            last[key] = index
        if len(last) == table.num_rows:
            return table
        return table.take(pa.array(sorted(last.values()), pa.int64()))

    def remove_superseded(self, keep: list[Path]) -> int:
        """Delete parts (other than ``keep``) all of whose item keys are in ``keep``; return how many were removed."""
        keep_paths = {Path(p).resolve() for p in keep}
        covered: set[str] = set()
        for part in keep_paths:
            covered.update(pq.read_table(part, columns=[ITEM_KEY]).column(ITEM_KEY).to_pylist())
        removed = 0
        for part in self.parts():
            if part.resolve() in keep_paths:
                continue
            keys = set(pq.read_table(part, columns=[ITEM_KEY]).column(ITEM_KEY).to_pylist())
            if keys <= covered:
                part.unlink(missing_ok=True)
                removed += 1
        return removed

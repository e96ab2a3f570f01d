"""The one record of done work: ``OUT/stages/<stage>/<stage_key>/part-<key>.parquet``, one part per processed chunk.

An item (an image, an image + caption for text stages, the whole manifest for train/evaluate) is *done* for a stage
when its ``item_key`` is in a readable part **and** every output file its row lists (``outputs``: path relative to
OUT and size in bytes) is still there with that size. Parts are written atomically, so a run killed mid-stage leaves
only complete parts and resumes from them. A part that cannot be read is moved aside (``.corrupt``) with one warning,
and its items are simply pending again; an item whose output file is missing or truncated is pending again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from storage.hashing import content_key
from storage.layout import OutputLayout
from storage.parquet import parquet_parts, read_part, write_parquet_atomic

ITEM_KEY = "item_key"
OUTPUTS = "outputs"
OUTPUT_TYPE = pa.list_(pa.struct([pa.field("path", pa.string()), pa.field("size", pa.int64())]))
log = logging.getLogger("structxlip.store")


def output_records(root: Path, paths: list[str]) -> list[dict]:
    """Return ``[{path, size}]`` for output files given relative to ``root`` (raises FileNotFoundError if one is gone)."""
    return [{"path": p, "size": os.stat(root / p).st_size} for p in paths]


@dataclass
class StoredRows:
    """What a stage store holds now: rows by item key (newest part wins), and the items that must be recomputed."""

    rows: dict[str, dict]
    invalid: dict[str, str] = field(default_factory=dict)  # item key -> why its recorded outputs cannot be reused
    quarantined: list[Path] = field(default_factory=list)

    def done(self) -> dict[str, dict]:
        """Rows whose outputs are intact: the items that need no work."""
        return {k: r for k, r in self.rows.items() if k not in self.invalid}


class StageStore:
    """The Parquet parts of one stage under one stage key; rows carry ``item_key`` (and ``outputs``) columns."""

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
        return sorted(parquet_parts(self.folder), key=lambda p: (p.stat().st_mtime_ns, p.name))

    # ---- reading ----------------------------------------------------------------------------------------------
    def _read_part(self, part: Path, columns: list[str] | None) -> pa.Table | None:
        """Return one part as a table of this store's schema, or None after moving an unreadable part aside."""
        try:
            table = read_part(part, columns=columns)
            if self.schema is not None:
                names = columns or self.schema.names
                target = pa.schema([self.schema.field(n) for n in names])
                present = set(table.column_names)
                for name in names:  # a part from an older writer may lack a newer column: typed nulls
                    if name not in present:
                        table = table.append_column(target.field(name), pa.nulls(table.num_rows, target.field(name).type))
                table = table.select(target.names).cast(target)
            return table
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, (pa.ArrowException,)) and exc.errno is not None:
                raise  # a disk error is not a corrupt part
            aside = part.with_name(part.name + ".corrupt")
            try:
                os.replace(part, aside)
            except FileNotFoundError:
                return None
            log.warning("%s: unreadable stage part %s moved aside to %s (%s); its items will be recomputed",
                        self.stage, part, aside.name, " ".join(str(exc).split())[:160])
            self._quarantined.append(aside)
            return None

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Return every stored row once per item key (the newest part wins), in part order."""
        if columns is not None and ITEM_KEY not in columns:
            columns = [ITEM_KEY, *columns]
        self._quarantined: list[Path] = []
        tables = [t for t in (self._read_part(p, columns) for p in self.parts()) if t is not None]
        if not tables:
            if self.schema is not None:
                empty = self.schema.empty_table()
                return empty if columns is None else empty.select(columns)
            return pa.table({ITEM_KEY: pa.array([], pa.string())})
        table = pa.concat_tables(tables, promote_options="none" if self.schema is not None else "permissive")
        last = {key: index for index, key in enumerate(table.column(ITEM_KEY).to_pylist())}
        if len(last) == table.num_rows:
            return table
        return table.take(pa.array(sorted(last.values()), pa.int64()))

    def stored(self, *, verify: bool = True) -> StoredRows:
        """Return the stored rows by item key; with ``verify``, flag rows whose output files are missing or changed."""
        table = self.read()
        rows = {r[ITEM_KEY]: r for r in table.to_pylist()}
        result = StoredRows(rows=rows, quarantined=list(self._quarantined))
        if verify and table.num_rows and OUTPUTS in table.column_names:
            root = str(self.layout.root) + os.sep  # string joins: a Path per file costs more than its stat
            for key, row in rows.items():
                for output in row.get(OUTPUTS) or ():
                    try:
                        size = os.stat(root + output["path"]).st_size
                    except OSError:
                        result.invalid[key] = f"{output['path']} is missing"
                        break
                    if size != output["size"]:
                        result.invalid[key] = f"{output['path']} has {size} bytes, {output['size']} were written"
                        break
        return result

    # ---- writing ----------------------------------------------------------------------------------------------
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

    def remove_superseded(self, keep: list[Path]) -> int:
        """Delete parts (other than ``keep``) all of whose item keys are in ``keep``; return how many were removed."""
        keep_paths = {Path(p).resolve() for p in keep}
        covered = {key for part in keep_paths
                   for key in read_part(part, columns=[ITEM_KEY]).column(ITEM_KEY).to_pylist()}
        removed = 0
        for part in self.parts():
            if part.resolve() in keep_paths:
                continue
            try:
                keys = set(read_part(part, columns=[ITEM_KEY]).column(ITEM_KEY).to_pylist())
            except (pa.ArrowException, OSError):
                continue
            if keys <= covered:
                part.unlink(missing_ok=True)
                removed += 1
        return removed

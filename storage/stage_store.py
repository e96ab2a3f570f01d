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
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.hashing import content_key, keys_distinct
from storage.layout import OutputLayout
from storage.parquet import parquet_parts, read_part, write_parquet_atomic

# A stage run writes one part per chunk (at most a few hundred rows); a million-image store would be thousands of
# parts, each costing ~1 ms to open on every run. Once COMPACT_AFTER parts of fewer than COMPACT_ROWS rows exist, they
# are merged into parts of COMPACT_ROWS rows (``StageStore.compact``): a store holds at most N / COMPACT_ROWS + a few
# dozen parts, and an incremental run merges only the small ones.
COMPACT_ROWS = 16_384
COMPACT_AFTER = 16
ITEM_KEY = "item_key"
OUTPUTS = "outputs"
OUTPUT_TYPE = pa.list_(pa.struct([pa.field("path", pa.string()), pa.field("size", pa.int64())]))
log = logging.getLogger("structxlip.store")


def output_records(root: Path, paths: list[str]) -> list[dict]:
    """Return ``[{path, size}]`` for output files given relative to ``root`` (raises FileNotFoundError if one is gone)."""
    return [{"path": p, "size": os.stat(root / p).st_size} for p in paths]


@dataclass
class StoredRows:
    """What a stage store holds now: the newest row of each item key (without ``outputs``, which were checked), and
    the items that must be recomputed. Column-wise (``table``, ``done_table``); ``rows`` and ``done`` are the same
    rows as dicts, built only when asked for."""

    table: pa.Table
    invalid: dict[str, str] = field(default_factory=dict)  # item key -> why its recorded outputs cannot be reused
    quarantined: list[Path] = field(default_factory=list)

    @cached_property
    def rows(self) -> dict[str, dict]:
        return {row[ITEM_KEY]: row for row in self.table.to_pylist()}

    def done(self) -> dict[str, dict]:
        """Rows whose outputs are intact: the items that need no work."""
        return {k: r for k, r in self.rows.items() if k not in self.invalid}

    def done_table(self) -> pa.Table:
        """``table`` less the rows whose outputs are not intact."""
        if not self.invalid:
            return self.table
        return self.table.filter(pc.invert(pc.is_in(self.table.column(ITEM_KEY),
                                                    value_set=pa.array(list(self.invalid), pa.string()))))


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
        return self._newest(tables, columns)

    def _newest(self, tables: list[pa.Table], columns: list[str] | None) -> pa.Table:
        """Concatenate part tables (oldest first) keeping the last row of each item key, column-wise."""
        if not tables:
            if self.schema is not None:
                empty = self.schema.empty_table()
                return empty.select([n for n in (columns or self.schema.names) if n in empty.column_names])
            return pa.table({ITEM_KEY: pa.array([], pa.string())})
        table = pa.concat_tables(tables, promote_options="none" if self.schema is not None else "permissive")
        keys = table.column(ITEM_KEY)
        if keys_distinct(keys) or pc.count_distinct(keys).as_py() == table.num_rows:
            return table
        order = pa.table({ITEM_KEY: keys, "_row": pa.array(range(table.num_rows), pa.int64())})
        last = order.group_by(ITEM_KEY, use_threads=False).aggregate([("_row", "max")]).column("_row_max")
        return table.take(pc.take(last, pc.sort_indices(last)))

    def stored(self, *, verify: bool = True, columns: list[str] | None = None,
               where: tuple[str, pa.Array] | None = None, checked: dict | None = None) -> StoredRows:
        """Return the newest stored row of each item key; with ``verify``, flag rows whose output files are missing or
        changed. ``columns``: the columns to keep (all by default); the ``outputs`` column is checked part by part and
        never kept, so memory is that of the kept columns however many files the rows list. ``where=(column,
        values)``: only the rows whose ``column`` is one of ``values``, chosen in each part before its files are
        checked (a gallery of 20 images in a store of a million checks 20 images' files). ``checked``: the verdicts
        of parts already checked, kept in it by the part's path and stat fields (a part is never rewritten in
        place), so that the reads of one run check each part's files once (``Pipeline`` keeps one per run)."""
        self._quarantined = []
        keep = None if columns is None else [ITEM_KEY, *(c for c in columns if c not in (ITEM_KEY, OUTPUTS))]
        has_outputs = self.schema is None or OUTPUTS in self.schema.names
        read = None if keep is None or self.schema is None else keep + ([OUTPUTS] if verify and has_outputs else [])
        tables: list[pa.Table] = []
        invalid: dict[str, str] = {}
        for part in self.parts():
            table = self._read_part(part, read)
            if table is None:
                continue
            if where is not None:
                table = table.filter(pc.is_in(table.column(where[0]), value_set=where[1]))
            if invalid:  # a newer part's row replaces an older one's verdict
                for key in table.column(ITEM_KEY).to_pylist():
                    invalid.pop(key, None)
            if OUTPUTS in table.column_names:
                if verify:
                    invalid.update(self._checked(part, table, checked, whole=where is None))
                table = table.drop_columns([OUTPUTS])
            if keep is not None and self.schema is None:
                table = table.select([c for c in keep if c in table.column_names])
            tables.append(table)
        return StoredRows(table=self._newest(tables, keep), invalid=invalid, quarantined=list(self._quarantined))

    def _checked(self, part: Path, table: pa.Table, checked: dict | None, *, whole: bool) -> dict[str, str]:
        """``_unverified(table)``: ``table`` is ``part``'s rows (``whole``) or some of them. With ``checked``, a whole
        part's verdict is kept there, and some rows of a part already checked are answered from it."""
        if checked is None:
            return self._unverified(table)
        try:
            stat = part.stat()
        except OSError:  # gone since it was read: its rows are checked, not kept
            return self._unverified(table)
        key = (str(part), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key in checked:
            if whole:
                return checked[key]
            return {k: why for k in table.column(ITEM_KEY).to_pylist() if (why := checked[key].get(k)) is not None}
        verdict = self._unverified(table)
        if whole:
            checked[key] = verdict
        return verdict

    def _unverified(self, table: pa.Table) -> dict[str, str]:
        """Item key -> why, for the rows of one part whose listed output files are missing or of another size."""
        outputs = table.column(OUTPUTS).combine_chunks()
        flat = pc.list_flatten(outputs)
        if not len(flat):
            return {}
        root = str(self.layout.root) + os.sep
        # One stat per file in a bare loop; the paths joined and the sizes compared column-wise (a catalogue of a
        # million images checks a few million files on every run).
        found = np.array(_sizes(pc.binary_join_element_wise(root, flat.field("path"), "").to_pylist()), np.int64)
        written = flat.field("size")
        differ = np.flatnonzero(found != written.fill_null(-2).to_numpy(zero_copy_only=False))
        invalid: dict[str, str] = {}
        if not differ.size:
            return invalid
        rows = pc.list_parent_indices(outputs).to_numpy(zero_copy_only=False)
        keys = table.column(ITEM_KEY)
        for at in differ.tolist():
            key = keys[int(rows[at])].as_py()
            if key in invalid:  # a row's first bad file names it
                continue
            path, size = flat.field("path")[at].as_py(), written[at].as_py()
            invalid[key] = f"{path} is missing" if found[at] < 0 else f"{path} has {found[at]} bytes, {size} were written"
        return invalid

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
        return self._write_table(self.table(rows))

    def _write_table(self, table: pa.Table) -> Path:
        part_key = content_key(sorted(table.column(ITEM_KEY).to_pylist()))
        return write_parquet_atomic(table, self.layout.stage_part(self.stage, self.stage_key, part_key))

    def compact(self, *, rows_per_part: int = COMPACT_ROWS, after: int = COMPACT_AFTER) -> int:
        """Merge the parts of fewer than ``rows_per_part`` rows into parts of ``rows_per_part`` rows (the last one
        shorter) once there are ``after`` of them; return how many parts were removed. Only each item key's newest
        row is kept. The merged parts are written before the small ones are removed, and they hold exactly the rows
        that won before: a run killed in between reads the same rows."""
        self._quarantined = []
        parts = self.parts()
        keys: list[list[str] | None] = []
        for part in parts:
            table = self._read_part(part, [ITEM_KEY])
            keys.append(None if table is None else table.column(ITEM_KEY).to_pylist())
        small = [n for n, part_keys in enumerate(keys) if part_keys is not None and len(part_keys) < rows_per_part]
        if len(small) < after:
            return 0
        newest: dict[str, tuple[int, int]] = {}
        for n, part_keys in enumerate(keys):
            for row, key in enumerate(part_keys or ()):
                newest[key] = (n, row)
        pending: list[pa.Table] = []
        merged: list[Path] = []
        for n in small:
            table = self._read_part(parts[n], None)
            if table is None:
                continue
            rows = [row for row, key in enumerate(keys[n]) if newest[key] == (n, row)]
            if rows:
                pending.append(table.take(pa.array(rows, pa.int64())))
            while sum(t.num_rows for t in pending) >= rows_per_part:
                whole = pa.concat_tables(pending)
                merged.append(self._write_table(whole.slice(0, rows_per_part)))
                pending = [whole.slice(rows_per_part)]
        if sum(t.num_rows for t in pending):
            merged.append(self._write_table(pa.concat_tables(pending)))
        kept = {path.name for path in merged}
        removed = 0
        for n in small:
            if parts[n].name not in kept:
                parts[n].unlink(missing_ok=True)
                removed += 1
        return removed

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


def _sizes(paths: list[str]) -> list[int]:
    """The size of each file, -1 where it cannot be stat'ed (missing, or a folder on the way is gone)."""
    sizes: list[int] = []
    append, stat = sizes.append, os.stat
    for path in paths:
        try:
            append(stat(path).st_size)
        except OSError:
            append(-1)
    return sizes

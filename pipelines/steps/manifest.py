"""The manifest stage: join every stage's outputs into ``storage.manifest.MANIFEST_SCHEMA`` rows and write them
incrementally to ``OUT/manifest/``.

Rules (one row per distinct image):
- A file that failed ingest gets a row with ``status="failed"`` and ``error="ingest: ..."``; its ``image_id`` is the
  SHA-256 of its bytes when they were readable, else a content key of its path.
- Files with identical bytes (same ``image_id``) become ONE row, for the first path in sorted order (``image_id``
  stays unique, which the trainer and joins rely on); the other paths are kept in its ``duplicate_paths`` and
  reported in ``ManifestRows.duplicates`` as ``{"source_path", "duplicate_of"}`` for the run summary.
- An image's captions are the union over its files (sorted path order, each file's captions in file order, a text
  once): the first is ``caption``, the others ``extra_captions`` (with the filter stage's filtered forms).
- Every stage the manifest depends on joins its result for the image in pipeline order (``stage.join_manifest``): it
  fills the row's columns it owns and says whether the image failed there. The first such failure makes the row
  ``failed`` with ``"<stage>: <one-line error>"`` (``"<stage>: not computed"`` when the stage has no result yet; an
  image without a caption reads ``"no caption: ..."``) and is never trained on.
- ``split`` (ok rows only) is a deterministic function of the image id and the ratios (``assign_split``).

A run that changes a few images rebuilds only their rows: ``row_signatures`` names each row by what it is built from,
the signatures of the manifest on disk are kept beside it (``OutputLayout.manifest_index``), and ``write_manifest``
with ``replace`` rewrites only the parts holding rows whose signature changed, column-wise (the other rows of such a
part are carried as Arrow, never as Python rows).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

from storage.hashing import content_key, distinct_key_order, table_digest
from storage.layout import IMAGE_ID_LENGTH, OutputLayout
from storage.manifest import MANIFEST_COLUMNS, MANIFEST_SCHEMA, STATUS_FAILED, STATUS_OK, manifest_table
from storage.atomic import atomic_directory
from storage.parquet import parquet_parts, read_part, write_parquet_atomic

VERSION = "2"
SIGNATURE_VERSION = "1"  # bump when row_signatures reads other inputs
SPLIT_ORDER = ("train", "val", "test")
MAX_ROWS_PER_PART = 50_000


def assign_split(image_id: str, ratios: dict[str, float]) -> str:
    """Return the split (``train``/``val``/``test``) of an image: a uniform hash of its id placed on the cumulative ratios."""
    names = [n for n in SPLIT_ORDER if n in ratios] + sorted(n for n in ratios if n not in SPLIT_ORDER)
    total = sum(ratios[n] for n in names)
    if not names or total <= 0 or any(ratios[n] < 0 for n in names):
        raise ValueError(f"expected non-negative split ratios with a positive sum, got {ratios}")
    # Re-hash so ids that are not themselves uniform hashes still spread evenly; 52 bits fit a float exactly.
    position = int(hashlib.sha256(f"split:{image_id}".encode()).hexdigest()[:13], 16) / float(1 << 52)
    cumulative = 0.0
    for name in names:
        cumulative += ratios[name] / total
        if position < cumulative:
            return name
    return next(n for n in reversed(names) if ratios[n] > 0)


def failed_image_id(source_path: str) -> str:
    """Return the image id of a file whose bytes could not be read: a content key of its path (32 hex chars)."""
    return content_key("unreadable", str(source_path), length=IMAGE_ID_LENGTH)


@dataclass
class ManifestRows:
    """The manifest's rows (one per distinct image, sorted by source path) and the duplicate files left out."""

    rows: list[dict]
    duplicates: list[dict] = field(default_factory=list)


def one_line_error(text: object) -> str:
    """A stored error as one line of a manifest row's ``error``."""
    return " ".join(str(text or "unknown error").split())


class ManifestJoin(Protocol):
    """What the manifest needs of a stage it depends on (``pipelines.engine.stages.Stage`` provides it)."""

    manifest_fields: tuple[pa.Field, ...]

    def join_manifest(self, row: dict, result: dict | None, note: str | None) -> str | None: ...


def build_manifest_rows(
    *,
    ingest: list[dict],
    captions_index: dict[str, tuple],
    joins: list[tuple[ManifestJoin, dict[str, dict]]],
    split_ratios: dict[str, float],
) -> ManifestRows:
    """Return the joined manifest rows.

    ``ingest``: current ingest records ``{source_path, image_id, status, error, width, height}``; ``captions_index``:
    absolute source path -> ``(caption, caption_source, note)`` as read from the folder; ``joins``: in pipeline order,
    each stage the manifest depends on with its results (image id -> its record for the image's current caption;
    absent = not computed). The stage fills the row from its record and returns the image's error, if any.
    """
    extra_columns = [f.name for stage, _ in joins for f in stage.manifest_fields]
    rows: list[dict] = []
    duplicates: list[dict] = []
    groups: dict[str, list[dict]] = {}  # image id -> its files' records, in sorted path order
    for record in sorted(ingest, key=lambda r: str(r["source_path"])):
        groups.setdefault(record.get("image_id") or failed_image_id(str(record["source_path"])), []).append(record)
    for image_id, group in sorted(groups.items(), key=lambda kv: str(kv[1][0]["source_path"])):
        record, source_path = group[0], str(group[0]["source_path"])
        others = [str(r["source_path"]) for r in group[1:]]
        duplicates += [{"source_path": p, "duplicate_of": source_path, "image_id": image_id} for p in others]
        all_captions, caption_source, note = _union_captions([source_path, *others], captions_index)
        caption = all_captions[0] if all_captions else None
        row = dict.fromkeys([*MANIFEST_COLUMNS, *extra_columns])
        row |= {
            "image_id": image_id,
            "source_path": source_path,
            "status": STATUS_OK,
            "error": None,
            "width": record.get("width"),
            "height": record.get("height"),
            "caption": caption,
            "caption_source": caption_source,
            "segments": [],
            "hard_negatives": [],
            "extra_captions": [{"caption": text, "filtered_caption": None, "hard_negatives": []}
                               for text in all_captions[1:]] or None,
            "duplicate_paths": others or None,
        }
        error = None if record.get("status") == STATUS_OK else f"ingest: {one_line_error(record.get('error'))}"
        for stage, results in joins:
            problem = stage.join_manifest(row, results.get(image_id), note)
            error = error or problem
        if error is None:
            row["split"] = assign_split(image_id, split_ratios)
        else:
            row["status"] = STATUS_FAILED
            row["error"] = error
        rows.append(row)
    return ManifestRows(rows=rows, duplicates=duplicates)


def _union_captions(paths: list[str], captions_index: dict[str, tuple]) -> tuple[list[str], str | None, str | None]:
    """Return (every caption over ``paths`` in order, a text once; source and note of the first path with one)."""
    captions: list[str] = []
    source = note = None
    for number, path in enumerate(paths):
        caption, caption_source, path_note, extras = (tuple(captions_index.get(path) or ()) + (None,) * 4)[:4]
        own = ([caption] if caption else []) + list(extras or ())
        if number == 0 or (own and not captions):
            source, note = caption_source, path_note
        captions += [text for text in own if text not in captions]
    return captions, source, note


RESULT_COLUMNS = ("image_id", "item_key", "status", "error")  # what a signature reads of a stage's current result


def row_signatures(files: pa.Table, joined: list[pa.Table], salt: str) -> pa.Table:
    """Return ``image_id, signature`` of every manifest row (by image id): a key of everything
    ``build_manifest_rows`` builds the row from, so that a row whose signature is unchanged is the same row.

    ``files``: one row per ingested file: ``source_path``, ``RESULT_COLUMNS`` and ``captions`` (the file's captions as
    the folder gives them: caption, source, note and further captions in one string); ``joined``: in pipeline order,
    the current results of each stage the manifest joins (``RESULT_COLUMNS``; a stage's other values follow from its
    item key under its stage key); ``salt``: what every row follows from (the manifest's stage key, split ratios,
    columns). Column-wise: one string per image is joined in Arrow and hashed; no row is built.
    """
    ids = files.column("image_id")
    if ids.null_count:  # a file read without bytes: its row is named by its path
        paths = files.column("source_path").to_pylist()
        ids = pa.array([image_id or failed_image_id(path) for image_id, path in zip(ids.to_pylist(), paths)],
                       pa.string())
    texts = pa.table({"image_id": ids, "text": _joined(files, ("source_path", *RESULT_COLUMNS[1:], "captions")),
                      "source_path": files.column("source_path")})
    images = _one_per_image(texts, "\x1d", ("source_path",))  # an image's files in sorted path order
    order = distinct_key_order(images.column("image_id"))  # by image id (hex ids: sorted as numbers)
    images = images.sort_by("image_id") if order is None else images.take(order)
    parts = [pa.scalar(salt, pa.string()), images.column("text")]
    for table in joined:
        results = _one_per_image(pa.table({"image_id": table.column("image_id"),
                                           "text": _joined(table, RESULT_COLUMNS[1:])}), "\x1e", ("text",))
        at = pc.index_in(images.column("image_id"), value_set=results.column("image_id"))
        parts.append(pc.fill_null(pc.take(results.column("text"), at), "-"))  # "-": not computed
    whole = pc.binary_join_element_wise(*parts, "\x1d").to_pylist()
    signatures = [hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest() for text in whole]
    return pa.table({"image_id": images.column("image_id"), "signature": pa.array(signatures, pa.string())})


def _joined(table: pa.Table, columns: tuple[str, ...]) -> pa.ChunkedArray:
    """The values of ``columns`` of each row joined into one string (null as "\x00")."""
    return pc.binary_join_element_wise(*(table.column(c).cast(pa.string()) for c in columns), "\x1f",
                                       null_handling="replace", null_replacement="\x00")


def _one_per_image(table: pa.Table, separator: str, order: tuple[str, ...] = ()) -> pa.Table:
    """``image_id, text`` with one row per image id: the texts of an image's rows joined in their order (after sorting
    by ``order``, when given)."""
    if pc.count_distinct(table.column("image_id")).as_py() != table.num_rows:
        if order:
            table = table.sort_by([(c, "ascending") for c in order])
        grouped = table.group_by("image_id", use_threads=False).aggregate([("text", "list")])
        return pa.table({"image_id": grouped.column("image_id"),
                         "text": pc.binary_join(grouped.column("text_list"), separator)})
    return table.select(["image_id", "text"])


def manifest_digest(folder: str | os.PathLike) -> str | None:
    """Content key of the manifest in ``folder`` (its parts are named by the content of their rows: their names and
    sizes say what it holds); None without a manifest. The train and evaluate stages' item, and the key the
    manifest's row signatures are kept under (``OutputLayout.manifest_index``)."""
    try:
        parts = [(part.name, part.stat().st_size) for part in parquet_parts(folder)]
    except FileNotFoundError:  # a part removed while listed: a manifest being replaced
        return None
    return content_key("manifest-parts", parts, length=32) if parts else None


def changed_rows(current: pa.Table, kept: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Compare ``row_signatures`` now with those of the manifest on disk; return (image ids whose row must be built:
    new or changed; image ids whose row on disk must go: changed or gone), column-wise."""
    def pairs(table: pa.Table) -> pa.Array:
        return pc.binary_join_element_wise(table.column("image_id"), table.column("signature"), ":").combine_chunks()

    now, before = pairs(current), pairs(kept)
    build = current.column("image_id").filter(pc.invert(pc.is_in(now, value_set=before))).combine_chunks()
    drop = kept.column("image_id").filter(pc.invert(pc.is_in(before, value_set=now))).combine_chunks()
    return build, drop


@dataclass
class ManifestWrite:
    """What ``write_manifest`` did: rows newly written, rows kept in untouched parts, parts written and removed."""

    written_rows: int
    kept_rows: int
    written_ids: list[str]
    written_parts: list[Path]
    removed_parts: list[Path]


def write_manifest(layout: OutputLayout, rows: list[dict], *, rewrite: bool = False,
                   schema: pa.Schema = MANIFEST_SCHEMA, replace: pa.Array | None = None) -> ManifestWrite:
    """Make ``OUT/manifest/`` hold exactly ``rows`` once each (``schema``: the manifest's columns, plugins' included),
    rewriting only parts that hold stale or removed rows or other columns (every part with ``rewrite``).

    With ``replace`` (image ids), the manifest on disk is known to be current but for the rows of those images
    (``changed_rows``): they go, ``rows`` (the new and changed ones) are added, and only the parts that held a row of
    ``replace`` or of ``rows`` are rewritten, their other rows carried column-wise.

    The new manifest is assembled in a staging folder (current parts hard-linked, new parts written) that replaces
    ``OUT/manifest/`` in one atomic exchange: readers (DuckDB, pandas, a trainer) and a run killed at any moment see
    the old manifest or the new one, never a mix, a duplicate row or an empty folder.
    """
    new = manifest_table(rows, schema)
    if pc.count_distinct(new.column("image_id")).as_py() != new.num_rows:
        raise ValueError(f"expected one manifest row per image_id, got {new.num_rows} rows for "
                         f"{pc.count_distinct(new.column('image_id')).as_py()} ids")
    if replace is None:
        kept, stale, table = _compare_parts(layout, new, schema, rewrite)
    else:
        kept, stale, table = _replace_in_parts(layout, new, replace, schema, rewrite)
    table = table.sort_by("image_id")
    kept_rows = sum(rows for _, rows in kept)
    written: list[Path] = []
    if table.num_rows or stale or not layout.manifest_dir.is_dir():
        with atomic_directory(layout.manifest_dir) as staging:
            for part, _ in kept:
                _link_or_copy(part, staging / part.name)
            for start in range(0, table.num_rows, MAX_ROWS_PER_PART):
                chunk = table.slice(start, MAX_ROWS_PER_PART)
                name = layout.manifest_part(content_key(VERSION, table_digest(chunk))).name
                write_parquet_atomic(chunk, staging / name)
                written.append(layout.manifest_dir / name)
    return ManifestWrite(
        written_rows=table.num_rows,
        kept_rows=kept_rows,
        written_ids=table.column("image_id").to_pylist(),
        written_parts=written,
        removed_parts=[p for p in stale if p not in written],
    )


def _compare_parts(layout: OutputLayout, new: pa.Table, schema: pa.Schema,
                   rewrite: bool) -> tuple[list[tuple[Path, int]], list[Path], pa.Table]:
    """Sort the parts on disk into kept ones (``(part, rows)``: each of its rows equal to that image's row in ``new``)
    and stale ones; return them and the rows of ``new`` left to write. Row by row: the path of a manifest whose
    signatures are not known (its first run, or parts changed by hand)."""
    wanted = {row["image_id"]: row for row in new.to_pylist()}
    covered: set[str] = set()
    kept: list[tuple[Path, int]] = []
    stale: list[Path] = []
    for part in parquet_parts(layout.manifest_dir):
        try:
            table = read_part(part)
            if table.column_names != schema.names:
                raise ValueError("other columns")
            existing = table.cast(schema).to_pylist()
        except Exception:  # an unreadable or foreign part, or one of other columns, is replaced, never trusted
            stale.append(part)
            continue
        ids = [row["image_id"] for row in existing]
        current = all(wanted.get(r["image_id"]) == r for r in existing) and covered.isdisjoint(ids) and len(set(ids)) == len(ids)
        if current and existing and not rewrite:
            covered.update(ids)
            kept.append((part, len(existing)))
        else:
            stale.append(part)
    if not covered:
        return kept, stale, new
    left = pc.invert(pc.is_in(new.column("image_id"), value_set=pa.array(sorted(covered), pa.string())))
    return kept, stale, new.filter(left)


def _replace_in_parts(layout: OutputLayout, new: pa.Table, replace: pa.Array, schema: pa.Schema,
                      rewrite: bool) -> tuple[list[tuple[Path, int]], list[Path], pa.Table]:
    """Sort the parts on disk into kept ones (``(part, rows)``: none of its rows is of an image in ``replace`` or
    ``new``) and stale ones; return them and the rows to write: ``new`` and the stale parts' other rows, carried
    column-wise. Only the ``image_id`` column of a kept part is read."""
    gone = pa.concat_arrays([replace.cast(pa.string()), new.column("image_id").combine_chunks()])
    kept: list[tuple[Path, int]] = []
    stale: list[Path] = []
    carried: list[pa.Table] = []
    for part in parquet_parts(layout.manifest_dir):
        hit = pc.is_in(read_part(part, columns=["image_id"]).column("image_id"), value_set=gone)
        if rewrite or pc.any(hit).as_py():
            stale.append(part)
            table = read_part(part)
            if table.column_names != schema.names:
                raise ValueError(f"{part}: expected the manifest's columns {schema.names}, got {table.column_names}")
            carried.append(table.filter(pc.invert(hit)).cast(schema))
        else:
            kept.append((part, len(hit)))
    return kept, stale, pa.concat_tables([*carried, new]) if carried else new


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (same bytes, no copy); copy where links are not supported."""
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)

"""The manifest contract: one row per input image (failed ones included), shared by every stage and the trainer.

An image may have several captions: ``caption`` is the first (file order), ``extra_captions`` the others with their
filtered forms; files with identical bytes are one row, the other paths listed in ``duplicate_paths``.

Paths in ``structure_path``, ``scribble_path`` and segment paths are relative to the output folder; ``source_path``
is the absolute path of the input image.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from storage.layout import OutputLayout
from storage.parquet import read_parquet_dir

STATUS_OK = "ok"
STATUS_FAILED = "failed"

SPLITS = ("train", "val", "test")
BBOX_KEYS = ("x1", "y1", "x2", "y2", "width", "height")
BBOX_TYPE = pa.struct([pa.field(key, pa.int32()) for key in BBOX_KEYS])

SEGMENT_TYPE = pa.struct(
    [
        pa.field("bbox", BBOX_TYPE),
        pa.field("crop_path", pa.string()),
        pa.field("structure_crop_path", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("filtered_caption", pa.string()),
        pa.field("similarity_score", pa.float32()),
    ]
)

# The further captions of an image (COCO/Flickr-style datasets), each with its filtered form and hard negatives.
EXTRA_CAPTION_TYPE = pa.struct(
    [
        pa.field("caption", pa.string()),
        pa.field("filtered_caption", pa.string()),
        pa.field("hard_negatives", pa.list_(pa.string())),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("caption", pa.string()),
        pa.field("caption_source", pa.string()),
        pa.field("filtered_caption", pa.string()),
        pa.field("structure_path", pa.string()),
        pa.field("scribble_path", pa.string()),
        pa.field("split", pa.string()),
        pa.field("segments", pa.list_(SEGMENT_TYPE)),
        pa.field("hard_negatives", pa.list_(pa.string())),
        # Captions after the first (the row's ``caption``), in file order; empty/null for single-caption images.
        pa.field("extra_captions", pa.list_(EXTRA_CAPTION_TYPE)),
        # The other files with the same bytes as ``source_path`` (same image id), sorted.
        pa.field("duplicate_paths", pa.list_(pa.string())),
    ]
)

MANIFEST_COLUMNS = MANIFEST_SCHEMA.names


def manifest_schema(fields: tuple[pa.Field, ...] | list[pa.Field] = ()) -> pa.Schema:
    """Return the manifest schema with the columns stage plugins contribute (``fields``) after the built-in ones."""
    return pa.schema([*MANIFEST_SCHEMA, *fields]) if fields else MANIFEST_SCHEMA


def bbox(x1: int, y1: int, x2: int, y2: int) -> dict:
    """Return a bbox dict in the manifest's convention: pixel corners, ``x2``/``y2`` exclusive."""
    return {"x1": int(x1), "y1": int(y1), "x2": int(x2), "y2": int(y2), "width": int(x2 - x1), "height": int(y2 - y1)}


# List columns where "none" is stored as null (an empty list reads back as null), so manifests built by the pipeline,
# imported from JSON or written by older code compare equal.
NULL_WHEN_EMPTY = ("extra_captions", "duplicate_paths")


def manifest_table(rows: list[dict], schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """Build a manifest table from row dicts (missing optional columns become null)."""
    return pa.Table.from_pylist(
        [{name: (row.get(name) or None) if name in NULL_WHEN_EMPTY else row.get(name) for name in schema.names}
         for row in rows],
        schema=schema,
    )


def read_manifest(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read a manifest given its folder, an output folder containing ``manifest/``, or a single Parquet file."""
    path = Path(path)
    if path.is_file():
        from storage.parquet import read_part

        return read_part(path, columns=columns)
    return read_parquet_dir(_manifest_folder(path), columns=columns, schema=MANIFEST_SCHEMA)


def _manifest_folder(path: Path) -> Path:
    if (path / "manifest").is_dir():
        path = path / "manifest"
    if not path.is_dir():
        raise FileNotFoundError(f"no manifest at {path} (expected a folder of Parquet parts or OUT/ containing manifest/)")
    return path


def manifest_parts(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of a manifest given as :func:`read_manifest` takes it."""
    from storage.parquet import parquet_parts

    path = Path(path)
    return [path] if path.is_file() else parquet_parts(_manifest_folder(path))


def manifest_row_count(path: str | os.PathLike) -> int:
    """The manifest's number of rows, from the Parquet footers (nothing decoded)."""
    import pyarrow.parquet as pq

    total = 0
    for part in manifest_parts(path):
        with pq.ParquetFile(part) as handle:
            total += handle.metadata.num_rows
    return total


def manifest_batches(path: str | os.PathLike, columns: list[str] | tuple[str, ...] | None = None,
                     batch_size: int = 8192) -> Iterator[pa.RecordBatch]:
    """The manifest's rows a batch at a time, part by part (``columns`` that a part lacks are absent from its
    batches): the memory of one batch, whatever the manifest's size."""
    import pyarrow.parquet as pq

    for part in manifest_parts(path):
        with pq.ParquetFile(part) as handle:
            present = None if columns is None else [c for c in columns if c in handle.schema_arrow.names]
            yield from handle.iter_batches(batch_size=batch_size, columns=present)


def manifest_rows_with_ids(path: str | os.PathLike,
                           image_ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> list[dict]:
    """Return the manifest rows whose ``image_id`` is one of ``image_ids``, in manifest order (read a batch at a
    time: the memory of one batch and of the rows returned)."""
    import pyarrow.compute as pc

    if isinstance(image_ids, (pa.Array, pa.ChunkedArray)):
        wanted = pc.unique(image_ids.cast(pa.string()))
    else:
        wanted = pa.array(sorted(set(image_ids)), pa.string())
    rows: list[dict] = []
    if len(wanted):
        for batch in manifest_batches(path):
            rows.extend(batch.filter(pc.is_in(batch.column("image_id"), value_set=wanted)).to_pylist())
    return rows


def manifest_root(path: str | os.PathLike) -> OutputLayout:
    """Return the output folder that a manifest path's relative paths are relative to."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        path = path.parent
    if path.name == "manifest":
        return OutputLayout(path.parent)
    return OutputLayout(path)


def resolve_manifest_path(layout: OutputLayout, path: str | None) -> Path | None:
    """Return the absolute path of a manifest path: relative ones under ``layout.root`` (escapes refused), absolute
    ones (rows imported from a reference JSON whose files live outside the output folder) as they are."""
    if path is None:
        return None
    if Path(path).is_absolute():
        from storage.filenames import source_file

        return source_file(path)  # a source name with undecodable bytes is stored \xNN-escaped
    return layout.resolve(path)


def absolute_paths(row: dict, layout: OutputLayout) -> dict:
    """Return a copy of a manifest ``row`` whose structure, scribble and crop paths are absolute (not under OUT)."""

    def absolute(path: str | None) -> str | None:
        resolved = resolve_manifest_path(layout, path)
        return None if resolved is None else str(resolved)

    row = dict(row)
    for key in ("structure_path", "scribble_path"):
        row[key] = absolute(row.get(key))
    row["segments"] = [dict(segment, crop_path=absolute(segment.get("crop_path")),
                            structure_crop_path=absolute(segment.get("structure_crop_path")))
                       for segment in row.get("segments") or []]
    return row

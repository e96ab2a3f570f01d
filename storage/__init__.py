"""Output-folder layout, content addressing, atomic writes and Parquet I/O shared by every stage."""

from storage.atomic import atomic_write_bytes, atomic_write_text, atomic_writer, write_png
from storage.hashing import content_key, file_digest
from storage.layout import OutputLayout, PathEscapeError
from storage.parquet import read_parquet_dir, write_parquet_atomic

__all__ = [
    "OutputLayout",
    "PathEscapeError",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
    "content_key",
    "file_digest",
    "read_parquet_dir",
    "write_parquet_atomic",
    "write_png",
]

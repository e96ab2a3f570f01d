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
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from storage.hashing import content_key
from storage.layout import IMAGE_ID_LENGTH, OutputLayout
from storage.manifest import MANIFEST_COLUMNS, MANIFEST_SCHEMA, STATUS_FAILED, STATUS_OK, manifest_table
from storage.atomic import atomic_directory
from storage.parquet import parquet_parts, read_part, write_parquet_atomic

VERSION = "2"
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


@dataclass
class ManifestWrite:
    """What ``write_manifest`` did: rows newly written, rows kept in untouched parts, parts written and removed."""

    written_rows: int
    kept_rows: int
    written_ids: list[str]
    written_parts: list[Path]
    removed_parts: list[Path]


def write_manifest(layout: OutputLayout, rows: list[dict], *, rewrite: bool = False,
                   schema: pa.Schema = MANIFEST_SCHEMA) -> ManifestWrite:
    """Make ``OUT/manifest/`` hold exactly ``rows`` once each (``schema``: the manifest's columns, plugins' included),
    rewriting only parts that hold stale or removed rows or other columns (every part with ``rewrite``).

    The new manifest is assembled in a staging folder (current parts hard-linked, new parts written) that replaces
    ``OUT/manifest/`` in one atomic exchange: readers (DuckDB, pandas, a trainer) and a run killed at any moment see
    the old manifest or the new one, never a mix, a duplicate row or an empty folder.
    """
    wanted = {row["image_id"]: row for row in manifest_table(rows, schema).to_pylist()}
    if len(wanted) != len(rows):
        raise ValueError(f"expected one manifest row per image_id, got {len(rows)} rows for {len(wanted)} ids")
    covered: set[str] = set()
    kept: list[Path] = []
    stale: list[Path] = []
    kept_rows = 0
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
            kept_rows += len(existing)
            kept.append(part)
        else:
            stale.append(part)
    new_rows = [row for image_id, row in sorted(wanted.items()) if image_id not in covered]
    written: list[Path] = []
    if new_rows or stale or not layout.manifest_dir.is_dir():
        with atomic_directory(layout.manifest_dir) as staging:
            for part in kept:
                _link_or_copy(part, staging / part.name)
            for start in range(0, len(new_rows), MAX_ROWS_PER_PART):
                chunk = new_rows[start : start + MAX_ROWS_PER_PART]
                name = layout.manifest_part(content_key(VERSION, chunk)).name
                write_parquet_atomic(manifest_table(chunk, schema), staging / name)
                written.append(layout.manifest_dir / name)
    return ManifestWrite(
        written_rows=len(new_rows),
        kept_rows=kept_rows,
        written_ids=[row["image_id"] for row in new_rows],
        written_parts=written,
        removed_parts=[p for p in stale if p not in written],
    )


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (same bytes, no copy); copy where links are not supported."""
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)

"""A curated subset of a manifest (image ids picked in the static explorer) as a Parquet file or reference JSON.

The subset Parquet has the manifest schema with every path made absolute, so it can live anywhere and
``structxlip train subset.parquet`` / ``structxlip evaluate subset.parquet`` read it directly, exactly as they read
``OUT/manifest``; the reference JSON is :mod:`storage.reference_json`'s format. Rows keep the manifest's order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from storage.manifest import SPLITS, absolute_paths, manifest_root, manifest_table, read_manifest
from storage.parquet import write_parquet_atomic

_COMMENT = re.compile(r"#.*$")


@dataclass
class Selection:
    """The selected manifest rows (manifest order) and the files written (None when not asked for)."""

    rows: list[dict]
    parquet_path: Path | None = None
    json_path: Path | None = None
    json_records: int = 0


def read_ids(path: str | os.PathLike) -> list[str]:
    """Return the image ids listed in a text file: one per line (or separated by spaces/commas); ``#`` comments and
    blank lines ignored; duplicates kept once, first occurrence first."""
    ids: dict[str, None] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        for token in re.split(r"[\s,]+", _COMMENT.sub("", line)):
            if token:
                ids.setdefault(token, None)
    return list(ids)


def select_manifest(
    manifest: str | os.PathLike,
    image_ids: list[str],
    *,
    parquet_path: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    split: str | None = None,
) -> Selection:
    """Return (and write, where paths are given) the manifest rows whose ``image_id`` is in ``image_ids``.

    ``split``: put every selected row in this split (``train`` makes the whole selection training data); default:
    keep each row's split. Unknown ids are an error naming the first few, so a selection from another run is not
    silently cut short.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"expected a split among {', '.join(SPLITS)}, got {split!r}")
    wanted = set(image_ids)
    if not wanted:
        raise ValueError("expected at least one image id in the selection, got none")
    layout = manifest_root(manifest)
    rows = [row for row in read_manifest(manifest).to_pylist() if row["image_id"] in wanted]
    missing = sorted(wanted - {row["image_id"] for row in rows})
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"{len(missing)} selected image id(s) are not in the manifest {layout.root}: {shown}")
    rows = [absolute_paths(row, layout) for row in rows]
    if split is not None:
        rows = [dict(row, split=split) for row in rows]
    selection = Selection(rows=rows)
    if parquet_path is not None:
        selection.parquet_path = write_parquet_atomic(manifest_table(rows), parquet_path)
    if json_path is not None:
        from storage.reference_json import write_reference_json

        selection.json_path, selection.json_records = Path(json_path), write_reference_json(rows, layout, json_path)
    return selection

"""The reference StructXLIP trainer's JSON interchange format (METHOD.md section 1), exported and imported losslessly.

A JSON list of records::

    {"original_filename": ABS, "original_caption": str, "original_filename_structure": ABS | null,
     "segment": [{"similarity_score": float, "filename": ABS, "caption": str, "filename_structure_cropped": ABS,
                  "bbox_coordinates": {"x1", "y1", "x2", "y2", "width", "height"}}],
     "structxlip": {image_id, split, width, height, caption_source, filtered_caption, scribble, hard_negatives,
                    segment_filtered_captions}}

An image with several captions is one record per caption (as COCO-style reference JSONs are); on import, records
of the same image (same ``structxlip.image_id``, else the same file bytes) become one manifest row whose first
caption is ``caption`` and the others ``extra_captions``; other paths of the same bytes go to ``duplicate_paths``.

The reference trainer reads only the first four keys; ``structxlip`` carries the manifest fields it does not know,
so manifest -> JSON -> manifest and JSON -> manifest -> JSON are both exact. Only usable rows (status ``ok`` with a
caption) are exported: the reference format has no place for failed images.

On import, relative paths are taken relative to ``root`` (default: the JSON file's folder) and may not leave it;
absolute paths are kept. Paths that end up under the target output folder are stored relative to it (the manifest
convention); files elsewhere keep their absolute path, so nothing is copied and the round trip stays exact.
bbox values are read as the reference reads them, with ``float()``; fractional ones become the enclosing pixel box
(the manifest stores integer pixels, so only whole-number boxes round-trip exactly).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from storage.atomic import atomic_write_text
from storage.hashing import content_key, file_digest
from storage.layout import IMAGE_ID_LENGTH, OutputLayout, PathEscapeError
from storage.manifest import (BBOX_KEYS, SPLITS, STATUS_OK, absolute_paths, bbox, manifest_root, manifest_table,
                              read_manifest)
from storage.parquet import parquet_parts, write_parquet_atomic

EXTRA_KEY = "structxlip"
_IMAGE_ID = re.compile(rf"^[0-9a-f]{{{IMAGE_ID_LENGTH}}}$")
# Pixel values are stored as int32 in the manifest; anything beyond is not an image coordinate.
MAX_PIXEL_VALUE = 2**31 - 1
MAX_REASON_CHARS = 300


class ReferenceItemError(ValueError):
    """One JSON record is unusable; the message says which key and why."""


@dataclass
class ReferenceImport:
    """Manifest rows converted from a reference JSON, the rejected items as ``(index, reason)``, and where the
    manifest part was written (None when only converted in memory)."""

    rows: list[dict]
    rejected: list[tuple[int, str]] = field(default_factory=list)
    manifest_path: Path | None = None


# ---- export -------------------------------------------------------------------------------------------------------
def manifest_rows_to_reference(rows: list[dict], layout: OutputLayout) -> list[dict]:
    """Return reference-format records (absolute paths) for the usable manifest ``rows`` (status ok, with a caption)."""
    records = []
    for row in rows:
        if row.get("status") != STATUS_OK or not row.get("caption"):
            continue
        row = absolute_paths(row, layout)
        record = {
            "original_filename": row["source_path"],
            "original_caption": row["caption"],
            "original_filename_structure": row["structure_path"],
            "segment": [
                {
                    "similarity_score": segment.get("similarity_score"),
                    "filename": segment["crop_path"],
                    "caption": segment.get("caption"),
                    "filename_structure_cropped": segment["structure_crop_path"],
                    "bbox_coordinates": None if segment.get("bbox") is None
                    else {key: segment["bbox"][key] for key in BBOX_KEYS},
                }
                for segment in row["segments"]
            ],
            EXTRA_KEY: {
                "image_id": row["image_id"],
                "split": row.get("split"),
                "width": row.get("width"),
                "height": row.get("height"),
                "caption_source": row.get("caption_source"),
                "filtered_caption": row.get("filtered_caption"),
                "scribble": row["scribble_path"],
                "hard_negatives": row.get("hard_negatives"),
                "segment_filtered_captions": [segment.get("filtered_caption") for segment in row["segments"]],
            },
        }
        records.append(record)
        for extra in row.get("extra_captions") or []:
            # One record per further caption, as COCO-style reference JSONs list them; import regroups them by image.
            again = json.loads(json.dumps(record))
            again["original_caption"] = extra["caption"]
            again[EXTRA_KEY].update(filtered_caption=extra.get("filtered_caption"),
                                    hard_negatives=extra.get("hard_negatives"))
            records.append(again)
        if row.get("duplicate_paths"):  # on the image's first record only
            record[EXTRA_KEY]["duplicate_paths"] = list(row["duplicate_paths"])
    return records


def write_reference_json(rows: list[dict], layout: OutputLayout, out_path: str | os.PathLike) -> int:
    """Write the usable manifest ``rows`` as reference JSON atomically; return the record count."""
    records = manifest_rows_to_reference(rows, layout)
    atomic_write_text(out_path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    return len(records)


def export_reference_json(manifest: str | os.PathLike, out_path: str | os.PathLike, *, split: str | None = None) -> int:
    """Write the manifest's usable rows (optionally one split) as reference JSON atomically; return the record count."""
    rows = read_manifest(manifest).to_pylist()
    if split is not None:
        rows = [row for row in rows if row.get("split") == split]
    return write_reference_json(rows, manifest_root(manifest), out_path)


# ---- import -------------------------------------------------------------------------------------------------------
def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite(value: Any, types: tuple[type, ...] = (int, float)) -> float:
    """Return ``value`` read with ``float()``; refuse other ``types`` (bool too: a true/false where a number belongs is
    a format error, not 1/0), NaN, infinities (JSON ``Infinity``, ``1e400``) and ints too large for a float."""
    if isinstance(value, bool) or not isinstance(value, types):
        raise ValueError(f"must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number, got {_short(value)}") from None
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {_short(value)}")
    return number


def _coordinate(value: Any) -> float:
    """A bbox value read as the reference reads it, with ``float()`` (numbers or numeric strings); finite and within
    the manifest's int32 pixel range only."""
    number = _finite(value, (int, float, str))
    if abs(number) > MAX_PIXEL_VALUE:
        raise ValueError(f"must be within +-{MAX_PIXEL_VALUE} pixels, got {_short(value)}")
    return number


def _must(ok: Callable[[Any], Any], expected: str) -> AfterValidator:
    """A validator refusing the values ``ok`` is false for: ``must be {expected}, got {value}``."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(f"must be {expected}, got {_short(value)}")
        return value

    return AfterValidator(check)


_Coordinate = Annotated[float, BeforeValidator(_coordinate)]
_Score = Annotated[float | None, BeforeValidator(lambda value: None if value is None else _finite(value))]
# A whole pixel count within int32 (what the manifest stores).
_Pixels = Annotated[int, _must(lambda value: 0 <= value <= MAX_PIXEL_VALUE, f"between 0 and {MAX_PIXEL_VALUE}")]


class _Strict(BaseModel):
    # strict: no 1 for "1", no true for 1; keys the reference format does not know are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class _Box(_Strict):
    x1: _Coordinate
    y1: _Coordinate
    x2: _Coordinate
    y2: _Coordinate
    width: _Coordinate
    height: _Coordinate

    @model_validator(mode="after")
    def _ordered(self) -> "_Box":
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise ValueError(f"has x2 < x1 or y2 < y1: {self.model_dump()}")
        return self


class _Segment(_Strict):
    similarity_score: _Score = None
    filename: str | None = None
    caption: str | None = None
    filename_structure_cropped: str | None = None
    bbox_coordinates: _Box | None = None


class _Extra(_Strict):
    """The ``structxlip`` object: the manifest fields the reference trainer does not know (no split: the import's)."""

    image_id: Annotated[str, _must(_IMAGE_ID.fullmatch, f"{IMAGE_ID_LENGTH} lowercase hex digits")] | None = None
    split: Annotated[str, _must(SPLITS.__contains__, f"one of {', '.join(SPLITS)} or null")] | None = None
    width: _Pixels | None = None
    height: _Pixels | None = None
    caption_source: str | None = "reference-json"
    filtered_caption: str | None = None
    scribble: str | None = None
    hard_negatives: list[str] | None = None
    duplicate_paths: list[str] | None = None
    segment_filtered_captions: list[str | None] | None = None


class _Record(_Strict):
    original_filename: str
    original_caption: Annotated[str, _must(str.strip, "a non-empty text")]
    original_filename_structure: str | None = None
    segment: list[_Segment] | None = None
    structxlip: _Extra | None = None


def _where(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).removeprefix(".")


# pydantic's error types, said as what was expected.
_EXPECTED = {"string_type": "str", "int_type": "int", "list_type": "list", "model_type": "an object"}


def _reason(error: dict) -> str:
    """One pydantic error as ``segment[0].bbox_coordinates.x1 must be a number, got 'left'``."""
    loc, kind = error["loc"], error["type"]
    where = _where(loc)
    if kind == "missing":
        return f"{_where(loc[:-1])}: missing key {loc[-1]!r}".removeprefix(": ")
    if kind == "value_error":
        return f"{where} {error['ctx']['error']}".strip()
    got = type(error["input"]).__name__
    if not where:
        return f"expected an object, got {got}"
    return f"{where} must be {_EXPECTED[kind]}, got {got}" if kind in _EXPECTED else f"{where}: {error['msg']}"


def _pixel_box(box: _Box) -> dict:
    """Return the manifest's integer bbox of a validated reference ``bbox_coordinates`` object.

    Whole numbers are kept as given. Fractional corners (the reference reads them with ``float()``) become the
    smallest pixel box containing them: x1/y1 rounded down, x2/y2 up, width/height recomputed.
    """
    if all(value.is_integer() for value in box.model_dump().values()):
        return {key: int(getattr(box, key)) for key in BBOX_KEYS}
    return bbox(math.floor(box.x1), math.floor(box.y1), math.ceil(box.x2), math.ceil(box.y2))


class _PathMapper:
    """JSON path -> (absolute file, manifest path): relative to ``source_root`` with escapes refused; under the
    target folder stored relative to it, elsewhere absolute."""

    def __init__(self, source_root: Path, target: OutputLayout):
        self.source = OutputLayout(source_root)
        self.target = target
        self._digests: dict[Path, str] = {}

    def absolute(self, value: str | None, where: str) -> Path | None:
        if value is None:
            return None
        if not value:
            raise ReferenceItemError(f"{where} is an empty path")
        path = Path(value).expanduser()
        if path.is_absolute():
            return Path(os.path.normpath(path))
        try:
            return self.source.resolve(value)
        except PathEscapeError as exc:
            raise ReferenceItemError(f"{where}: {exc}") from None

    def digest(self, image: Path) -> str:
        """SHA-256 of an image file, read once however often the JSON lists it."""
        if image not in self._digests:
            self._digests[image] = file_digest(image)
        return self._digests[image]

    def stored(self, value: str | None, where: str) -> str | None:
        """The manifest path of a JSON path: relative under the target folder, else absolute."""
        path = self.absolute(value, where)
        if path is not None and (path == self.target.root or self.target.root in path.parents):
            return path.relative_to(self.target.root).as_posix()
        return None if path is None else str(path)


def reference_item_to_row(item: Any, paths: _PathMapper, *, default_split: str) -> dict:
    """Return the manifest row of one reference record; raise ReferenceItemError naming the first problem."""
    try:
        record = _Record.model_validate(item)
    except ValidationError as exc:
        raise ReferenceItemError(_reason(exc.errors()[0])) from None
    extra = record.structxlip or _Extra()
    image = paths.absolute(record.original_filename, "original_filename")
    structure = paths.stored(record.original_filename_structure, "original_filename_structure")
    if not image.is_file():
        raise ReferenceItemError(f"image file not found: {image}")
    raw_segments = record.segment or []
    filtered_captions = extra.segment_filtered_captions or [None] * len(raw_segments)
    if len(filtered_captions) != len(raw_segments):
        raise ReferenceItemError(f"{EXTRA_KEY}.segment_filtered_captions has {len(filtered_captions)} entries for "
                                 f"{len(raw_segments)} segments")
    segments = [
        {
            "bbox": None if segment.bbox_coordinates is None else _pixel_box(segment.bbox_coordinates),
            "crop_path": paths.stored(segment.filename, f"segment[{n}].filename"),
            "structure_crop_path": paths.stored(segment.filename_structure_cropped,
                                                f"segment[{n}].filename_structure_cropped"),
            "caption": segment.caption,
            "filtered_caption": filtered_caption,
            "similarity_score": segment.similarity_score,
        }
        for n, (segment, filtered_caption) in enumerate(zip(raw_segments, filtered_captions))
    ]
    width, height = extra.width, extra.height
    if width is None or height is None:
        from PIL import Image  # header read only: the pixels are not decoded

        try:
            with Image.open(image) as opened:
                width, height = opened.size
        except OSError as exc:
            raise ReferenceItemError(f"cannot read image {image}: {exc}") from None
    return {
        "image_id": extra.image_id or paths.digest(image)[:IMAGE_ID_LENGTH],
        "source_path": str(image),
        "status": STATUS_OK,
        "error": None,
        "width": width,
        "height": height,
        "caption": record.original_caption,
        "caption_source": extra.caption_source,
        "filtered_caption": extra.filtered_caption,
        "structure_path": structure,
        "scribble_path": paths.stored(extra.scribble, f"{EXTRA_KEY}.scribble"),
        "split": extra.split if "split" in extra.model_fields_set else default_split,
        "segments": segments,
        "hard_negatives": extra.hard_negatives,
        "extra_captions": None,
        "duplicate_paths": extra.duplicate_paths or None,
    }


def load_reference_json(path: str | os.PathLike) -> list:
    """Return the parsed JSON list of a reference file; raise ValueError (one line) when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"reference JSON not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def reference_to_manifest_rows(
    items: list, *, target: OutputLayout, root: str | os.PathLike, split: str = "train"
) -> ReferenceImport:
    """Convert reference records to manifest rows for output folder ``target``; bad items go to ``rejected``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {_short(split)}")
    paths = _PathMapper(Path(root).expanduser().resolve(), target)
    result = ReferenceImport(rows=[])
    by_image: dict[str, dict] = {}
    for index, item in enumerate(items):
        try:
            row = reference_item_to_row(item, paths, default_split=split)
            first = by_image.get(row["image_id"])
            if first is None:
                by_image[row["image_id"]] = row
                result.rows.append(row)
            else:  # the same image again (or a byte-identical copy): one more caption of the first row
                _merge_caption(first, row)
        except (ReferenceItemError, OverflowError, RecursionError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if len(reason) > MAX_REASON_CHARS:
                reason = reason[: MAX_REASON_CHARS - 3] + "..."
            result.rejected.append((index, reason))
    return result


def _merge_caption(first: dict, row: dict) -> None:
    """Add ``row``'s caption (and another path of the same bytes) to the row that listed its image first."""
    captions = [first["caption"]] + [extra["caption"] for extra in first.get("extra_captions") or []]
    if row["caption"] not in captions:
        first["extra_captions"] = (first.get("extra_captions") or []) + [
            {"caption": row["caption"], "filtered_caption": row["filtered_caption"],
             "hard_negatives": row["hard_negatives"]}]
    paths = [first["source_path"], *(first.get("duplicate_paths") or [])]
    if row["source_path"] not in paths:
        first["duplicate_paths"] = sorted([*paths[1:], row["source_path"]])


def read_reference_json(
    path: str | os.PathLike, *, root: str | os.PathLike | None = None, split: str = "train"
) -> ReferenceImport:
    """Return manifest rows (in memory) of a reference JSON; relative paths are resolved against ``root``
    (default: the JSON's folder), and paths under that folder are stored relative to it."""
    path = Path(path).expanduser().resolve()
    root = Path(root).expanduser().resolve() if root is not None else path.parent
    return reference_to_manifest_rows(load_reference_json(path), target=OutputLayout(root), root=root, split=split)


def import_reference_json(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    split: str = "train",
    overwrite: bool = False,
) -> ReferenceImport:
    """Convert a reference JSON into ``out_dir/manifest/`` (one Parquet part); return rows, rejections and the part.

    Raises ValueError when no item is usable, or when ``out_dir`` already has a manifest and ``overwrite`` is False.
    """
    path = Path(path).expanduser().resolve()
    target = OutputLayout(out_dir)
    existing = parquet_parts(target.manifest_dir)
    if existing and not overwrite:
        raise ValueError(f"{target.manifest_dir} already holds a manifest ({len(existing)} parts); "
                         "use an empty folder or pass --overwrite")
    items = load_reference_json(path)
    result = reference_to_manifest_rows(items, target=target, root=path.parent if root is None else root, split=split)
    if not result.rows:
        reason = f" (first: item {result.rejected[0][0]}: {result.rejected[0][1]})" if result.rejected else ""
        raise ValueError(f"{path}: no usable records out of {len(items)}{reason}")
    part = target.manifest_part(content_key("reference-json", file_digest(path), split))
    write_parquet_atomic(manifest_table(result.rows), part)
    for old in existing:  # only after the new part is safely in place
        if old != part:
            old.unlink()
    result.manifest_path = part
    return result

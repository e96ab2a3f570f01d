"""Ingest stage: find the images of a folder, read their captions, and validate + content-address each image."""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

from pipelines.images import ImageLoadError, load_rgb
from storage.hashing import bytes_digest, content_key
from storage.layout import IMAGE_ID_LENGTH
from storage.manifest import STATUS_FAILED, STATUS_OK

VERSION = "1"

CAPTIONS_JSONL = "captions.jsonl"
CAPTIONS_CSV = "captions.csv"
_FILE_KEYS = ("file", "file_name", "image")
_CAPTION_KEYS = ("caption", "text")
# Block-level tags separate words; inline ones (<b>, <i>, <span>) sit inside a word or next to punctuation.
_BLOCK_TAG = re.compile(r"<\s*/?\s*(?:br|p|div|li|ul|ol|tr|td|th|h[1-6]|hr|table|blockquote)\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")


# ---- scanning ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceImage:
    """One input image file: its absolute path, size in bytes and modification time (ns)."""

    path: Path
    size: int
    mtime_ns: int

    @property
    def file_key(self) -> str:
        """Cheap identity of the file's current version (changes when it is rewritten), without reading it."""
        return content_key(str(self.path), self.size, self.mtime_ns)


@dataclass
class ScanResult:
    """Images found under a folder (sorted by relative path) and what could not be scanned."""

    files: list[SourceImage]
    problems: list[dict] = field(default_factory=list)  # {"path": str, "error": str}


def _normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    normalised = frozenset("." + e.lower().lstrip(".") for e in extensions if e and e.strip("."))
    if not normalised:
        raise ValueError("expected at least one image file extension, got none")
    return normalised


def scan_images(
    images_dir: str | os.PathLike, *, extensions: Sequence[str], follow_symlinks: bool = True
) -> ScanResult:
    """Return the image files under ``images_dir`` (recursive, extensions case-insensitive, hidden names skipped).

    Unreadable folders, broken links and symlink loops are recorded in ``problems``; an empty folder gives no files.
    Raises FileNotFoundError / NotADirectoryError when ``images_dir`` is not a folder.
    """
    root = Path(images_dir).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"expected a folder of images, got a file: {root}")
    wanted = _normalise_extensions(extensions)
    files: list[tuple[str, SourceImage]] = []
    problems: list[dict] = []
    root_stat = root.stat()
    # (device, inode) of every folder entered: a link back to one of them is a loop (or a second route to it).
    visited = {(root_stat.st_dev, root_stat.st_ino)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listing = list(entries)
        except OSError as exc:
            problems.append({"path": str(folder), "error": f"cannot list folder: {exc.strerror or exc}"})
            continue
        for entry in listing:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_link = entry.is_symlink()
                if is_link and not follow_symlinks:
                    continue
                info = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                problems.append({"path": str(path), "error": "broken symbolic link"})
                continue
            except OSError as exc:
                problems.append({"path": str(path), "error": f"cannot stat: {exc.strerror or exc}"})
                continue
            if stat.S_ISDIR(info.st_mode):
                identity = (info.st_dev, info.st_ino)
                if identity in visited:
                    problems.append({"path": str(path), "error": "symbolic link loop (folder already scanned)"})
                    continue
                visited.add(identity)
                stack.append(path)
            elif stat.S_ISREG(info.st_mode) and path.suffix.lower() in wanted:
                relative = path.relative_to(root).as_posix()
                files.append((relative, SourceImage(path=path, size=info.st_size, mtime_ns=info.st_mtime_ns)))
    files.sort(key=lambda item: item[0])
    return ScanResult(files=[image for _, image in files], problems=problems)


# ---- captions ---------------------------------------------------------------------------------------------------


class Caption(NamedTuple):
    """The caption of one image, where it came from, and a note on anything odd about it."""

    caption: str | None
    caption_source: str | None  # "sidecar", "jsonl", "csv" or None
    note: str | None


@dataclass
class CaptionIndex:
    """Captions keyed by absolute image path (str), plus problems met while reading caption files."""

    entries: dict[str, Caption]
    problems: list[dict] = field(default_factory=list)  # {"source", "line", "error"}

    def __getitem__(self, path: str | os.PathLike) -> Caption:
        return self.entries[str(path)]

    def get(self, path: str | os.PathLike, default: Caption | None = None) -> Caption | None:
        return self.entries.get(str(path), default)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)


def clean_caption(text: str | None) -> str | None:
    """Return the caption without HTML tags/entities and with whitespace collapsed; None when nothing is left."""
    if text is None:
        return None
    text = html.unescape(_TAG.sub("", _BLOCK_TAG.sub(" ", text)))
    text = " ".join(text.split())
    return text or None


def _read_sidecar(path: Path) -> tuple[str | None, str | None]:
    """Return (cleaned caption or None, note or None) of a sidecar text file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot read sidecar {path.name}: {exc.strerror or exc}"
    note = None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Keep the caption: a few bad bytes (e.g. Latin-1 accents) cost a character each, not the whole caption.
        text = data.decode("utf-8", errors="replace")
        note = f"sidecar {path.name} is not valid UTF-8; undecodable bytes replaced with U+FFFD"
    caption = clean_caption(text)
    if caption is None:
        return None, f"sidecar {path.name} is empty"
    return caption, note


def _pick(record: dict, keys: Sequence[str]):
    return next((record[k] for k in keys if k in record), None)


def _read_jsonl(path: Path, problems: list[dict]) -> list[tuple[int, str, str | None]]:
    """Return (line number, file reference, raw caption) for every usable line of a captions.jsonl."""
    rows = []
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append({"source": path.name, "line": None, "error": f"cannot read: {exc.strerror or exc}"})
        return rows
    text = data.decode("utf-8-sig", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append({"source": path.name, "line": number, "error": f"invalid JSON: {exc.msg}"})
            continue
        if not isinstance(record, dict):
            problems.append(
                {"source": path.name, "line": number, "error": f"expected a JSON object, got {type(record).__name__}"}
            )
            continue
        reference, caption = _pick(record, _FILE_KEYS), _pick(record, _CAPTION_KEYS)
        if not isinstance(reference, str) or not reference.strip():
            error = f"missing file name (keys {list(_FILE_KEYS)})"
            problems.append({"source": path.name, "line": number, "error": error})
            continue
        if caption is not None and not isinstance(caption, str):
            error = f"caption must be a string, got {type(caption).__name__}"
            problems.append({"source": path.name, "line": number, "error": error})
            continue
        rows.append((number, reference.strip(), caption))
    return rows


def _read_csv(path: Path, problems: list[dict]) -> list[tuple[int, str, str | None]]:
    """Return (line number, file reference, raw caption) for every usable row of a captions.csv."""
    rows = []
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as exc:
        problems.append({"source": path.name, "line": None, "error": f"cannot read: {exc.strerror or exc}"})
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    file_key = next((k for k in _FILE_KEYS if k in header), None)
    caption_key = next((k for k in _CAPTION_KEYS if k in header), None)
    if file_key is None or caption_key is None:
        problems.append(
            {"source": path.name, "line": 1, "error": f"expected a header with file and caption columns, got {header}"}
        )
        return rows
    reader.fieldnames = header
    try:
        for row in reader:
            number = reader.line_num
            reference = row.get(file_key)
            if not reference or not reference.strip():
                problems.append({"source": path.name, "line": number, "error": "missing file name"})
                continue
            rows.append((number, reference.strip(), row.get(caption_key)))
    except csv.Error as exc:
        problems.append({"source": path.name, "line": reader.line_num, "error": f"invalid CSV: {exc}"})
    return rows


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def read_captions(images_dir: str | os.PathLike, files: Sequence[SourceImage]) -> CaptionIndex:
    """Return each image's caption: sidecar ``NAME.txt`` first, else ``captions.jsonl``, else ``captions.csv``.

    File references in jsonl/csv may be paths relative to ``images_dir``, absolute paths, or bare file names (when
    unambiguous). Captions are cleaned (``clean_caption``); empty ones count as missing. Invalid UTF-8 in a sidecar
    is decoded with replacement characters and noted.
    """
    root = Path(images_dir).expanduser().absolute()
    problems: list[dict] = []
    by_relative: dict[str, str] = {}
    by_name: dict[str, list[str]] = {}
    for image in files:
        key = str(image.path)
        try:
            by_relative[Path(image.path).relative_to(root).as_posix()] = key
        except ValueError:
            pass
        by_name.setdefault(Path(image.path).name, []).append(key)

    def match(reference: str) -> str | None:
        candidate = Path(reference)
        if candidate.is_absolute():
            try:
                candidate = candidate.relative_to(root)
            except ValueError:
                return None
        relative = candidate.as_posix().removeprefix("./")
        if relative in by_relative:
            return by_relative[relative]
        same_name = by_name.get(candidate.name, [])
        return same_name[0] if len(same_name) == 1 else None

    listed: dict[str, dict[str, tuple[str | None, str]]] = {}
    for source, filename, reader in (("jsonl", CAPTIONS_JSONL, _read_jsonl), ("csv", CAPTIONS_CSV, _read_csv)):
        path = root / filename
        if not path.is_file():
            continue
        found = listed.setdefault(source, {})
        unmatched = 0
        for number, reference, caption in reader(path, problems):
            key = match(reference)
            if key is None:
                unmatched += 1
            elif key in found:
                error = f"duplicate caption for {reference}; the first is used"
                problems.append({"source": filename, "line": number, "error": error})
            else:
                found[key] = (caption, f"{filename} line {number}")
        if unmatched:
            error = f"{unmatched} caption(s) name no scanned image"
            problems.append({"source": filename, "line": None, "error": error})

    entries: dict[str, Caption] = {}
    for image in files:
        key = str(image.path)
        notes = []
        sidecar = Path(image.path).with_suffix(".txt")
        if sidecar.is_file():
            caption, note = _read_sidecar(sidecar)
            if note:
                notes.append(note)
                # Also a problem of the folder, so a run reports it even when the (repaired) caption is kept.
                problems.append({"source": _relative_name(sidecar, root), "line": None, "error": note})
            if caption is not None:
                entries[key] = Caption(caption, "sidecar", "; ".join(notes) or None)
                continue
        for source in ("jsonl", "csv"):
            if key in listed.get(source, {}):
                raw, where = listed[source][key]
                caption = clean_caption(raw)
                if caption is not None:
                    entries[key] = Caption(caption, source, "; ".join(notes) or None)
                    break
                notes.append(f"empty caption at {where}")
        else:
            entries[key] = Caption(None, None, "; ".join(notes) or None)
    return CaptionIndex(entries=entries, problems=problems)


# ---- ingest -----------------------------------------------------------------------------------------------------


def _unreadable_id(path: Path) -> str:
    # The bytes could not be read, so the id comes from the path: failed rows still need a unique manifest key.
    return bytes_digest(f"unreadable:{path}".encode("utf-8"))[:IMAGE_ID_LENGTH]


def ingest_one(image: SourceImage, *, max_pixels: int) -> dict:
    """Return the ingest record of one file: content id, oriented size, or a one-line failure (never raises)."""
    path = Path(image.path)
    record = {
        "file_key": image.file_key,
        "source_path": str(path),
        "image_id": None,
        "status": STATUS_FAILED,
        "error": None,
        "width": None,
        "height": None,
    }
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc)).lower()
        record.update(image_id=_unreadable_id(path), error=f"cannot read image: {reason} ({path.name})")
        return record
    record["image_id"] = bytes_digest(data)[:IMAGE_ID_LENGTH]
    try:
        rgb = load_rgb(path, max_pixels=max_pixels, data=data)
    except ImageLoadError as exc:
        record["error"] = str(exc)
        return record
    except Exception as exc:  # noqa: BLE001 - an unexpected decoder failure is still one bad file
        record["error"] = f"cannot decode image: {type(exc).__name__}: {' '.join(str(exc).split())} ({path.name})"
        return record
    record.update(status=STATUS_OK, height=int(rgb.shape[0]), width=int(rgb.shape[1]))
    return record


def ingest_images(files: Sequence[SourceImage], *, max_pixels: int) -> list[dict]:
    """Return ``{file_key, source_path, image_id, status, error, width, height}`` for each file, in order."""
    return [ingest_one(image, max_pixels=max_pixels) for image in files]

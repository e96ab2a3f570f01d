"""Ingest stage: find the images of a folder, read their captions, and validate + content-address each image."""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import os
import re
import stat
import unicodedata
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from pipelines.steps.errors import one_line
from pipelines.steps.images import ImageLoadError, validate_image
from storage.filenames import display_path, storable_path
from storage.hashing import bytes_digest, content_key
from storage.layout import IMAGE_ID_LENGTH
from storage.manifest import STATUS_FAILED, STATUS_OK

VERSION = "2"

CAPTIONS_JSONL = "captions.jsonl"
CAPTIONS_CSV = "captions.csv"
_FILE_KEYS = ("file", "file_name", "image")
_CAPTION_KEYS = ("caption", "text")
# Block-level tags separate words; inline ones (<b>, <i>, <span>) sit inside a word or next to punctuation.
_BLOCK_TAG = re.compile(r"<\s*/?\s*(?:br|p|div|li|ul|ol|tr|td|th|h[1-6]|hr|table|blockquote)\b[^>]*>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")
# Script and style bodies are code, not caption text: dropped with their tags (also when never closed).
_SCRIPT = re.compile(r"<\s*(script|style)\b[^>]*>.*?(?:<\s*/\s*\1\s*>|$)", re.IGNORECASE | re.DOTALL)
_NOT_REGULAR = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
# Default for ``max_file_bytes``: images larger than this are refused from their size alone, never read.
MAX_FILE_BYTES = 256 * 1024 * 1024
# Captions files are read whole: a sidecar holds one caption, captions.jsonl/csv one line per image.
MAX_SIDECAR_BYTES = 1024 * 1024
MAX_CAPTIONS_FILE_BYTES = 2 * 1024 * 1024 * 1024
# Default for ``max_aspect_ratio``: CLIP sees a centre square, so a 1x65000 strip keeps 1 pixel in 65000.
MAX_ASPECT_RATIO = 20.0


# ---- scanning ---------------------------------------------------------------------------------------------------


class Problem(dict):
    """One problem met while scanning the folder or reading its captions: a dict (``path`` or ``source``, ``line``,
    ``error``) whose text is the one line a user reads, e.g. ``captions.jsonl line 7: invalid JSON: ...``."""

    def __str__(self) -> str:
        where = self.get("path") or self.get("source") or "?"
        if self.get("line") is not None:
            where = f"{where} line {self['line']}"
        return f"{where}: {self.get('error')}"


class SourceImage(NamedTuple):
    """One input image file: its absolute path and the stat fields that tell its versions apart (git's rule).

    A tuple with the path as a string (``path`` gives it as a ``Path``): a catalogue of a million images holds one per
    file on every run, and a ``Path`` per file cost ~0.5 KB and ~2 us more each."""

    location: str  # the absolute path as the OS gave it (undecodable bytes surrogate-escaped, as os.fsdecode does)
    size: int
    mtime_ns: int
    ctime_ns: int = 0  # inode change time: set by the kernel on every write, rename or utime; never settable
    device: int = 0
    inode: int = 0

    @classmethod
    def from_stat(cls, path: str | os.PathLike, info: os.stat_result, *, size: int | None = None) -> "SourceImage":
        """Return the SourceImage of ``path`` from its ``stat`` (``size`` overrides st_size, e.g. 0 for a FIFO)."""
        return cls(os.fspath(path), info.st_size if size is None else size, info.st_mtime_ns, info.st_ctime_ns,
                   info.st_dev, info.st_ino)

    @property
    def path(self) -> Path:
        return Path(self.location)

    @property
    def file_key(self) -> str:
        """Cheap identity of the file's current version, without reading it: git's stat rule (path, device, inode,
        ctime, mtime, size). Other bytes under the same size and mtime (``cp -p``, ``rsync -t``, a tar extraction)
        still change the ctime (or the inode), so they are hashed again; so is a moved or copied folder, whose
        unchanged bytes give the same ``image_id`` and so keep every later stage cached. (Not covered, as in git
        without its index check: a same-size rewrite within one tick of the file system's clock after the hash.)"""
        return file_key(*self)

    @property
    def source_path(self) -> str:
        """The path as stored in records (valid UTF-8; undecodable bytes as ``\\xNN``, see storage.filenames)."""
        return storable_path(self.location)


def file_key(location: str, size: int, mtime_ns: int, ctime_ns: int = 0, device: int = 0, inode: int = 0) -> str:
    """``SourceImage(...).file_key`` from the fields themselves. A run keeps these keys for the next one
    (``Pipeline.file_keys``, under this module's ``VERSION``): changing how they are made means bumping it."""
    name = storable_path(location)
    if name != location:  # undecodable bytes: the raw name keeps a literal "\\xff" name apart
        return content_key([name, os.fsencode(location).hex()], size, mtime_ns, ctime_ns, device, inode)
    return content_key(name, size, mtime_ns, ctime_ns, device, inode)


class ScanResult:
    """Images found under a folder (sorted by relative path) and what could not be scanned (``problems``: {"path",
    "error"} each).

    Held as columns, as a run keeps it: ``locations`` (each file's ``SourceImage.location``) and their stat fields
    in two arrays, (n, 3) int64 size, mtime_ns, ctime_ns (times may be negative) and (n, 2) uint64 device, inode;
    ``files`` makes the ``SourceImage`` of each when asked. A million-image catalogue is scanned on every run: a
    tuple and five Python ints per file held through the run cost ~200 B per image more."""

    def __init__(self, files: Sequence[SourceImage] = (), problems: list[dict] | None = None):
        self.locations: list[str] = [f.location for f in files]
        self.times = np.array([f[1:4] for f in files], np.int64).reshape(len(files), 3)
        self.ids = np.array([f[4:6] for f in files], np.uint64).reshape(len(files), 2)
        self.problems = problems if problems is not None else []
        # A key of the .txt files in the scanned folders (their paths and stat fields): scan_images sets it.
        self.text_files_key: str | None = None

    def __len__(self) -> int:
        return len(self.locations)

    def iter_files(self) -> Iterator[SourceImage]:
        """The ``SourceImage`` of each file in order, one at a time."""
        # tolist(): Python ints, so that file keys are the same JSON as always (a NumPy integer would not be)
        for location, times, ids in zip(self.locations, self.times.tolist(), self.ids.tolist()):
            yield SourceImage(location, *times, *ids)

    @property
    def files(self) -> list[SourceImage]:
        return list(self.iter_files())

    def files_at(self, positions: Iterable[int]) -> list[SourceImage]:
        """The ``SourceImage`` of the files at ``positions`` (scan order), made for those only."""
        return [SourceImage(self.locations[n], *self.times[n].tolist(), *self.ids[n].tolist()) for n in positions]

    def digest(self) -> str:
        """A key of every file's location and stat fields, in order: what ``file_keys`` follows from."""
        h = hashlib.sha256(f"{VERSION}:{len(self)}\n".encode())
        h.update("\0".join(self.locations).encode("utf-8", "surrogateescape"))
        h.update(np.ascontiguousarray(self.times, "<i8").tobytes())
        h.update(np.ascontiguousarray(self.ids, "<u8").tobytes())
        return h.hexdigest()[:32]

    def file_keys(self) -> list[str]:
        """Each file's ``SourceImage.file_key``, in order, without making the SourceImages."""
        return [file_key(location, *times, *ids)
                for location, times, ids in zip(self.locations, self.times.tolist(), self.ids.tolist())]


def _normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    normalised = frozenset("." + e.lower().lstrip(".") for e in extensions if e and e.strip("."))
    if not normalised:
        raise ValueError("expected at least one image file extension, got none")
    return normalised


def scan_images(
    images_dir: str | os.PathLike,
    *,
    extensions: Sequence[str],
    follow_symlinks: bool = True,
    exclude: Sequence[str | os.PathLike] = (),
) -> ScanResult:
    """Return the image files under ``images_dir`` (recursive, extensions case-insensitive, hidden names skipped).

    Every entry whose name has an image extension is listed, also when it is not a regular file (a FIFO, a folder
    named ``x.jpg``): ingest records it as failed instead of dropping it silently (a folder is still scanned).
    Folders in ``exclude`` (e.g. an output folder inside the image folder) and everything under them are skipped.
    Unreadable folders, broken links and symlink loops are recorded in ``problems``; an empty folder gives no files.
    Raises FileNotFoundError / NotADirectoryError when ``images_dir`` is not a folder.
    """
    root = Path(images_dir).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"expected a folder of images, got a file: {root}")
    wanted = _normalise_extensions(extensions)
    relatives: list[str] = []  # the images' paths relative to the root (the order), absolute paths, stat fields
    located: list[str] = []
    times = array("q")  # size, mtime_ns, ctime_ns of each image, flat (no tuple per file: ~0.5 s at a million)
    ids = array("Q")  # device, inode
    problems: list[dict] = []
    root_stat = root.stat()
    excluded = set()
    for skip in exclude:
        try:
            info = Path(skip).expanduser().stat()
        except OSError:
            continue  # an output folder that does not exist yet holds nothing to skip
        excluded.add((info.st_dev, info.st_ino))
    # (device, inode) of every folder entered: a link back to one of them is a loop (or a second route to it).
    visited = {(root_stat.st_dev, root_stat.st_ino)}
    root_prefix = os.fspath(root) + os.sep
    texts: list[str] = []  # the .txt files met (possible sidecar captions): path and stat fields, for text_files_key
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listing = list(entries)
        except OSError as exc:
            problems.append({"path": display_path(folder), "error": f"cannot list folder: {exc.strerror or exc}"})
            continue
        prefix = os.fspath(folder) + os.sep
        relative_prefix = prefix[len(root_prefix):] if prefix.startswith(root_prefix) else None
        for entry in listing:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_link = entry.is_symlink()
                if is_link and not follow_symlinks:
                    if name.endswith(".txt"):  # read_captions follows it all the same
                        try:
                            _note_text_file(texts, entry.path, os.stat(entry.path))
                        except OSError:
                            pass
                    continue
                info = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                problems.append({"path": display_path(entry.path), "error": "broken symbolic link"})
                continue
            except OSError as exc:
                problems.append({"path": display_path(entry.path), "error": f"cannot stat: {exc.strerror or exc}"})
                continue
            identity = (info.st_dev, info.st_ino)
            if identity in excluded:
                continue
            if name.endswith(".txt"):
                _note_text_file(texts, entry.path, info)
            # Path(name).suffix, without a Path per entry (a folder of a million images is scanned on every run)
            stem, dot, suffix = name.rpartition(".")
            named_like_image = bool(dot and stem and suffix) and "." + suffix.lower() in wanted
            is_dir = stat.S_ISDIR(info.st_mode)
            if named_like_image:
                relative = (relative_prefix + name if relative_prefix is not None
                            else Path(entry.path).relative_to(root).as_posix())
                # Not a regular file: listed (size 0) so that ingest records why it is not an image; a folder is
                # still scanned below.
                relatives.append(relative)
                located.append(entry.path)
                times.extend((info.st_size if stat.S_ISREG(info.st_mode) else 0, info.st_mtime_ns, info.st_ctime_ns))
                ids.extend((info.st_dev, info.st_ino))
            if is_dir:
                if identity in visited:
                    error = "symbolic link loop (folder already scanned)"
                    problems.append({"path": display_path(entry.path), "error": error})
                    continue
                visited.add(identity)
                stack.append(Path(entry.path))
    order = sorted(range(len(relatives)), key=relatives.__getitem__)  # by relative path
    result = ScanResult(problems=[Problem(p) for p in problems])
    result.locations = [located[n] for n in order]
    result.times = np.frombuffer(times, np.int64).reshape(-1, 3)[order]
    result.ids = np.frombuffer(ids, np.uint64).reshape(-1, 2)[order]
    texts.sort()
    result.text_files_key = bytes_digest("\n".join(texts).encode("utf-8", "surrogateescape"))
    return result


def _note_text_file(texts: list[str], path: str, info: os.stat_result) -> None:
    if stat.S_ISREG(info.st_mode):
        texts.append(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ctime_ns}\0{info.st_dev}\0{info.st_ino}")


def captions_inputs_key(images_dir: str | os.PathLike, scan: ScanResult) -> str | None:
    """Return a key of everything ``read_captions(images_dir, scan.locations)`` reads besides the names it is given:
    the stat fields (git's rule, as for the images' file keys) of captions.jsonl, captions.csv and every .txt file in
    a scanned folder (``ScanResult.text_files_key``); None when the scan did not record them. Taken before the
    captions are read: a file changed after it gives another key next time."""
    if scan.text_files_key is None:
        return None
    root = Path(images_dir).expanduser().absolute()
    fields: list = [VERSION, scan.text_files_key]
    for filename in (CAPTIONS_JSONL, CAPTIONS_CSV):
        try:
            info = os.stat(root / filename)
        except FileNotFoundError:
            fields.append(None)
            continue
        except OSError:
            return None
        fields.append([stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_dev,
                       info.st_ino])
    return content_key("captions-inputs", fields, length=32)


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
    # Further captions of an image (COCO/Flickr style: several lines, rows or a JSON list), in file order.
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def captions(self, path: str | os.PathLike) -> list[str]:
        """Return every caption of an image: the primary one first, then the others in file order (may be empty)."""
        key = storable_path(path)
        entry = self.entries.get(key)
        first = [entry.caption] if entry is not None and entry.caption else []
        return first + list(self.extras.get(key, ()))

    def __getitem__(self, path: str | os.PathLike) -> Caption:
        return self.entries[storable_path(path)]

    def get(self, path: str | os.PathLike, default: Caption | None = None) -> Caption | None:
        return self.entries.get(storable_path(path), default)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)


def clean_caption(text: str | None) -> str | None:
    """Return the caption as plain text: entities decoded, then tags removed (``<script>``/``<style>`` with their
    contents), whitespace collapsed; None when nothing is left.

    Entities are decoded first, so an escaped tag (``&lt;img onerror=...&gt;``) is removed like a real one instead
    of turning into a real tag in the stored caption.
    """
    if text is None:
        return None
    if "&" not in text and "<" not in text:  # no entity and no tag: only the whitespace to collapse
        return " ".join(text.split()) or None
    text = html.unescape(text)
    text = _SCRIPT.sub(" ", text)
    text = _TAG.sub("", _BLOCK_TAG.sub(" ", text))
    text = " ".join(text.split())
    return text or None


def _decode_text(data: bytes) -> tuple[str, int | None]:
    """Return (UTF-8 text with undecodable bytes replaced, line number of the first bad byte or None)."""
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        return data.decode("utf-8-sig", errors="replace"), data[: exc.start].count(b"\n") + 1


def _read_sidecar(path: Path) -> tuple[str | None, str | None]:
    """Return (cleaned caption or None, note or None) of a sidecar text file."""
    try:
        data = _read_limited(path, MAX_SIDECAR_BYTES)
    except OSError as exc:
        return None, f"cannot read sidecar {display_path(path.name)}: {exc.strerror or exc}"
    note = None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Keep the caption: a few bad bytes (e.g. Latin-1 accents) cost a character each, not the whole caption.
        text = data.decode("utf-8", errors="replace")
        note = f"sidecar {display_path(path.name)} is not valid UTF-8; undecodable bytes replaced with U+FFFD"
    caption = clean_caption(text)
    if caption is None:
        return None, f"sidecar {display_path(path.name)} is empty"
    return caption, note


def _pick(record: dict, keys: Sequence[str]):
    for key in keys:  # (a loop: a generator costs ~1 us more per line of a captions file)
        if key in record:
            return record[key]
    return None


def _bad_utf8(source: str, line: int) -> dict:
    return {"source": source, "line": line, "error": "not valid UTF-8; undecodable bytes replaced with U+FFFD"}


def _read_limited(path: Path, limit: int) -> bytes:
    """Return the bytes of a captions file; raise OSError (its strerror says so) when it is over ``limit`` bytes."""
    size = path.stat().st_size
    if size > limit:
        error = OSError(f"file too large ({size} bytes > {limit})")
        error.strerror = str(error)
        raise error
    return path.read_bytes()


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text`` split at "\n" only, one at a time: ``text.split("\n")`` without its last line when that
    is empty. (Not io.StringIO: it holds a copy of the text at 4 bytes per character.)"""
    start, size = 0, len(text)
    while start < size:
        end = text.find("\n", start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        start = end + 1


def _read_jsonl(path: Path, problems: list[dict]) -> Iterator[tuple[int, str, str | None]]:
    """Yield (line number, file reference, raw caption) for every usable line of a captions.jsonl, in order (each
    problem is appended to ``problems`` as its line is read)."""
    try:
        data = _read_limited(path, MAX_CAPTIONS_FILE_BYTES)
    except OSError as exc:
        problems.append({"source": path.name, "line": None, "error": f"cannot read: {exc.strerror or exc}"})
        return
    # Lines end at "\n" only: str.splitlines() would also split inside a caption at U+2028, U+2029 or U+0085,
    # which json.dumps(..., ensure_ascii=False) writes raw.
    bad_lines: list = []
    lines: Iterable[str]
    try:  # valid UTF-8 throughout (the usual case): decoded once, not line by line
        # read line by line from the text (a list of a million lines would be ~130 MB more at once)
        lines = _lines(data.decode("utf-8-sig"))
        each_sig = True  # each line decoded as utf-8-sig, as below: one byte order mark at its start is dropped
        del data
    except UnicodeDecodeError:
        each_sig = False
        decoded = [_decode_text(raw_line if number > 1 else raw_line.removeprefix(b"\xef\xbb\xbf"))
                   for number, raw_line in enumerate(data.split(b"\n"), start=1)]
        lines = [line for line, _bad in decoded]
        bad_lines = [bad is not None for _line, bad in decoded]
    decoder = json.JSONDecoder()
    scan, decode = decoder.scan_once, decoder.decode
    for number, line in enumerate(lines, start=1):
        if bad_lines and bad_lines[number - 1]:
            problems.append(_bad_utf8(path.name, number))
        if each_sig and line.startswith("\ufeff"):
            line = line[1:]
        if not line or line.isspace():
            continue
        try:
            try:  # the compiled scanner on the whole line: json.loads without its Python steps (~1 us a line)
                record, end = scan(line, 0)
            except (StopIteration, json.JSONDecodeError):
                end = -1
            if end != len(line):  # surrounding whitespace, extra data or an error: json.loads, with its message
                record = decode(line)
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
        if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
            for each in caption:  # several captions of one image
                yield number, reference, each
            continue
        if caption is not None and not isinstance(caption, str):
            error = f"caption must be a string or a list of strings, got {type(caption).__name__}"
            problems.append({"source": path.name, "line": number, "error": error})
            continue
        yield number, reference, caption


def _read_csv(path: Path, problems: list[dict]) -> list[tuple[int, str, str | None]]:
    """Return (line number, file reference, raw caption) for every usable row of a captions.csv."""
    rows = []
    try:
        text, bad = _decode_text(_read_limited(path, MAX_CAPTIONS_FILE_BYTES))
    except OSError as exc:
        problems.append({"source": path.name, "line": None, "error": f"cannot read: {exc.strerror or exc}"})
        return rows
    if bad is not None:
        problems.append(_bad_utf8(path.name, bad))
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
            caption, extra = row.get(caption_key), row.get(None)
            if extra:  # more fields than the header: an unquoted comma, or a quote left open on an earlier line
                if caption_key == header[-1] and isinstance(caption, str):
                    caption = ",".join([caption, *extra])
                    what = "joined to the caption"
                else:
                    what = "ignored"
                problems.append({"source": path.name, "line": number, "error": (
                    f"{len(extra)} more field(s) than the header, {what} (quote a caption that holds commas)")})
            rows.append((number, reference, caption))
    except csv.Error as exc:
        problems.append({"source": path.name, "line": reader.line_num, "error": f"invalid CSV: {exc}"})
    return rows


_NAMED_UNMATCHED = 3  # unmatched caption entries named in the one warning line


class _SidecarFinder:
    """``Path(image).with_suffix(".txt")`` when it is a file, from one listing per folder instead of a stat per image."""

    def __init__(self):
        self._listed: dict[str, set[str] | None] = {}

    def find(self, image: str) -> Path | None:
        folder, _sep, name = image.rpartition(os.sep)
        listed = self._listed.get(folder, False)
        if listed is False:
            listed = self._listed[folder] = self._text_files(folder)
        if not listed and listed is not None:  # a folder without text files (the usual case for a jsonl catalogue)
            return None
        stem, dot, suffix = name.rpartition(".")
        candidate = (stem if dot and stem and suffix else name) + ".txt"
        if listed is None:  # an unlistable folder: ask for the one file
            path = Path(folder, candidate)
            return path if path.is_file() else None
        return Path(folder, candidate) if candidate in listed else None

    @staticmethod
    def _text_files(folder: str) -> set[str] | None:
        try:
            with os.scandir(folder or os.sep) as entries:
                return {e.name for e in entries if e.name.endswith(".txt") and e.is_file()}
        except OSError:
            return None


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _describe_reference(reference: str) -> str:
    """Return a caption file's image reference for a warning: quoted, escaped, and marked when not in NFC form."""
    shown = json.dumps(display_path(reference), ensure_ascii=False)
    if _nfc(reference) != reference:  # looks like the composed name: the escapes show the difference
        shown += f" (decomposed Unicode: {json.dumps(display_path(reference))})"
    return shown


def _relative_name(path: Path, root: Path) -> str:
    try:
        return storable_path(path.relative_to(root).as_posix())
    except ValueError:
        return storable_path(path)


def read_captions(images_dir: str | os.PathLike, files: Sequence[SourceImage] | Sequence[str]) -> CaptionIndex:
    """Return each image's caption: sidecar ``NAME.txt`` first, else ``captions.jsonl``, else ``captions.csv``.

    A jsonl/csv may give several captions for one image (several lines or rows, or a JSON list as the caption
    value): the first non-empty one is the entry's caption, the others (distinct, file order) are ``extras``.

    File references in jsonl/csv may be paths relative to ``images_dir``, absolute paths, or bare file names (when
    unambiguous); a reference matches exactly first (names may start or end with spaces), then without surrounding
    spaces. Names with undecodable bytes are matched in their ``\\xNN`` form. Captions are cleaned
    (``clean_caption``); empty ones count as missing. Invalid UTF-8 in a sidecar or a captions file is decoded with
    replacement characters and reported. Entries are keyed by the stored path (``SourceImage.source_path``).
    ``files``: the scanned files, or their paths (``SourceImage.location``, as ``ScanResult.locations`` holds them).
    """
    root = Path(images_dir).expanduser().absolute()
    problems: list[dict] = []
    by_relative: dict[str, str] = {}
    by_name: dict[str, list[str]] = {}
    # String operations, not a Path per file: a catalogue of a million images reads its captions on every run.
    prefix = os.fspath(root).rstrip(os.sep) + os.sep
    texts = [image if type(image) is str else image.location for image in files]
    stored = [storable_path(text) for text in texts]
    start, posix = len(prefix), os.sep == "/"
    for text, key in zip(texts, stored):
        if posix and key is text and text.startswith(prefix):
            relative = text[start:]
            # valid UTF-8 (storable as it is) and normalised: no empty, "." or ".." part (a hidden one goes below)
            if "//" not in relative and "/." not in relative and not relative.startswith("."):
                by_relative[relative] = key
                continue
        try:
            by_relative[storable_path(Path(text).relative_to(root).as_posix())] = key
        except ValueError:
            pass

    def names() -> dict[str, list[str]]:
        """File name -> the files of that name: for bare names in a captions file, built at the first one."""
        if not by_name:
            for text, key in zip(texts, stored):
                by_name.setdefault(key.rpartition("/")[2] if posix else storable_path(os.path.basename(text)),
                                   []).append(key)
        return by_name
    # The same tables under Unicode NFC: a caption file written on macOS (NFD) names "café.jpg" with a combining
    # accent while the file on disk has the composed one, or the other way round. Used when no exact match exists,
    # and only where the normalised name is unambiguous; built at the first such reference.
    nfc_relative: dict[str, list[str]] = {}
    nfc_name: dict[str, list[str]] = {}

    def nfc_tables() -> None:
        if nfc_relative or nfc_name:
            return
        for relative, key in by_relative.items():
            nfc_relative.setdefault(_nfc(relative), []).append(key)
        for name, keys in names().items():
            nfc_name.setdefault(_nfc(name), []).extend(keys)

    root_text = storable_path(root)

    def match(reference: str) -> str | None:
        if reference in by_relative:  # a normalised relative path, as Path(reference) would give it: the same match
            return by_relative[reference]
        for normalised in (False, True):
            found = match_exactly(reference, normalised)
            if found is None and reference != reference.strip():
                found = match_exactly(reference.strip(), normalised)
            if found is not None:
                return found
        return None

    def match_exactly(reference: str, normalised: bool) -> str | None:
        candidate = Path(_nfc(reference) if normalised else reference)
        if candidate.is_absolute():
            try:
                candidate = candidate.relative_to(_nfc(root_text) if normalised else root_text)
            except ValueError:
                return None
        relative = candidate.as_posix().removeprefix("./")
        if not normalised:
            if relative in by_relative:
                return by_relative[relative]
            same_name = names().get(candidate.name, [])
        else:
            nfc_tables()
            same_relative = nfc_relative.get(relative, [])
            if len(same_relative) == 1:
                return same_relative[0]
            same_name = nfc_name.get(candidate.name, [])
        return same_name[0] if len(same_name) == 1 else None

    # source -> (its file name, stored path -> (raw caption, line number), or a list of them in file order where a
    # file has several: no list per file for the usual one line)
    listed: dict[str, tuple[str, dict[str, tuple[str | None, int] | list[tuple[str | None, int]]]]] = {}
    for source, filename, reader in (("jsonl", CAPTIONS_JSONL, _read_jsonl), ("csv", CAPTIONS_CSV, _read_csv)):
        path = root / filename
        if not path.is_file():
            continue
        found: dict[str, tuple[str | None, int] | list[tuple[str | None, int]]] = {}
        listed[source] = (filename, found)
        unmatched: list[str] = []
        for number, reference, caption in reader(path, problems):
            key = match(reference)
            if key is None:
                unmatched.append(f"line {number} {_describe_reference(reference)}")
            else:  # several lines/rows for one image are several captions, kept in file order
                earlier = found.get(key)
                if earlier is None:
                    found[key] = (caption, number)
                elif type(earlier) is tuple:
                    found[key] = [earlier, (caption, number)]
                else:
                    earlier.append((caption, number))
        if unmatched:
            # One line however many: the first few entries named (where and what), then how many more.
            shown = ", ".join(unmatched[:_NAMED_UNMATCHED])
            more = f" (+{len(unmatched) - _NAMED_UNMATCHED} more)" if len(unmatched) > _NAMED_UNMATCHED else ""
            error = f"{len(unmatched)} caption(s) name no scanned image: {shown}{more}"
            problems.append({"source": filename, "line": None, "error": error})

    entries: dict[str, Caption] = {}
    extras: dict[str, tuple[str, ...]] = {}
    bad_lines = {(p["source"], p["line"]) for p in problems if "not valid UTF-8" in p["error"]}
    sidecars = _SidecarFinder()
    listed_sources = [(source, *listed[source]) for source in ("jsonl", "csv") if source in listed]
    for text, key in zip(texts, stored):
        notes: list[str] = []
        sidecar = sidecars.find(text)
        if sidecar is not None:
            caption, note = _read_sidecar(sidecar)
            if note:
                notes.append(note)
                # Also a problem of the folder, so a run reports it even when the (repaired) caption is kept.
                problems.append({"source": _relative_name(sidecar, root), "line": None, "error": note})
            if caption is not None:
                entries[key] = Caption(caption, "sidecar", "; ".join(notes) or None)
                continue
        for source, filename, found in listed_sources:
            lines = found.get(key)
            if type(lines) is tuple:  # one line: the usual case
                if not notes and not bad_lines:
                    caption = clean_caption(lines[0])
                    if caption is not None:
                        entries[key] = Caption(caption, source, None)
                        break
                lines = [lines]
            kept: list[str] = []
            for raw, number in lines or ():
                caption = clean_caption(raw)
                if (filename, number) in bad_lines:
                    notes.append(f"{filename} line {number} is not valid UTF-8; undecodable bytes replaced with U+FFFD")
                if caption is None:
                    notes.append(f"empty caption at {filename} line {number}")
                elif caption not in kept:  # the same text twice is one caption
                    kept.append(caption)
            if kept:
                entries[key] = Caption(kept[0], source, "; ".join(notes) or None)
                if len(kept) > 1:
                    extras[key] = tuple(kept[1:])
                break
        else:
            entries[key] = Caption(None, None, "; ".join(notes) or None)
    return CaptionIndex(entries=entries, problems=[Problem(p) for p in problems], extras=extras)


# ---- ingest -----------------------------------------------------------------------------------------------------


def _unreadable_id(path: Path) -> str:
    # The bytes could not be read, so the id comes from the path: failed rows still need a unique manifest key.
    return bytes_digest(b"unreadable:" + os.fsencode(path))[:IMAGE_ID_LENGTH]


class FileTooLarge(ValueError):
    """A file is larger than ``max_file_bytes``; found from its size alone, nothing was read."""

    def __init__(self, size: int, max_file_bytes: int):
        super().__init__(f"file too large ({size} bytes > ingest.max_file_bytes={max_file_bytes})")


def _read_regular_file(path: Path, max_file_bytes: int | None = None) -> bytes:
    """Return the bytes of a regular file; raise IsADirectoryError / ValueError (naming what it is) for anything else
    and ``FileTooLarge`` for one over ``max_file_bytes`` (from fstat, before reading a byte).

    Opened non-blocking and checked with fstat before reading: reading a FIFO named ``x.jpg`` would wait forever.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):  # a socket cannot even be opened; a device would be read forever
        raise ValueError(_NOT_REGULAR.get(stat.S_IFMT(info.st_mode), "not a regular file"))
    if max_file_bytes is not None and info.st_size > max_file_bytes:
        raise FileTooLarge(info.st_size, max_file_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(_NOT_REGULAR.get(stat.S_IFMT(info.st_mode), "not a regular file"))
        if max_file_bytes is not None and info.st_size > max_file_bytes:
            raise FileTooLarge(info.st_size, max_file_bytes)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            if max_file_bytes is None:
                return handle.read()
            data = handle.read(max_file_bytes + 1)  # a file growing while read stops at the limit too
            if len(data) > max_file_bytes:
                raise FileTooLarge(max(len(data), os.fstat(fd).st_size), max_file_bytes)
            return data
    finally:
        os.close(fd)


def ingest_one(image: SourceImage, *, max_pixels: int, max_aspect_ratio: float | None = MAX_ASPECT_RATIO,
               max_file_bytes: int | None = MAX_FILE_BYTES) -> dict:
    """Return the ingest record of one file: content id, oriented size, a note (e.g. an animated image's first frame
    is used) or a one-line failure (never raises).

    ``max_aspect_ratio``: images whose long side exceeds this multiple of the short side fail with that reason
    (None: no limit). ``max_file_bytes``: larger files fail from their size alone, unread (None: no limit).
    """
    path = image.path
    name = display_path(path.name)
    record = {
        "file_key": image.file_key,
        "source_path": storable_path(path),
        "image_id": None,
        "status": STATUS_FAILED,
        "error": None,
        "note": None,
        "width": None,
        "height": None,
    }
    try:
        data = _read_regular_file(path, max_file_bytes)
    except FileTooLarge as exc:
        record.update(image_id=_unreadable_id(path), error=f"{exc} ({name})")
        return record
    except IsADirectoryError:
        record.update(image_id=_unreadable_id(path), error=f"not an image file: a folder named like an image ({name})")
        return record
    except ValueError as exc:
        record.update(image_id=_unreadable_id(path), error=f"not an image file: {exc} named like an image ({name})")
        return record
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc)).lower()
        record.update(image_id=_unreadable_id(path), error=f"cannot read image: {reason} ({name})")
        return record
    record["image_id"] = bytes_digest(data)[:IMAGE_ID_LENGTH]
    try:
        # Validated from the bytes already read and hashed (a JPEG by a reduced decode): no full-size RGB array.
        width, height, frames = validate_image(path, max_pixels=max_pixels, data=data)
    except ImageLoadError as exc:
        record["error"] = str(exc)
        return record
    except Exception as exc:  # noqa: BLE001 - an unexpected decoder failure is still one bad file
        record["error"] = f"cannot decode image: {one_line(exc)} ({name})"
        return record
    ratio = max(width, height) / min(width, height)
    if max_aspect_ratio is not None and ratio > max_aspect_ratio:
        record.update(width=width, height=height,
                      error=f"extreme aspect ratio: {width}x{height} is {ratio:.4g}:1, above max_aspect_ratio="
                            f"{max_aspect_ratio:g} (CLIP sees a centre square of it) ({name})")
        return record
    if frames > 1:
        record["note"] = f"animated image: {frames} frames, the first frame is used"
    record.update(status=STATUS_OK, height=height, width=width)
    return record


def ingest_images(
    files: Sequence[SourceImage], *, max_pixels: int, max_aspect_ratio: float | None = MAX_ASPECT_RATIO,
    max_file_bytes: int | None = MAX_FILE_BYTES,
) -> list[dict]:
    """Return ``{file_key, source_path, image_id, status, error, note, width, height}`` for each file, in order."""
    return [ingest_one(image, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio, max_file_bytes=max_file_bytes)
            for image in files]

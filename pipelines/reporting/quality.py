"""Dataset quality report: the statistics a curator checks before training, computed from manifest rows.

Caption length (words, raw and filtered), the words the filter removed (top words, per vocabulary category, i.e.
per ``filter.remove_*`` flag), regions per image, the similarity score histogram (``100 * cos``, CLIP's logit
scale), image sizes, structure-map edge density and failure reasons. Everything is a plain JSON-ready dict; the plots
are drawn from it by :mod:`pipelines.quality_plots`.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.engine.stages import STAGE_NAME, even_picks

WORD_PATTERN = re.compile(r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*")
SIMILARITY_SCALE = (
    "similarity_score is CLIP's logit 100 * cos(crop, sentence): 100 is identical embeddings, 0 unrelated; "
    "with real CLIP weights matching pairs typically score 15-30 (METHOD.md section 2), a tiny random model scores "
    "anywhere in [-100, 100]."
)
UNLISTED = "unlisted"
TOP_WORDS = 25
TOP_REASONS = 20
HISTOGRAM_BINS = 20
NO_CAPTION = "no caption"  # the manifest's prefix of an image without a caption (not a stage)


def caption_words(text: str | None) -> list[str]:
    """Return the words of ``text`` (letters/digits, inner hyphens and apostrophes kept), in order."""
    return WORD_PATTERN.findall(text or "")


def _normalised(word: str) -> str:
    # The filter re-chooses articles ("an orange shirt" -> "a shirt"): a/an are the same word for the diff.
    lower = word.lower()
    return "a" if lower == "an" else lower


def removed_spans(caption: str | None, filtered_caption: str | None) -> list[tuple[int, int]]:
    """Return the ``(start, end)`` character spans of ``caption``'s words that are absent from ``filtered_caption``
    (a word-level alignment, case-insensitive, a/an treated as equal); empty when nothing was removed or the
    image has no filtering result."""
    if not caption or filtered_caption is None or caption == filtered_caption:
        return []
    raw = list(WORD_PATTERN.finditer(caption))
    words = [_normalised(m.group()) for m in raw]
    kept = [_normalised(w) for w in WORD_PATTERN.findall(filtered_caption)]
    # The filter only deletes words (articles aside), so the kept words are usually a subsequence of the caption:
    # match them greedily, left to right (linear); anything else gets a full alignment.
    spans, at = [], 0
    for match, word in zip(raw, words):
        if at < len(kept) and word == kept[at]:
            at += 1
        else:
            spans.append(match.span())
    if at == len(kept):
        return spans
    matcher = difflib.SequenceMatcher(None, words, kept, autojunk=False)
    spans = []
    for tag, i1, i2, _, _ in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            spans.extend(m.span() for m in raw[i1:i2])
    return spans


def removed_words(caption: str | None, filtered_caption: str | None) -> list[str]:
    """Return the lower-cased words of ``caption`` that the filter removed, in caption order."""
    return [caption[s:e].lower() for s, e in removed_spans(caption, filtered_caption)]


def summary(values: Iterable[float]) -> dict:
    """Return ``{count, min, mean, median, max}`` of ``values`` (None entries for an empty input)."""
    values = [float(v) for v in values]
    if not values:
        return {"count": 0, "min": None, "mean": None, "median": None, "max": None}
    return {"count": len(values), "min": min(values), "mean": statistics.fmean(values),
            "median": statistics.median(values), "max": max(values)}


def histogram(values: Iterable[float], *, bins: int = HISTOGRAM_BINS, edges: list[float] | None = None) -> dict:
    """Return ``{edges, counts}``: ``bins`` equal bins over the values' range (or the given ``edges``); the last bin
    includes its right edge, as numpy's does."""
    values = np.asarray([float(v) for v in values], dtype=np.float64)
    if edges is None:
        if values.size == 0:
            return {"edges": [], "counts": []}
        low, high = float(values.min()), float(values.max())
        if low == high:
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, bins + 1).tolist()
    counts, _ = np.histogram(values, bins=np.asarray(edges, dtype=np.float64))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def failure_stage(error: str | None) -> str:
    """Return the stage named by a manifest error (``"structure: ..."`` -> ``structure``, a plugin stage's name
    too: pipelines.steps.manifest writes ``"<stage>: <message>"``), else ``other``."""
    head, sep, _ = (error or "").partition(":")
    head = head.strip()
    return head if sep and (head == NO_CAPTION or STAGE_NAME.fullmatch(head)) else "other"


def edge_density(structure_map: np.ndarray) -> float:
    """Return the fraction of non-zero pixels of a structure map ``(H, W)`` or ``(H, W, C)`` uint8."""
    if structure_map.ndim == 3:
        structure_map = structure_map.max(axis=2)
    return float(np.count_nonzero(structure_map)) / float(structure_map.size) if structure_map.size else 0.0


def read_edge_density(path: str | os.PathLike) -> float | None:
    """Return the edge density of the structure-map file at ``path``, None when it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _file_edge_density(os.fspath(path), stat.st_mtime_ns, stat.st_size, stat.st_ino)


# Keyed by the file's identity: a run measures the same maps for its quality artifact and again for its explorer.
@lru_cache(maxsize=8192)
def _file_edge_density(path: str, mtime_ns: int, size: int, inode: int) -> float | None:
    import cv2

    structure_map = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    return None if structure_map is None else edge_density(structure_map)


def vocabulary_categories(vocab_dir: str | os.PathLike) -> Callable[[str], list[str]]:
    """Return ``word -> [category, ...]`` for the filter's vocabulary (``colors``, ``materials``, ``textures``,
    ``domain``, or ``color modifiers``): exact entries first, then the base of a derived adjective (reddish -> red)
    or the parts of a hyphenated compound (reddish-brown); ``[]`` for a word no list names."""
    from pipelines.steps.filtering import base_forms, load_vocabulary

    vocabulary = load_vocabulary(str(vocab_dir))

    def categories(word: str) -> list[str]:
        word = word.lower()
        for candidate in [word, *base_forms(word), *word.split("-")]:
            found = [category for category, _ in vocabulary.categories_of(candidate)]
            if found:
                return found
            if candidate in vocabulary.color_modifiers:
                return ["color modifiers"]
        return []

    return categories


# The manifest columns the report reads; nothing else is decoded (a row's hard negatives and region crops and
# sentences are most of its bytes).
BATCH_ROWS = 8192  # rows decoded at a time
QUALITY_COLUMNS = ("image_id", "status", "error", "split", "width", "height", "caption", "filtered_caption",
                   "structure_path", "segments")


def _quality_schema() -> pa.Schema:
    from storage.manifest import MANIFEST_SCHEMA

    return pa.schema([MANIFEST_SCHEMA.field(name) for name in QUALITY_COLUMNS])


def _numbers(arrays: list, dtype=np.float64) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


class _CaptionCounts:
    """What the caption columns of ok rows give the report: their lengths in words (raw and filtered), how many the
    filter changed and the words it removed (first seen first). The one part of the report computed per row in
    Python (~35 us a caption), so it is kept per manifest part (``_kept_caption_counts``) and merged."""

    def __init__(self, raw: np.ndarray | None = None, filtered: np.ndarray | None = None, changed: int = 0,
                 removed: Counter[str] | None = None):
        self.raw: list[np.ndarray] = [] if raw is None else [raw]
        self.filtered: list[np.ndarray] = [] if filtered is None else [filtered]
        self.changed = changed
        self.removed: Counter[str] = Counter() if removed is None else removed

    def add(self, captions: list, filtered: list) -> None:
        raw_lengths, filtered_lengths = [], []
        for caption, kept in zip(captions, filtered):
            if caption:
                raw_lengths.append(len(caption_words(caption)))
            if kept:
                filtered_lengths.append(len(caption_words(kept)))
            words = [caption[s:e].lower() for s, e in removed_spans(caption, kept)]
            self.changed += bool(words)
            self.removed.update(words)
        self.raw.append(np.asarray(raw_lengths, np.int64))
        self.filtered.append(np.asarray(filtered_lengths, np.int64))

    def merge(self, other: _CaptionCounts) -> None:
        """Add ``other``'s counts after this one's (the removed words' first-seen order as if read in one go)."""
        self.raw += other.raw
        self.filtered += other.filtered
        self.changed += other.changed
        self.removed.update(other.removed)

    def row(self, part: str) -> dict:
        return {"part": part, "raw": _numbers(self.raw, np.int64), "filtered": _numbers(self.filtered, np.int64),
                "changed": self.changed, "words": list(self.removed), "counts": list(self.removed.values())}

    @classmethod
    def from_row(cls, row: dict) -> _CaptionCounts:
        return cls(np.asarray(row["raw"], np.int64), np.asarray(row["filtered"], np.int64), int(row["changed"]),
                   Counter(dict(zip(row["words"], row["counts"]))))


_CAPTION_COUNTS_SCHEMA = pa.schema([("part", pa.string()), ("raw", pa.list_(pa.int64())),
                                    ("filtered", pa.list_(pa.int64())), ("changed", pa.int64()),
                                    ("words", pa.list_(pa.string())), ("counts", pa.list_(pa.int64()))])
CAPTION_COUNTS_VERSION = "1"  # bump when _CaptionCounts counts otherwise


class _Accumulator:
    """The report's statistics, gathered batch by batch: column-wise in Arrow and NumPy, per row in Python only for
    the caption counts (``_CaptionCounts``) and the reasons of failed rows. Memory grows by a few numbers and the
    structure path per row (Arrow), never by a row's objects."""

    def __init__(self, word_categories: Callable[[str], list[str]] | None):
        self.word_categories = word_categories
        self.rows = self.ok = 0
        self.splits: Counter[str] = Counter()
        self.captions = _CaptionCounts()
        self.region_counts: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.widths: list[np.ndarray] = []
        self.heights: list[np.ndarray] = []
        self.reasons: Counter[str] = Counter()
        self.stages: Counter[str] = Counter()
        self.map_ids: list[pa.Array] = []
        self.map_paths: list[pa.Array] = []

    def add(self, batch: pa.RecordBatch, captions: _CaptionCounts | None | bool = True) -> None:
        """Count ``batch``; its captions into ``captions`` (this report's own when True; not at all when None:
        counted already, merged by the caller)."""
        self.rows += batch.num_rows
        ok_mask = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
        ok = batch.filter(ok_mask)
        self.ok += ok.num_rows
        self.splits.update(ok.column("split").fill_null("none").to_pylist())
        if captions is not None:
            (self.captions if captions is True else captions).add(ok.column("caption").to_pylist(),
                                                                   ok.column("filtered_caption").to_pylist())
        segments = ok.column("segments")
        self.region_counts.append(pc.fill_null(pc.list_value_length(segments), 0).to_numpy())
        scores = pc.struct_field(pc.list_flatten(segments), "similarity_score").drop_null().to_numpy()
        self.scores.append(scores[np.isfinite(scores)])
        # Sizes of every row (a failed image may have been measured before it failed), 0 counting as unknown.
        self.widths.append(pc.fill_null(batch.column("width"), 0).to_numpy())
        self.heights.append(pc.fill_null(batch.column("height"), 0).to_numpy())
        with_map = ok.filter(pc.fill_null(pc.greater(pc.utf8_length(ok.column("structure_path")), 0), False))
        self.map_ids.append(with_map.column("image_id"))
        self.map_paths.append(with_map.column("structure_path"))
        for error in batch.filter(pc.invert(ok_mask)).column("error").to_pylist():
            self.reasons[" ".join(str(error or "no error recorded").split())] += 1
            self.stages[failure_stage(error)] += 1

    def _by_category(self) -> dict[str, Counter[str]]:
        """The removed words per vocabulary category (each word under every category listing it)."""
        by_category: dict[str, Counter[str]] = {}
        if self.word_categories is not None:
            for word, count in self.captions.removed.items():  # a few hundred distinct words in any number of captions
                for category in self.word_categories(word) or [UNLISTED]:
                    by_category.setdefault(category, Counter())[word] += count
        return by_category

    def edge_map_sample(self, limit: int) -> list[str]:
        """The structure paths of ``limit`` ok rows evenly spread over them sorted by image id."""
        if not self.map_ids or limit <= 0:
            return []
        ids = pa.chunked_array(self.map_ids, pa.string())
        paths = pa.chunked_array(self.map_paths, pa.string())
        order = pc.sort_indices(ids).to_numpy()
        return paths.take(pa.array(order[even_picks(len(order), limit)])).to_pylist()

    def report(self, densities: list[float], unreadable: int) -> dict:
        raw, filtered = _numbers(self.captions.raw, np.int64), _numbers(self.captions.filtered, np.int64)
        removed, by_category = self.captions.removed, self._by_category()
        lengths = np.concatenate([raw, filtered])
        low, high = (int(lengths.min()), int(lengths.max())) if lengths.size else (0, 1)
        length_edges = np.linspace(low, max(high, low + 1), HISTOGRAM_BINS + 1).tolist()  # shared by raw and filtered
        region_counts = _numbers(self.region_counts, np.int64)
        scores = _numbers(self.scores)
        width, height = _numbers(self.widths, np.int64), _numbers(self.heights, np.int64)  # 0: not measured
        widths, heights, both = width[width > 0], height[height > 0], (width > 0) & (height > 0)
        pairs = Counter(zip(width[both].tolist(), height[both].tolist()))
        sizes = Counter({f"{w}x{h}": n for (w, h), n in pairs.items()})
        regions, counted = np.unique(region_counts, return_counts=True)
        with_regions = int(np.count_nonzero(region_counts))
        return {
            "counts": {
                "rows": self.rows, "ok": self.ok, "failed": self.rows - self.ok,
                "by_split": dict(sorted(self.splits.items())),
                # Of the ok images, as the explorer's "regions" filter counts them (a failed image has none to find).
                "with_regions": with_regions, "without_regions": int(region_counts.size) - with_regions,
            },
            "caption_length": {
                "unit": "words",
                "raw": summary(raw.tolist()), "filtered": summary(filtered.tolist()),
                "histogram": {"edges": length_edges, "raw": histogram(raw, edges=length_edges)["counts"],
                              "filtered": histogram(filtered, edges=length_edges)["counts"]},
            },
            "removed_words": {
                "captions_changed": self.captions.changed, "captions_unchanged": self.ok - self.captions.changed,
                "total": sum(removed.values()),
                "top": [[w, n] for w, n in removed.most_common(TOP_WORDS)],
                "by_category": {c: [[w, n] for w, n in counter.most_common(TOP_WORDS)]
                                for c, counter in sorted(by_category.items())},
            },
            "regions_per_image": {
                "summary": summary(region_counts.tolist()),
                "counts": {str(n): int(c) for n, c in zip(regions.tolist(), counted.tolist())},
            },
            "similarity_score": {"scale": SIMILARITY_SCALE, "summary": summary(scores.tolist()),
                                 "histogram": histogram(scores)},
            "image_size": {
                "width": summary(widths.tolist()), "height": summary(heights.tolist()),
                "common": [[s, n] for s, n in sizes.most_common(10)],
                "long_side_histogram": histogram(np.maximum(width[both], height[both])),
            },
            "edge_density": {
                "measured": len(densities), "unreadable": unreadable, "summary": summary(densities),
                "histogram": histogram(densities, edges=np.linspace(0.0, max(densities, default=0.0) or 1.0,
                                                                    HISTOGRAM_BINS + 1).tolist()),
            },
            "failures": {
                "count": self.rows - self.ok,
                "by_stage": dict(self.stages.most_common()),
                "reasons": [[reason, n] for reason, n in self.reasons.most_common(TOP_REASONS)],
            },
        }


def quality_report(
    rows: list[dict] | Iterable[pa.RecordBatch],
    *,
    word_categories: Callable[[str], list[str]] | None = None,
    resolve_path: Callable[[str], str | os.PathLike | None] | None = None,
    max_edge_maps: int = 2000,
) -> dict:
    """Return the quality report of manifest rows as a JSON-ready dict.

    ``rows``: row dicts, or record batches holding at least :data:`QUALITY_COLUMNS` (read once, one at a time: a
    manifest of any size is reported in the memory of a batch plus a few numbers per row).
    ``word_categories(word)`` names the vocabulary categories listing a removed word (``colors``, ``materials``...;
    words no list names count as ``unlisted``); without it removed words are not split by category.
    ``resolve_path(relative)`` turns a manifest path into a file to read; without it (or with ``max_edge_maps=0``)
    edge density is not measured. At most ``max_edge_maps`` maps are read, evenly spread over the ok rows sorted by
    image id, so the cost stays bounded on large manifests.
    """
    if isinstance(rows, list) and (not rows or isinstance(rows[0], dict)):
        schema = _quality_schema()
        rows = [pa.RecordBatch.from_pylist([{k: row.get(k) for k in QUALITY_COLUMNS} for row in rows], schema=schema)]
    accumulator = _Accumulator(word_categories)
    for batch in rows:
        accumulator.add(batch)
    return _finished(accumulator, resolve_path, max_edge_maps)


def _finished(accumulator: _Accumulator, resolve_path: Callable[[str], str | os.PathLike | None] | None,
              max_edge_maps: int) -> dict:
    """The report of what ``accumulator`` counted, with the edge density of its sample of structure maps."""
    densities: list[float] = []
    unreadable = 0
    if resolve_path is not None and max_edge_maps > 0:
        for relative in accumulator.edge_map_sample(max_edge_maps):
            try:
                path = resolve_path(relative)
                density = read_edge_density(path) if path is not None else None
            except (OSError, ValueError):
                density = None
            if density is None:
                unreadable += 1
            else:
                densities.append(density)
    return accumulator.report(densities, unreadable)


def quality_tables(report: dict) -> dict[str, list[dict]]:
    """Return the report as tables of row dicts (for a Prefect table artifact or a CSV): ``distributions`` (one row
    per quantity: count/min/mean/median/max), ``removed_words`` (word, category, count) and ``failures`` (stage,
    reason, count)."""
    quantities = [
        ("caption length, raw (words)", report["caption_length"]["raw"]),
        ("caption length, filtered (words)", report["caption_length"]["filtered"]),
        ("regions per image", report["regions_per_image"]["summary"]),
        ("similarity_score (100 * cos)", report["similarity_score"]["summary"]),
        ("image width (px)", report["image_size"]["width"]),
        ("image height (px)", report["image_size"]["height"]),
        ("structure-map edge density", report["edge_density"]["summary"]),
    ]
    categories = report["removed_words"]["by_category"]
    if categories:
        removed = [{"word": w, "category": c, "count": n} for c, words in categories.items() for w, n in words]
    else:
        removed = [{"word": w, "category": "", "count": n} for w, n in report["removed_words"]["top"]]
    return {
        "distributions": [{"quantity": name, **values} for name, values in quantities],
        "removed_words": removed,
        "failures": [{"stage": failure_stage(reason), "reason": reason, "count": n}
                     for reason, n in report["failures"]["reasons"]],
    }


def output_quality_report(out_dir: str | os.PathLike, *, vocab_dir: str | os.PathLike | None = None,
                          max_edge_maps: int = 2000) -> dict:
    """Return :func:`quality_report` of an output folder's manifest (structure maps read under ``out_dir``), streamed
    a batch at a time and reading :data:`QUALITY_COLUMNS` only. A run asks twice (its quality artifact, then its
    explorer): the second time, an unchanged manifest is answered from memory."""
    from storage.manifest import manifest_parts, manifest_root

    identity = []
    for part in manifest_parts(out_dir):
        stat = part.stat()
        identity.append((str(part), stat.st_mtime_ns, stat.st_size, stat.st_ino))
    vocab = None if vocab_dir is None else str(Path(vocab_dir).resolve())
    report = _manifest_quality(str(Path(out_dir).resolve()), str(manifest_root(out_dir).root), tuple(identity), vocab,
                               max_edge_maps)
    return copy.deepcopy(report)  # the caller's to change


@lru_cache(maxsize=4)
def _manifest_quality(manifest: str, root: str, parts: tuple, vocab_dir: str | None, max_edge_maps: int) -> dict:
    import pyarrow.parquet as pq

    from storage.layout import OutputLayout
    from storage.manifest import resolve_manifest_path

    layout = OutputLayout(root)
    schema = _quality_schema()
    accumulator = _Accumulator(vocabulary_categories(vocab_dir) if vocab_dir else None)
    own = all(Path(path).resolve().parent == layout.manifest_dir for path, *_ in parts)  # a pipeline's manifest: counts kept
    kept = _kept_caption_counts(layout) if own else {}
    counted: dict[str, _CaptionCounts] = {}
    for path, mtime_ns, size, _inode in parts:
        key = f"{Path(path).name}:{size}:{mtime_ns}"  # the parts a run keeps are the same files (hard links)
        counts = kept.get(key)
        fresh = counts is None
        counts = _CaptionCounts() if fresh else counts
        with pq.ParquetFile(path) as handle:
            present = [name for name in QUALITY_COLUMNS if name in handle.schema_arrow.names]
            for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=present):
                # A column an older manifest lacks reads as nulls.
                batch = pa.RecordBatch.from_arrays(
                    [batch.column(name) if name in batch.schema.names
                     else pa.nulls(batch.num_rows, schema.field(name).type) for name in QUALITY_COLUMNS],
                    names=list(QUALITY_COLUMNS))
                accumulator.add(batch, counts if fresh else None)
        accumulator.captions.merge(counts)
        counted[key] = counts
    if own and counted.keys() != kept.keys():
        _keep_caption_counts(layout, counted)
    return _finished(accumulator, lambda path: resolve_manifest_path(layout, path), max_edge_maps)


def _kept_caption_counts(layout) -> dict[str, _CaptionCounts]:
    """The caption counts of each manifest part (by name, size and modification time) as the last report kept them."""
    from storage.parquet import read_derived

    kept = read_derived(layout.quality_captions, CAPTION_COUNTS_VERSION, _CAPTION_COUNTS_SCHEMA.names)
    return {} if kept is None else {row["part"]: _CaptionCounts.from_row(row) for row in kept[0].to_pylist()}


def _keep_caption_counts(layout, counted: dict[str, _CaptionCounts]) -> None:
    from storage.parquet import write_derived

    if layout.root.is_dir():
        write_derived(layout.quality_captions, CAPTION_COUNTS_VERSION, pa.Table.from_pylist(
            [counts.row(part) for part, counts in counted.items()], schema=_CAPTION_COUNTS_SCHEMA))

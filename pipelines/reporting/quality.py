"""Dataset quality report: the statistics a curator checks before training, computed from manifest rows.

Caption length (words, raw and filtered), the words the filter removed (top words, per vocabulary category, i.e.
per ``filter.remove_*`` flag), regions per image, the similarity score histogram (``100 * cos``, CLIP's logit
scale), image sizes, structure-map edge density and failure reasons. Everything is a plain JSON-ready dict; the plots
are drawn from it by :mod:`pipelines.quality_plots`.
"""

from __future__ import annotations

import difflib
import os
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache

import numpy as np

from pipelines.engine.stages import STAGE_NAME

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


def _even_sample(items: list, limit: int) -> list:
    if limit <= 0 or len(items) <= limit:
        return list(items)
    return [items[int(i * len(items) / limit)] for i in range(limit)]


def quality_report(
    rows: list[dict],
    *,
    word_categories: Callable[[str], list[str]] | None = None,
    spans_per_row: list[list[tuple[int, int]]] | None = None,
    resolve_path: Callable[[str], str | os.PathLike | None] | None = None,
    max_edge_maps: int = 2000,
) -> dict:
    """Return the quality report of manifest ``rows`` as a JSON-ready dict.

    ``word_categories(word)`` names the vocabulary categories listing a removed word (``colors``, ``materials``...;
    words no list names count as ``unlisted``); without it removed words are not split by category.
    ``resolve_path(relative)`` turns a manifest path into a file to read; without it (or with ``max_edge_maps=0``)
    edge density is not measured. ``spans_per_row``: the rows' :func:`removed_spans`, when the caller already has them.
    At most ``max_edge_maps`` maps are read, evenly spread over the ok rows sorted by
    image id, so the cost stays bounded on large manifests.
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]

    raw_lengths = [len(caption_words(r.get("caption"))) for r in ok if r.get("caption")]
    filtered_lengths = [len(caption_words(r.get("filtered_caption"))) for r in ok if r.get("filtered_caption")]
    lengths = raw_lengths + filtered_lengths
    low, high = min(lengths, default=0), max(lengths, default=1)
    length_edges = np.linspace(low, max(high, low + 1), HISTOGRAM_BINS + 1).tolist()  # shared by raw and filtered

    removed: Counter[str] = Counter()
    by_category: dict[str, Counter[str]] = {}
    changed = 0
    for index, row in enumerate(rows):
        if row.get("status") != "ok":
            continue
        caption = row.get("caption")
        spans = spans_per_row[index] if spans_per_row is not None else removed_spans(caption, row.get("filtered_caption"))
        words = [caption[s:e].lower() for s, e in spans]
        changed += bool(words)
        removed.update(words)
        if word_categories is not None:
            for word in words:
                for category in word_categories(word) or [UNLISTED]:
                    by_category.setdefault(category, Counter())[word] += 1

    region_counts = [len(r.get("segments") or []) for r in ok]
    scores = [float(s["similarity_score"]) for r in ok for s in r.get("segments") or []
              if s.get("similarity_score") is not None and np.isfinite(s["similarity_score"])]
    widths = [int(r["width"]) for r in rows if r.get("width")]
    heights = [int(r["height"]) for r in rows if r.get("height")]
    sizes = Counter(f"{r['width']}x{r['height']}" for r in rows if r.get("width") and r.get("height"))

    densities: list[float] = []
    unreadable = 0
    if resolve_path is not None and max_edge_maps > 0:
        with_maps = sorted((r for r in ok if r.get("structure_path")), key=lambda r: r["image_id"])
        for row in _even_sample(with_maps, max_edge_maps):
            try:
                path = resolve_path(row["structure_path"])
                density = read_edge_density(path) if path is not None else None
            except (OSError, ValueError):
                density = None
            if density is None:
                unreadable += 1
            else:
                densities.append(density)

    reasons = Counter(" ".join(str(r.get("error") or "no error recorded").split()) for r in failed)
    return {
        "counts": {
            "rows": len(rows), "ok": len(ok), "failed": len(failed),
            "by_split": dict(sorted(Counter(r.get("split") or "none" for r in ok).items())),
            # Of the ok images, as the explorer's "regions" filter counts them (a failed image has none to find).
            "with_regions": sum(1 for n in region_counts if n), "without_regions": sum(1 for n in region_counts if not n),
        },
        "caption_length": {
            "unit": "words",
            "raw": summary(raw_lengths), "filtered": summary(filtered_lengths),
            "histogram": {"edges": length_edges, "raw": histogram(raw_lengths, edges=length_edges)["counts"],
                          "filtered": histogram(filtered_lengths, edges=length_edges)["counts"]},
        },
        "removed_words": {
            "captions_changed": changed, "captions_unchanged": len(ok) - changed, "total": sum(removed.values()),
            "top": [[w, n] for w, n in removed.most_common(TOP_WORDS)],
            "by_category": {c: [[w, n] for w, n in counter.most_common(TOP_WORDS)]
                            for c, counter in sorted(by_category.items())},
        },
        "regions_per_image": {
            "summary": summary(region_counts),
            "counts": {str(n): c for n, c in sorted(Counter(region_counts).items())},
        },
        "similarity_score": {"scale": SIMILARITY_SCALE, "summary": summary(scores), "histogram": histogram(scores)},
        "image_size": {
            "width": summary(widths), "height": summary(heights),
            "common": [[s, n] for s, n in sizes.most_common(10)],
            "long_side_histogram": histogram([max(w, h) for w, h in zip(widths, heights)]),
        },
        "edge_density": {
            "measured": len(densities), "unreadable": unreadable, "summary": summary(densities),
            "histogram": histogram(densities, edges=np.linspace(0.0, max(densities, default=0.0) or 1.0,
                                                                HISTOGRAM_BINS + 1).tolist()),
        },
        "failures": {
            "count": len(failed),
            "by_stage": dict(Counter(failure_stage(r.get("error")) for r in failed).most_common()),
            "reasons": [[reason, n] for reason, n in reasons.most_common(TOP_REASONS)],
        },
    }


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
    """Return :func:`quality_report` of an output folder's manifest (structure maps read under ``out_dir``)."""
    from storage.manifest import manifest_root, read_manifest, resolve_manifest_path

    layout = manifest_root(out_dir)
    return quality_report(read_manifest(layout.root).to_pylist(),
                          word_categories=vocabulary_categories(vocab_dir) if vocab_dir else None,
                          resolve_path=lambda path: resolve_manifest_path(layout, path), max_edge_maps=max_edge_maps)

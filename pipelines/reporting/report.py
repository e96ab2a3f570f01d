"""The static explorer: ``OUT/report/index.html``, one self-contained page that opens from disk without a server.

It embeds its data as JSON (manifest rows, the quality report, plots as PNG data URIs, training curves, evaluation
metrics and per-query rankings) and references images by relative paths under ``OUT``: structure maps and crops
where the pipeline wrote them, and for each image a small JPEG thumbnail under ``OUT/report/thumbs/`` (an image under
``OUT`` no larger than a thumbnail is referenced as it is). Thumbnails are keyed by image id, a content hash, so a
re-run writes only the new ones. Embedding the thumbnails instead would cost ~5-10 KB of base64 per image in the
HTML (50-100 MB at 10,000 rows, all parsed up front); referenced files load lazily, only for the page shown.

With ``compare=[OTHER_OUT, ...]`` the page also carries each other run's rows for the same image ids (maps, regions,
scores, retrieval ranks; its files referenced relative to this page), its metrics (deltas against this run) and the
config keys that differ. The embedding map projects ``OUT/eval/embeddings.npz`` (written by the evaluate stage) to
2-D: PCA, or UMAP when ``umap-learn`` is installed; nothing is encoded here.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from urllib.parse import quote, unquote

from pipelines.engine.workers import usable_cpus
from pipelines.reporting.quality import caption_words, output_quality_report, removed_spans
from pipelines.reporting.render import png_data_uri
from pipelines.reporting.report_plots import quality_plots, recall_png, training_curves_png
from storage.atomic import atomic_write_bytes, atomic_write_text
from storage.filenames import source_file
from storage.hashing import content_key
from storage.layout import IMAGE_ID_LENGTH, OutputLayout, PathEscapeError
from storage.manifest import manifest_row_count, manifest_rows_with_ids, read_manifest, resolve_manifest_path

THUMBNAIL_PX = 256
THUMBNAIL_QUALITY = 80
PAGE_SIZE = 24
# The most rows one page carries: it stays responsive at 10,000 (README). A larger manifest is shown as a sample.
MAX_ROWS = 10_000
QUERY_PAGE_SIZE = 10
SAFE_ID = re.compile(r"[0-9A-Za-z_-]{2,64}")
HISTOGRAM_BINS = 20
RANK_MODELS = ("fine-tuned", "zero-shot")


@dataclass
class ReportResult:
    """What ``write_report`` wrote: the page, its size, and the thumbnails made or reused."""

    path: Path
    rows: int  # on the page
    html_bytes: int
    thumbnails_written: int
    thumbnails_reused: int
    seconds: float
    quality: dict
    total: int = 0  # in the manifest


def _common_length(a: str, b: str, limit: int, same) -> int:
    """Return the largest n <= limit with ``same(a, b, n)`` (monotone in n), by bisection on C-speed slices."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if same(a, b, middle):
            low = middle
        else:
            high = middle - 1
    return low


def negative_edit(caption: str, negative: str) -> list:
    """Return ``[prefix, suffix, middle]``: ``negative == caption[:prefix] + middle + caption[len - suffix:]`` with
    the longest common prefix and suffix (a hard negative differs from its caption by a few swapped words)."""
    limit = min(len(caption), len(negative))
    prefix = _common_length(caption, negative, limit, lambda a, b, n: a[:n] == b[:n])
    suffix = _common_length(caption, negative, limit - prefix, lambda a, b, n: n == 0 or a[-n:] == b[-n:])
    # Widen to whole words so the marked part reads as words, not fragments.
    def inside_word(text: str, at: int) -> bool:  # characters at-1 and at are both part of one word
        return 0 < at < len(text) and text[at - 1].isalnum() and text[at].isalnum()

    while prefix > 0 and (inside_word(caption, prefix) or inside_word(negative, prefix)):
        prefix -= 1
    while suffix > 0 and (inside_word(caption, len(caption) - suffix) or inside_word(negative, len(negative) - suffix)):
        suffix -= 1
    return [prefix, suffix, negative[prefix:len(negative) - suffix]]


def _url(layout: OutputLayout, path: str | None) -> str | None:
    """Return the URL of a manifest path as seen from ``OUT/report/``: relative under OUT, else a file:// URI."""
    if not path:
        return None
    if not path.startswith("/") and "\\" not in path and ".." not in path.split("/"):
        return "../" + quote(path)  # the common case, without a filesystem call or Path object per path (~7 a row)
    try:
        absolute = resolve_manifest_path(layout, path)
    except PathEscapeError:
        return None
    if absolute is None:
        return None
    try:
        return "../" + quote(absolute.relative_to(layout.root).as_posix())
    except ValueError:
        return absolute.as_uri()


def _thumbnail_jpeg(source: str, max_side: int, long_side: int) -> bytes | None:
    """Return JPEG bytes of the image file ``source`` as displayed (EXIF orientation applied), shrunk to fit
    ``max_side`` and never enlarged; None when it cannot be read. ``long_side``: its long side (0: unknown)."""
    import cv2
    import numpy as np
    from PIL import Image

    from pipelines.steps.images import REDUCED_COLOR, load_rgb, thumbnail_size

    try:
        path = source_file(source)
        if not path.is_file():  # a FIFO or device named .jpg would block or never end: no thumbnail
            return None
        # OpenCV decodes a JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling): the smallest that still covers max_side.
        # About 3x faster than PIL's draft + thumbnail.
        factor = next((f for f in (8, 4, 2) if -(-long_side // f) >= max_side), 1)
        flag = REDUCED_COLOR[factor]
        data = np.fromfile(path, np.uint8)
        # JPEGs only: OpenCV's libpng prints its errors on stderr (a corrupt PNG of a failed row), PIL raises them.
        pixels = cv2.imdecode(data, flag) if data[:3].tobytes() == b"\xff\xd8\xff" else None
        if pixels is None:  # another format (PNG, GIF...), or a JPEG OpenCV cannot read: the pipeline's loader
            pixels = cv2.cvtColor(load_rgb(path, max_pixels=Image.MAX_IMAGE_PIXELS, data=data.tobytes()),
                                  cv2.COLOR_RGB2BGR)
        size = thumbnail_size(pixels.shape[1], pixels.shape[0], max_side)
        if size != (pixels.shape[1], pixels.shape[0]):
            pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        encoded, data = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
        return data.tobytes() if encoded else None
    except Exception:  # noqa: BLE001 - an unreadable image (often a failed row) simply gets no thumbnail
        return None


_MAKE = object()  # ``_Thumbnails._known``: a thumbnail to write


class _Thumbnails:
    """Makes (or finds) the thumbnail of each image; bytes are reused for rows that share a source file."""

    def __init__(self, layout: OutputLayout, max_side: int):
        self.layout, self.max_side = layout, max_side
        self.written = self.reused = 0
        self._by_source: dict[str, bytes | None] = {}
        self._count = threading.Lock()

    def urls(self, rows: list[dict]) -> list[str | None]:
        """Return :meth:`url` of each row. Rows whose thumbnail is already written (every earlier row of a re-run) are
        answered here; the others are made on every usable core (OpenCV's decode and encode release the GIL). A
        future per row cost ~0.1 ms of this process's CPU: 10+ s for a 100,000-row catalogue that gained 20 images."""
        found = [self._known(row) for row in rows]
        missing = [n for n, url in enumerate(found) if url is _MAKE]
        if missing:
            with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
                for n, url in zip(missing, pool.map(self._make, [rows[n] for n in missing])):
                    found[n] = url
        return found

    def url(self, row: dict) -> str | None:
        """Return the URL (relative to ``OUT/report/``) of the row's image as the page shows it: the image itself
        when small and under OUT, else its thumbnail, written now if it is not yet; None when there is no image."""
        found = self._known(row)
        return self._make(row) if found is _MAKE else found

    def _target(self, row: dict) -> Path:
        image_id = str(row["image_id"])
        if not SAFE_ID.fullmatch(image_id):  # a hand-made manifest's id must not steer the write out of report/
            image_id = content_key("thumbnail", image_id, length=IMAGE_ID_LENGTH)
        return self.layout.report_thumbnail(image_id)

    def _link(self, target: Path) -> str:
        return quote(target.relative_to(self.layout.report_dir).as_posix())

    def _known(self, row: dict):
        """``url`` when nothing is to be written (no source, a small image under OUT, a thumbnail written before);
        else ``_MAKE``."""
        source = row.get("source_path")
        if not source:
            return None
        width, height = row.get("width") or 0, row.get("height") or 0
        # Only a small image can be linked as it is: the others skip the resolve (a few syscalls each).
        under_out = self._under_out(source) if 0 < max(width, height) <= self.max_side else None
        if under_out is not None:
            return "../" + quote(under_out)
        target = self._target(row)
        if not target.is_file():
            return _MAKE
        with self._count:
            self.reused += 1
        return self._link(target)

    def _make(self, row: dict) -> str | None:
        """Write the row's thumbnail (bytes shared by rows of one source file); its URL, None if unreadable."""
        source = str(row["source_path"])
        if source not in self._by_source:
            width, height = row.get("width") or 0, row.get("height") or 0
            self._by_source[source] = _thumbnail_jpeg(source, self.max_side, max(width, height))
        data = self._by_source[source]
        if data is None:
            return None
        target = self._target(row)
        atomic_write_bytes(target, data, durable=False)  # a lost thumbnail is simply made again
        with self._count:
            self.written += 1
        return self._link(target)

    def _under_out(self, source: str) -> str | None:
        try:
            return Path(source).resolve().relative_to(self.layout.root).as_posix()
        except (ValueError, OSError):
            return None


def _score(value: object) -> float | None:
    try:
        score = float(value)
    except (TypeError, ValueError):
        return None
    return round(score, 3) if math.isfinite(score) else None


def explorer_row(row: dict, *, layout: OutputLayout, image_url: str | None) -> dict:
    """Return one manifest row in the page's compact form (short keys; region boxes and crops as arrays)."""
    caption, filtered = row.get("caption"), row.get("filtered_caption")
    segments = []
    for segment in row.get("segments") or []:
        box = segment.get("bbox") or {}
        score = segment.get("similarity_score")
        segments.append([box.get("x1"), box.get("y1"), box.get("x2"), box.get("y2"),
                         _url(layout, segment.get("crop_path")), _url(layout, segment.get("structure_crop_path")),
                         segment.get("caption"), _score(score)])
    scores = [s[7] for s in segments if s[7] is not None]
    return {
        "i": row["image_id"], "st": row.get("status"), "e": row.get("error"), "sp": row.get("split"),
        "w": row.get("width"), "h": row.get("height"), "src": row.get("source_path"), "img": image_url,
        "map": _url(layout, row.get("structure_path")), "scr": _url(layout, row.get("scribble_path")),
        "c": caption,
        # 1 = same as the caption (nothing removed), so long unchanged captions are not embedded twice.
        "fc": 1 if filtered is not None and filtered == caption else filtered,
        "rm": [list(span) for span in removed_spans(caption, filtered)],
        "seg": segments, "best": max(scores) if scores else None,
        "neg": [negative_edit(caption, n) for n in row.get("hard_negatives") or [] if caption and n],
    }


def row_quantities(row: dict, spans: list) -> dict:
    """Return the per-image values the browser's histograms bin (None where the image is not counted): ``regions``
    (segments of an ok image), ``score`` (its best region score, 3 decimals as the page shows it), ``removed``
    (words the filter removed) and ``length`` (raw caption words). Only ok images count, as in the quality report."""
    if row.get("status") != "ok":
        return {"regions": None, "score": None, "removed": None, "length": None}
    scores = [_score(s.get("similarity_score")) for s in row.get("segments") or []]
    scores = [s for s in scores if s is not None]
    caption = row.get("caption")
    return {"regions": len(row.get("segments") or []), "score": max(scores) if scores else None,
            "removed": len(spans) if caption else None, "length": len(caption_words(caption)) if caption else None}


def histogram_edges(values: list, *, integer: bool, bins: int = HISTOGRAM_BINS) -> list[float]:
    """Return bin edges for ``values``: bin i holds ``edges[i] <= v < edges[i + 1]``, the last bin also its right edge.
    Integer quantities get one bin per value while the range is short, else equal bins on whole numbers."""
    present = [v for v in values if v is not None]
    if not present:
        return []
    low, high = min(present), max(present)
    if integer:
        step = max(1, math.ceil((high - low + 1) / bins))
        count = math.ceil((high - low + 1) / step)
        return [float(low + i * step) for i in range(count + 1)]
    if low == high:
        low, high = low - 0.5, high + 0.5
    width = (high - low) / bins
    return [round(low + i * width, 6) for i in range(bins)] + [high]


def _relative_url(report_dir: Path, target: Path) -> str:
    try:
        return quote(Path(os.path.relpath(target, report_dir)).as_posix())
    except ValueError:  # another drive (Windows): no relative path exists
        return target.as_uri()


def _flat_config(path: Path) -> dict:
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    flat: dict = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value

    walk("", document)
    return flat


def config_differences(this: Path, other: Path) -> list[list]:
    """Return ``[[key, this value, other value], ...]`` for the keys whose values differ between two config files."""
    a, b = _flat_config(this), _flat_config(other)
    return [[key, a.get(key), b.get(key)] for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def rank_by_image(rankings: dict | None) -> dict[str, list]:
    """Return ``{image_id: [fine-tuned rank, zero-shot rank]}`` (t2i: the rank of an image for its own caption)."""
    if not rankings or not rankings.get("models"):
        return {}
    ids = rankings.get("image_ids") or []
    result: dict[str, list] = {}
    for slot, model in enumerate(RANK_MODELS):
        ranks = (rankings["models"].get(model) or {}).get("ranks") or []
        for image_id, rank in zip(ids, ranks):
            result.setdefault(image_id, [None] * len(RANK_MODELS))[slot] = rank
    return result


def _projection(points, method: str):
    import numpy as np

    if method == "umap":
        import umap  # optional: umap-learn

        return umap.UMAP(n_components=2, random_state=0).fit_transform(points)
    centred = points - points.mean(axis=0, keepdims=True)
    # The top two eigenvectors of the (E, E) covariance: ~100x faster than an SVD of the (N, E) matrix at 10,000 x 512.
    _, vectors = np.linalg.eigh(centred.T @ centred)
    return centred @ vectors[:, ::-1][:, :2]


def embedding_map(path: Path, row_index: dict[str, int]) -> dict | None:
    """Return the 2-D maps of ``eval/embeddings.npz``: the image, structure-map and caption embeddings of each model
    (fine-tuned first), each kind projected on its own (PCA, or UMAP when installed: a joint projection of CLIP
    embeddings mostly shows the gap between modalities, not which images are alike) and scaled to [0, 1]; None
    without the file. ``rows`` are the explorer row indices of the images (those not among the page's rows, absent
    from the manifest or beyond the page's sample, are left out and counted in ``not_in_manifest``);
    ``points[model][kind]`` is ``[[x, y], ...]`` in the same order."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as stored:
            models = sorted((str(m) for m in stored["models"]), key=lambda m: m != "fine-tuned")
            ids = [str(i) for i in stored["image_ids"]]
            blocks = {(model, kind): stored[f"{model}/{kind}"].astype(np.float32) for model in models
                      for kind in ("image", "structure", "text") if f"{model}/{kind}" in stored.files}
            has_structure = stored["has_structure"].tolist() if "has_structure" in stored.files else None
            split = str(stored["split"]) if "split" in stored.files else None
    except (OSError, ValueError, KeyError, IndexError):
        return None
    keep = [i for i, image_id in enumerate(ids) if image_id in row_index]
    if not keep or not blocks:
        return None
    try:
        import umap  # noqa: F401

        method = "umap" if len(ids) >= 10 else "pca"  # UMAP's neighbour graph needs more than a handful of points
    except ImportError:
        method = "pca"
    points: dict[str, dict] = {}
    for (model, kind), block in blocks.items():
        coords = np.asarray(_projection(block[keep], method), dtype=np.float64)
        if coords.shape[1] < 2:
            coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        low, span = coords.min(axis=0), np.ptp(coords, axis=0)
        # 3 decimals: about a thousandth of the map's width, and a third of the JSON of full floats.
        points.setdefault(model, {})[kind] = np.round((coords - low) / np.where(span > 0, span, 1.0), 3).tolist()
    return {"models": list(points), "method": method, "split": split, "rows": [row_index[ids[i]] for i in keep],
            "not_in_manifest": len(ids) - len(keep),
            "has_structure": None if has_structure is None else [bool(has_structure[i]) for i in keep],
            "points": points}


def compared_run(layout: OutputLayout, other_dir: str | os.PathLike, ids: set[str]) -> dict:
    """Return another run's data for the page: its rows for the image ids ``ids`` (this page's rows; maps and crops
    referenced relative to this page), how many of its images this run lacks, its metrics, ranks per image and the
    config keys that differ from this run's."""
    import pyarrow.compute as pc

    other = OutputLayout(other_dir)
    there = read_manifest(other.root, columns=["image_id"]).column("image_id")
    here = read_manifest(layout.root, columns=["image_id"]).column("image_id")
    by_id = {}
    for row in manifest_rows_with_ids(other.root, ids):
        compact = explorer_row(row, layout=other, image_url=None)
        for key in ("map", "scr"):
            if compact[key] and compact[key].startswith("../"):
                compact[key] = _relative_url(layout.report_dir, other.root / unquote(compact[key][3:]))
        # The page draws another run's boxes and scores over this run's thumbnail: its crops and sentences stay out
        # (they would nearly double the page at 10,000 rows).
        compact["seg"] = [[*segment[:4], None, None, None, segment[7]] for segment in compact["seg"]]
        for key in ("c", "src", "neg", "w", "h", "i", "rm", "e", "sp", "img"):
            compact.pop(key, None)
        by_id[row["image_id"]] = compact
    return {
        "label": other.root.name, "path": str(other.root), "rows": by_id,
        "only_there": int(pc.sum(pc.invert(pc.is_in(there, value_set=here.combine_chunks()))).as_py() or 0),
        "eval": _read_json(other.eval_metrics), "ranks": rank_by_image(_read_json(other.eval_rankings)),
        "config": config_differences(layout.config_record, other.config_record),
    }


def read_training_rows(path: str | os.PathLike) -> list[dict]:
    """Return ``metrics.jsonl`` rows, one per step (the last record of a step wins: a resumed run rewrites it)."""
    by_step: dict = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _finite(value: object) -> object:
    """Return ``value`` with NaN/inf floats (a skipped step's loss) replaced by None, which JSON can carry."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _script_json(value: object) -> str:
    """JSON safe inside a <script> element: no ``</script>``, ``<!--`` or entity can end or alter it. NaN/inf become
    null (``_finite``), walked only when the value holds one: the page's 10,000 rows are dumped as they are."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere
        text = json.dumps(_finite(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _asset(name: str) -> str:
    return resources.files("pipelines.reporting").joinpath("report_assets", name).read_text(encoding="utf-8")


def shown_rows(root: str | os.PathLike, max_rows: int, first: set[str] = frozenset()) -> tuple[list[dict], int]:
    """Return ``(rows, total)``: every manifest row when there are at most ``max_rows``, else ``max_rows`` of them:
    those whose image id is in ``first`` (the evaluated images), then the failed ones, then the rest, each group cut
    to the smallest image ids when it does not fit (an id is a content hash: an unbiased sample, which a run that
    adds images changes only by the images it adds, so the page's thumbnails stay made); rows in manifest order.
    Chosen from two columns, then read a batch at a time: a million-row manifest costs the page no more memory than
    the rows it shows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    total = manifest_row_count(root)
    if total <= max_rows:
        return read_manifest(root).to_pylist(), total
    index = read_manifest(root, columns=["image_id", "status"])
    ids = index.column("image_id")
    first_mask = pc.is_in(ids, value_set=pa.array(sorted(first), pa.string())).to_numpy(zero_copy_only=False)
    failed = pc.fill_null(pc.not_equal(index.column("status"), "ok"), True).to_numpy(zero_copy_only=False)
    by_id = pc.sort_indices(ids).to_numpy()
    chosen, room = [], max_rows
    for group in (first_mask, failed & ~first_mask, ~failed & ~first_mask):
        picked = by_id[group[by_id]][:room]
        chosen.append(picked)
        room -= len(picked)
    return manifest_rows_with_ids(root, ids.take(pa.array(np.concatenate(chosen)))), total


def write_report(
    out_dir: str | os.PathLike,
    *,
    vocab_dir: str | os.PathLike | None = None,
    thumbnail_px: int = THUMBNAIL_PX,
    max_edge_maps: int = 2000,
    page_size: int = PAGE_SIZE,
    max_rows: int = MAX_ROWS,
    title: str | None = None,
    compare: list[str | os.PathLike] | tuple = (),
) -> ReportResult:
    """Write ``OUT/report/index.html`` (and its thumbnails) for the output folder ``out_dir``; return what it wrote.

    ``vocab_dir``: the filter's vocabulary, to split removed words by category (the ``filter.remove_*`` flags).
    ``compare``: other output folders of the same images, shown beside this run (their rows, metrics and config).
    ``max_rows``: the most images the page carries (:func:`shown_rows` chooses them); the quality report and plots
    always count every row.
    """
    started = time.perf_counter()
    layout = OutputLayout(out_dir)
    rankings = _read_json(layout.eval_rankings)
    ranks = rank_by_image(rankings)
    rows, total = shown_rows(layout.root, max_rows, set(ranks))
    thumbnails = _Thumbnails(layout, thumbnail_px)
    explorer_rows = [explorer_row(row, layout=layout, image_url=url) for row, url in zip(rows, thumbnails.urls(rows))]
    quality = output_quality_report(layout.root, vocab_dir=vocab_dir, max_edge_maps=max_edge_maps)
    training_rows = read_training_rows(layout.train_metrics)
    training_png = training_curves_png(training_rows)
    quantities = [row_quantities(row, r["rm"]) for row, r in zip(rows, explorer_rows)]
    histograms = {}
    for name, label, integer in (("score", "best region similarity score", False),
                                 ("regions", "regions per image", True),
                                 ("removed", "words removed by the filter", True),
                                 ("length", "caption length (words)", True)):
        values = [q[name] for q in quantities]
        histograms[name] = {"label": label, "integer": integer, "values": values,
                            "edges": histogram_edges(values, integer=integer)}
    position = {row["i"]: index for index, row in enumerate(explorer_rows)}
    for image_id, image_ranks in ranks.items():
        if image_id in position:
            explorer_rows[position[image_id]]["rk"] = image_ranks
    metrics = _read_json(layout.eval_metrics)
    ids = {row["image_id"] for row in rows}
    data = {
        "rows": explorer_rows,
        "page_size": page_size,
        "query_page_size": QUERY_PAGE_SIZE,
        "quality": quality,
        "plots": {name: png_data_uri(png) for name, png in quality_plots(quality).items()},
        "training": None if training_png is None else {
            "plot": png_data_uri(training_png), "last": training_rows[-1],
            "epochs": len({r.get("epoch") for r in training_rows}),
        },
        "eval": metrics,
        "recall_plot": png_data_uri(recall_png(metrics)) if metrics else None,
        "rankings": rankings,
        "hist": histograms,
        "run": {"label": layout.root.name, "path": str(layout.root)},
        "compare": [compared_run(layout, other, ids) for other in compare],
    }
    title = title or f"StructXLIP report: {layout.root.name}"
    shown = (f"{len(rows)} images" if len(rows) >= total else
             f"{len(rows):,} of {total:,} images (the evaluated and failed ones first, then a sample: the smallest "
             "image ids; the quality report counts all, the manifest holds all)")
    subtitle = (f"{shown} in {layout.root} · written "
                f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    page = _asset("index.html")
    for placeholder, value in (("__TITLE__", html.escape(title)), ("__SUBTITLE__", html.escape(subtitle)),
                               ("__CSS__", _asset("explorer.css")), ("__JS__", _asset("explorer.js"))):
        page = page.replace(placeholder, value)
    # Last, each at its own element (a title may hold placeholder text; the data may hold any text).
    embedding = _script_json(embedding_map(layout.eval_embeddings, position))
    page = page.replace('id="map-data">__MAP__<', f'id="map-data">{embedding}<', 1)
    page = page.replace('id="report-data">__DATA__<', f'id="report-data">{_script_json(data)}<', 1)
    atomic_write_text(layout.report_index, page)
    return ReportResult(path=layout.report_index, rows=len(rows), html_bytes=len(page.encode("utf-8")),
                        thumbnails_written=thumbnails.written, thumbnails_reused=thumbnails.reused,
                        seconds=time.perf_counter() - started, quality=quality, total=total)


def refresh_explorer(layout: OutputLayout, summaries: list[dict], *, vocab_dir: str | None) -> str | None:
    """Write the explorer (``OUT/report/index.html``) at the end of a pipeline run when the run changed anything or
    the explorer is missing; return its path (None without a manifest). A report error never fails the run."""
    if not any(layout.manifest_dir.glob("*.parquet")):
        return None
    index = layout.report_index
    if index.is_file() and not any(s.get("processed") for s in summaries):
        return str(index)
    try:
        return str(write_report(layout.root, vocab_dir=vocab_dir).path)
    except Exception as exc:  # noqa: BLE001
        logging.getLogger("structxlip.report").warning("could not write the explorer: %s", exc)
        return str(index) if index.is_file() else None

"""Pure builders of what the pipeline shows people: stage summary rows, failure tables, thumbnails, galleries (markdown
with embedded PNG thumbnails), retrieval tables; the plots are ``pipelines.reporting.report_plots``. No Prefect here: ``flows.artifacts`` publishes them.
Artifact keys are stable (``<stage>-summary``, ``<stage>-gallery``, ``train-loss``, ``eval-recall`` ...) so the UI
lines up versions of the same artifact across runs.
"""


from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from storage.layout import OutputLayout

MAX_FAILURE_ROWS = 50
THUMBNAIL_PX = 112
# The gallery's image column: region boxes and their numbers must be readable in the Prefect UI.
IMAGE_PX = 256
# Thumbnails live inside the artifact (the server's database), so the whole gallery has a byte budget.
GALLERY_BUDGET_BYTES = 600_000
RECALL_KS = (1, 5, 10, 25, 50)
# Directions written by the evaluator (METHOD.md section 5), in display order.
RETRIEVAL_DIRECTIONS = ("t2i", "i2t", "s2t", "t2s", "ts2i")
_RANK_METRICS = ("mean_rank", "median_rank")


# ---- keys -----------------------------------------------------------------------------------------------------------
def artifact_key(*parts: str) -> str:
    """Return a Prefect artifact key (lowercase letters, digits and dashes) joining ``parts``: ``structure-summary``."""
    key = "-".join(re.sub(r"[^a-z0-9]+", "-", str(part).lower()).strip("-") for part in parts)
    key = re.sub(r"-{2,}", "-", key).strip("-")
    if not key:
        raise ValueError(f"expected artifact key parts with letters or digits, got {parts!r}")
    return key


# ---- stage summary --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSummary:
    """Counts, throughput and capped failure list of one stage in one run."""

    stage: str
    processed: int  # computed in this run and succeeded
    cached: int  # already done by an earlier run (skipped)
    failed: int
    seconds: float
    failures: list[dict] = field(default_factory=list)  # [{"file", "reason"}], at most MAX_FAILURE_ROWS

    @property
    def total(self) -> int:
        return self.processed + self.cached + self.failed

    @property
    def items_per_second(self) -> float | None:
        """Items attempted in this run (processed + failed) per second of stage wall time; None without a duration."""
        if self.seconds <= 0:
            return None
        return (self.processed + self.failed) / self.seconds


def summary_rows(summary: StageSummary) -> list[dict]:
    """Return the one-row table of a stage summary: stage, processed, cached, failed, total, seconds, items_per_s."""
    rate = summary.items_per_second
    return [
        {
            "stage": summary.stage,
            "processed": summary.processed,
            "cached": summary.cached,
            "failed": summary.failed,
            "total": summary.total,
            "seconds": round(summary.seconds, 3),
            "items_per_s": None if rate is None else round(rate, 3),
        }
    ]


def failure_rows(summary: StageSummary) -> list[dict]:
    """Return the failure table (file, reason), with a last row counting failures left out by the cap."""
    rows = [dict(row) for row in summary.failures]
    hidden = summary.failed - len(rows)
    if hidden > 0:
        rows.append({"file": f"... {hidden} more", "reason": "not listed (capped)"})
    return rows


def progress_percent(done: int, total: int) -> float:
    """Return ``done / total`` as a percentage in [0, 100] (100 for an empty stage)."""
    if total < 0 or done < 0:
        raise ValueError(f"expected done >= 0 and total >= 0, got done={done}, total={total}")
    if total == 0:
        return 100.0
    return min(100.0, 100.0 * done / total)


# ---- thumbnails and gallery -----------------------------------------------------------------------------------------
def thumbnail_png(image: np.ndarray | str | os.PathLike, max_side: int = THUMBNAIL_PX) -> bytes:
    """Return PNG bytes of ``image`` (uint8 (H, W) grey or (H, W, 3) RGB array, or a file) shrunk to ``max_side``.

    Images are never enlarged; RGB thumbnails are palette-quantised (128 colours) to keep the gallery small.
    """
    from PIL import Image

    from pipelines.steps.images import no_bomb_warnings

    if isinstance(image, (str, os.PathLike)):
        with no_bomb_warnings(), Image.open(image) as handle:
            picture = handle.convert("L" if handle.mode in ("L", "1", "I;16", "I") else "RGB")
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
            raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) array, got {array.dtype} {array.shape}")
        picture = Image.fromarray(array)
    width, height = picture.size
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != picture.size:
        # BOX (area) filter: thin edge strokes fade to grey instead of vanishing between samples.
        picture = picture.resize(size, Image.Resampling.BOX)
    if picture.mode == "RGB":
        picture = picture.quantize(colors=128)
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    """Return a ``data:image/png;base64,...`` URI of PNG bytes (the Prefect UI renders these in markdown)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return "&mdash;"
    return f'<img src="{png_data_uri(png)}" alt="{html.escape(alt, quote=True)}"/>'


def _cell(text: Any, limit: int = 160) -> str:
    """Escape a value (a caption or file name: untrusted) for one markdown table cell and shorten long text: no
    links, images, HTML, emphasis or table breaks survive (``storage.markdown.escape_markdown``)."""
    from storage.markdown import escape_markdown

    value = "" if text is None else " ".join(str(text).split())
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return escape_markdown(value)


def boxes_image(path: str | os.PathLike, boxes: list[dict]) -> np.ndarray:
    """Return the RGB image at ``path`` with each ``bbox`` dict (original pixels) drawn as a numbered rectangle."""
    import cv2
    from PIL import Image, ImageOps

    from pipelines.steps.images import no_bomb_warnings

    with no_bomb_warnings(), Image.open(path) as handle:  # the pipeline's max_pixels let it in
        rgb = np.array(ImageOps.exif_transpose(handle).convert("RGB"))
    thickness = max(2, round(max(rgb.shape[:2]) / 160))
    for number, box in enumerate(boxes, start=1):
        colour = BOX_COLOURS[(number - 1) % len(BOX_COLOURS)]
        x1, y1, x2, y2 = (int(round(float(box[k]))) for k in ("x1", "y1", "x2", "y2"))
        cv2.rectangle(rgb, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thickness)
        cv2.putText(rgb, str(number), (x1 + thickness, y1 + 10 * thickness), cv2.FONT_HERSHEY_SIMPLEX,
                    thickness / 3, colour, max(1, thickness // 2))
    return rgb


BOX_COLOURS = ((255, 40, 40), (40, 200, 255), (255, 200, 0), (80, 255, 80), (255, 80, 255), (255, 140, 0))


def _thumb_of(layout: OutputLayout, relative: str | None, max_side: int, absolute: bool = False,
              boxes: list[dict] | None = None) -> bytes | None:
    """Thumbnail of a manifest path (relative to the output folder, or absolute for ``source_path``), with ``boxes``
    drawn when given; None if absent."""
    if not relative:
        return None
    path = Path(relative) if absolute else layout.resolve(relative)
    if path is None or not path.is_file():
        return None
    try:
        return thumbnail_png(boxes_image(path, boxes) if boxes else path, max_side)
    except (OSError, ValueError):
        # An unreadable file must not fail the run's report: the gallery shows a dash instead.
        return None


def gallery_markdown(
    out_dir: str | os.PathLike,
    rows: Iterable[dict],
    *,
    title: str = "Examples",
    max_images: int = 4,
    max_segments: int = 3,
    thumbnail_px: int = THUMBNAIL_PX,
    budget_bytes: int = GALLERY_BUDGET_BYTES,
) -> str:
    """Return a markdown gallery of manifest/stage ``rows``: image, structure and scribble thumbnails per image, then
    its top segments (RGB crop, structure crop, local caption, similarity_score), all embedded as base64 PNGs.

    Rows with ``status == "failed"`` are skipped; images stop being added once the markdown exceeds ``budget_bytes``.
    """
    layout = OutputLayout(out_dir)
    rows = list(rows)
    sections: list[str] = []
    used = 0
    shown = 0
    for row in rows:
        if shown >= max_images:
            break
        if row.get("status") == "failed":
            continue
        section = _gallery_section(layout, row, max_segments=max_segments, thumbnail_px=thumbnail_px)
        if shown > 0 and used + len(section) > budget_bytes:
            break
        sections.append(section)
        used += len(section)
        shown += 1
    header = f"# {_cell(title)}\n\n"
    if not sections:
        return header + "_No successfully processed images to show._\n"
    scored = any(seg.get("similarity_score") is not None for row in rows for seg in row.get("segments") or [])
    note = f"\n\n{SIMILARITY_NOTE}" if scored else ""
    return (header + f"{shown} example image(s); thumbnails at most {thumbnail_px} px.{note}\n\n"
            + "\n".join(sections))


SIMILARITY_NOTE = ("`similarity_score` is the CLIP logit 100 x cos(crop, sentence): about 15-30 for a good match "
                   "with a trained CLIP (METHOD.md), near 0 with a random tiny model. Regions are ranked by it.")


def _gallery_section(layout: OutputLayout, row: dict, *, max_segments: int, thumbnail_px: int,
                     image_px: int = IMAGE_PX) -> str:
    image_id = str(row.get("image_id") or "")
    name = Path(str(row.get("source_path") or image_id)).name
    proposed = row.get("segments") is not None  # None: regions not proposed yet (structure stage)
    segments = list(row.get("segments") or [])
    # Highest similarity first: the segments the local loss will use (METHOD.md: ranked by similarity_score).
    segments.sort(key=lambda s: -_score(s.get("similarity_score")))
    shown = segments[:max_segments]
    best = max((_score(s.get("similarity_score")) for s in segments), default=None)
    facts = ([f"{len(segments)} region(s)"] if proposed else []) + (
        [f"best score {best:.2f}"] if best not in (None, float("-inf")) else [])
    lines = [f"## {_cell(name)}", "", f"`{image_id}`" + (f" · {', '.join(facts)}" if facts else ""), ""]
    caption = row.get("filtered_caption") or row.get("caption")
    if caption:
        label = "Filtered caption" if row.get("filtered_caption") else "Caption"
        lines += [f"**{label}:** {_cell(caption, 400)}", ""]
    boxes = [s["bbox"] for s in shown if s.get("bbox")]
    # The image's maps: a stage's own images (row["maps"]: kind -> path) or the structure maps.
    maps = row.get("maps") or {"structure": row.get("structure_path"), "scribble": row.get("scribble_path")}
    lines += [
        "| image" + (" (regions numbered by score)" if boxes else "") + "".join(f" | {_cell(k)}" for k in maps) + " |",
        "|---" * (1 + len(maps)) + "|",
        "| " + " | ".join(
            [_img(_thumb_of(layout, row.get("source_path"), image_px, absolute=True, boxes=boxes), "image")]
            + [_img(_thumb_of(layout, path, thumbnail_px), f"{kind} map") for kind, path in maps.items()]) + " |",
        "",
    ]
    if shown:
        # Three narrow columns (two thumbnails and the text) so scores stay within the page width.
        lines += ["| # crop | structure crop | sentence and score |", "|---|---|---|"]
        for number, segment in enumerate(shown, start=1):
            score = segment.get("similarity_score")
            text = segment.get("filtered_caption") or segment.get("caption")
            label = (f"**{float(score):.2f}** " if score is not None else "") + (_cell(text, 90) if text else
                                                                               "_no sentence assigned yet_")
            lines.append("| {} {} | {} | {} |".format(
                number, _img(_thumb_of(layout, segment.get("crop_path"), thumbnail_px // 2 + 24), "crop"),
                _img(_thumb_of(layout, segment.get("structure_crop_path"), thumbnail_px // 2 + 24), "structure crop"),
                label))
        if len(segments) > max_segments:
            lines.append(f"\n_{len(segments) - max_segments} more region(s) not shown._")
        lines.append("")
    return "\n".join(lines)


def representative_rows(rows: list[dict], count: int = 5) -> list[dict]:
    """Return up to ``count`` ok rows that show the spread: an image without regions (if any), the worst and best
    best-region scores and evenly spaced ones between (by image id when there are no scores)."""
    seen: set = set()
    ok = []
    for row in rows:  # one row per image: duplicate files share an image id
        key = row.get("image_id") or id(row)
        if row.get("status") != "failed" and key not in seen:
            seen.add(key)
            ok.append(row)
    if len(ok) <= count:
        return ok

    def best(row):
        return max((_score(s.get("similarity_score")) for s in row.get("segments") or []), default=float("-inf"))

    # "segments" None: not proposed yet (the structure stage's gallery), which is not "without regions".
    chosen = [r for r in ok if r.get("segments") is not None and not r.get("segments")][:1]
    rest = sorted((r for r in ok if r.get("segments")), key=lambda r: (best(r), str(r.get("image_id"))))
    if not rest:
        rest = sorted((r for r in ok if r not in chosen), key=lambda r: str(r.get("image_id")))
    slots = count - len(chosen)
    if slots > 0 and rest:
        picks = sorted({round(i * (len(rest) - 1) / max(1, slots - 1)) for i in range(min(slots, len(rest)))})
        chosen += [rest[i] for i in picks]
    return chosen


def _score(value: Any) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf
    return float(value)


# ---- training and evaluation ----------------------------------------------------------------------------------------
def parse_retrieval_metrics(metrics: dict) -> dict[str, dict[str, float]]:
    """Return ``{direction: {metric: value}}`` from the evaluator's flat (``"t2i/R@1"``) or nested metrics dict."""
    table: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            for metric, inner in value.items():
                if isinstance(inner, (int, float)) and not isinstance(inner, bool):
                    table.setdefault(str(name), {})[str(metric)] = float(inner)
        elif "/" in name and isinstance(value, (int, float)) and not isinstance(value, bool):
            direction, metric = name.split("/", 1)
            table.setdefault(direction, {})[metric] = float(value)
    known = [d for d in RETRIEVAL_DIRECTIONS if d in table]
    others = sorted(d for d in table if d not in RETRIEVAL_DIRECTIONS and any(m.startswith("R@") for m in table[d]))
    return {d: table[d] for d in known + others}


def metric_groups(metrics: dict) -> list[tuple[str, dict]]:
    """``eval/metrics.json`` per model: the fine-tuned model's (its top-level keys) and, when present, the base
    model's before fine-tuning (a nested ``zero_shot`` dict, the same keys)."""
    groups = [("fine-tuned", metrics)]
    if isinstance(metrics.get("zero_shot"), dict) and metrics["zero_shot"]:
        groups.append(("zero-shot", metrics["zero_shot"]))
    return groups


def recall_rows(metrics: dict) -> list[dict]:
    """Return one table row per retrieval direction: direction, R@1/5/10/25/50, mean_rank, median_rank."""
    rows = []
    for direction, values in parse_retrieval_metrics(metrics).items():
        row: dict[str, Any] = {"direction": direction}
        for name in [f"R@{k}" for k in RECALL_KS] + list(_RANK_METRICS):
            value = values.get(name)
            row[name] = None if value is None else round(value, 4)
        rows.append(row)
    if not rows:
        raise ValueError("expected retrieval metrics like {'t2i/R@1': ...}, found no direction with recall values")
    return rows


def image_markdown(title: str, png: bytes, note: str = "") -> str:
    """Return markdown with a heading, an optional note and ``png`` embedded as a data URI image."""
    text = f"# {_cell(title)}\n\n"
    if note:
        text += f"{note}\n\n"
    return text + f"![{_cell(title)}]({png_data_uri(png)})\n"

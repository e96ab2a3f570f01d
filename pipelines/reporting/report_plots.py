"""Small PNG plots (matplotlib, Agg) of a quality report and of training metrics, for the explorer and artifacts."""

from __future__ import annotations

import io
import json
import math
from functools import lru_cache

WIDTH_IN, HEIGHT_IN, DPI = 6.4, 3.0, 100
# Margins (left, bottom, right, top; inches) of a plot whose tick labels are short numbers: fixed, because
# tight_layout lays out every text once more only to measure it (about a third of such a plot's cost).
NUMERIC_MARGINS_IN = (0.75, 0.5, 0.15, 0.35)
LOSS_PREFIX, WEIGHT_PREFIX = "loss/", "weight/"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _integer_counts(axis, which: str = "y") -> None:
    from matplotlib.ticker import MaxNLocator

    (axis.yaxis if which == "y" else axis.xaxis).set_major_locator(MaxNLocator(integer=True))


def _png(figure, *, numeric: bool = False) -> bytes:
    buffer = io.BytesIO()
    if numeric:
        width, height = figure.get_size_inches()
        left, bottom, right, top = NUMERIC_MARGINS_IN
        figure.subplots_adjust(left=left / width, bottom=bottom / height, right=1 - right / width, top=1 - top / height)
    else:
        figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    _pyplot().close(figure)
    return buffer.getvalue()


def _bars_from_histogram(axis, hist: dict, *, label: str | None = None, alpha: float = 1.0, counts=None) -> None:
    edges = hist["edges"]
    counts = hist["counts"] if counts is None else counts
    if not edges:
        axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
        return
    widths = [b - a for a, b in zip(edges, edges[1:])]
    axis.bar(edges[:-1], counts, width=widths, align="edge", alpha=alpha, label=label, edgecolor="white", linewidth=0.5)


def histogram_png(hist: dict, *, title: str, xlabel: str, ylabel: str = "count") -> bytes:
    """Return a PNG bar chart of a ``{edges, counts}`` histogram."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    _bars_from_histogram(axis, hist)
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
    _integer_counts(axis)
    return _png(figure, numeric=True)


def caption_length_png(caption_length: dict) -> bytes:
    """Return a PNG of raw and filtered caption lengths (words) as overlaid histograms."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    hist = caption_length["histogram"]
    _bars_from_histogram(axis, {"edges": hist["edges"]}, counts=hist["raw"], label="raw caption", alpha=0.6)
    _bars_from_histogram(axis, {"edges": hist["edges"]}, counts=hist["filtered"], label="filtered caption", alpha=0.6)
    axis.set(title="Caption length", xlabel="words", ylabel="images")
    _integer_counts(axis)
    axis.legend()
    return _png(figure, numeric=True)


def counts_png(counts: list[list], *, title: str, xlabel: str = "count", horizontal: bool = True) -> bytes:
    """Return a PNG bar chart of ``[[label, count], ...]`` (horizontal: first item on top)."""
    plt = _pyplot()
    height = HEIGHT_IN if not horizontal else max(HEIGHT_IN, 0.22 * len(counts) + 0.9)
    figure, axis = plt.subplots(figsize=(WIDTH_IN, height))
    labels = [str(label) for label, _ in counts]
    values = [value for _, value in counts]
    if not counts:
        axis.text(0.5, 0.5, "none", ha="center", va="center", transform=axis.transAxes)
    elif horizontal:
        axis.barh(labels[::-1], values[::-1])
        axis.set_xlabel(xlabel)
        _integer_counts(axis, "x")
    else:
        axis.bar(labels, values)
        axis.set_ylabel(xlabel)
        _integer_counts(axis)
    axis.set_title(title)
    return _png(figure, numeric=not horizontal)


def quality_plots(report: dict) -> dict[str, bytes]:
    """Return ``{name: PNG bytes}`` for a :func:`pipelines.reporting.quality.quality_report` dict.

    Equal reports are drawn once per process: a run shows the same plots in its Prefect artifact and its explorer.
    """
    return dict(_drawn_quality_plots(json.dumps(report)))  # insertion order kept: it orders the bars


@lru_cache(maxsize=1)
def _drawn_quality_plots(report_json: str) -> dict[str, bytes]:
    report = json.loads(report_json)
    plots = {
        "caption_length": caption_length_png(report["caption_length"]),
        "removed_words": counts_png(report["removed_words"]["top"], title="Words removed by the filter (top)",
                                    xlabel="occurrences"),
        "regions_per_image": counts_png(sorted(report["regions_per_image"]["counts"].items(), key=lambda kv: int(kv[0])),
                                        title="Regions per image", xlabel="images", horizontal=False),
        "similarity_score": histogram_png(report["similarity_score"]["histogram"],
                                          title="Region similarity score (100 * cos)", xlabel="similarity_score",
                                          ylabel="regions"),
        "image_size": histogram_png(report["image_size"]["long_side_histogram"], title="Image size (long side)",
                                    xlabel="pixels", ylabel="images"),
        "edge_density": histogram_png(report["edge_density"]["histogram"], title="Structure-map edge density",
                                      xlabel="fraction of edge pixels", ylabel="images"),
    }
    if report["failures"]["count"]:
        plots["failures"] = counts_png(list(report["failures"]["by_stage"].items()), title="Failures by stage",
                                       xlabel="images")
    return plots


def recall_groups(metrics: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Return ``{model: {direction: {metric: value}}}`` of ``eval/metrics.json`` (``render.metric_groups``: the
    fine-tuned model, and the zero-shot base model when evaluated)."""
    from pipelines.reporting.render import metric_groups, parse_retrieval_metrics

    return {name: parsed for name, values in metric_groups(metrics) if (parsed := parse_retrieval_metrics(values))}


def recall_png(metrics: dict, *, k: int = 1) -> bytes:
    """Return a PNG of R@``k`` per retrieval direction, zero-shot and fine-tuned bars side by side."""
    from pipelines.reporting.render import RETRIEVAL_DIRECTIONS

    plt = _pyplot()
    groups = recall_groups(metrics)
    directions = [d for d in RETRIEVAL_DIRECTIONS if any(f"R@{k}" in g.get(d, {}) for g in groups.values())]
    figure, axis = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN))
    if not directions:
        axis.text(0.5, 0.5, "no recall metrics", ha="center", va="center", transform=axis.transAxes)
    names = [name for name in ("zero-shot", "fine-tuned") if name in groups]
    width = 0.8 / max(1, len(names))
    for offset, name in enumerate(names):
        positions = [i + (offset - (len(names) - 1) / 2) * width for i in range(len(directions))]
        values = [groups[name].get(d, {}).get(f"R@{k}", 0.0) for d in directions]
        axis.bar(positions, values, width, label=name)
    axis.set_xticks(range(len(directions)), directions)
    axis.set(title=f"Retrieval R@{k}", ylabel="recall (%)")
    if names:
        axis.legend(fontsize=8)
    return _png(figure)


def training_curves_png(rows: list[dict]) -> bytes | None:
    """Return a PNG of training metrics (``metrics.jsonl`` rows): losses, loss weights and learning rate on separate
    axes over steps, epoch boundaries dashed; None without rows."""
    rows = [r for r in rows if isinstance(r.get("step"), (int, float))]
    if not rows:
        return None
    plt = _pyplot()
    figure, (losses, weights, lr) = plt.subplots(3, 1, figsize=(WIDTH_IN, 2.4 * 3), sharex=True,
                                                 gridspec_kw={"height_ratios": [2, 1, 1]})
    steps = [r["step"] for r in rows]

    def series(key: str) -> list[float]:
        return [float(r[key]) if isinstance(r.get(key), (int, float)) else math.nan for r in rows]

    if any("loss" in r for r in rows):
        losses.plot(steps, series("loss"), label="total", color="black", linewidth=1.5)
    loss_keys = sorted({k for r in rows for k in r if k.startswith(LOSS_PREFIX)})
    for key in loss_keys:
        losses.plot(steps, series(key), label=key[len(LOSS_PREFIX):], linewidth=1)
    losses.set(title="Training", ylabel="loss")
    for key in sorted({k for r in rows for k in r if k.startswith(WEIGHT_PREFIX)}):
        weights.plot(steps, series(key), label=key[len(WEIGHT_PREFIX):], linewidth=1)
    weights.set_ylabel("loss weight")
    lr.plot(steps, series("lr"), color="tab:purple", linewidth=1)
    lr.set(ylabel="learning rate", xlabel="step")
    boundaries = [b["step"] for a, b in zip(rows, rows[1:]) if b.get("epoch") != a.get("epoch")]
    for axis in (losses, weights, lr):
        for step in boundaries:
            axis.axvline(step - 0.5, color="grey", linestyle="--", linewidth=0.7)
    for axis in (losses, weights):
        if axis.lines:
            axis.legend(fontsize=7, loc="best", ncol=2)
    return _png(figure)

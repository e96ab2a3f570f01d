"""Publishing the pipeline's Prefect artifacts: stage summaries and failures, progress, galleries, loss and recall
plots. The content is built by the pure functions of ``pipelines.reporting.render``; these thin wrappers send it to the API.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable
from uuid import UUID

from pipelines.reporting.render import (
    MAX_FAILURE_ROWS,
    StageSummary,
    artifact_key,
    failure_rows,
    gallery_markdown,
    image_markdown,
    metric_groups,
    progress_percent,
    recall_rows,
    representative_rows,
    summary_rows,
)
from storage.layout import OutputLayout


# ---- namespaces -----------------------------------------------------------------------------------------------------
def artifact_namespace(images_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Return the key prefix of one dataset + output folder (``<images>-<out>-<hash of OUT>``): two datasets or two
    output folders never share an artifact history, and the same folder's runs line up in the UI."""
    from storage.hashing import content_key

    images, out = Path(images_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    return artifact_key(images.name[:20] or "images", out.name[:20] or "out", content_key(str(out), length=6))


def _where(images_dir: str | os.PathLike | None, out_dir: str | os.PathLike) -> str:
    source = f" from `{images_dir}`" if images_dir else ""
    return f"{source} into `{out_dir}`"


# ---- publishing (Prefect) -------------------------------------------------------------------------------------------
def publish_stage_summary(summary: StageSummary, *, namespace: str = "", where: str = "") -> dict[str, UUID]:
    """Create the ``<namespace>-<stage>-summary`` table (and ``-failures`` when any item failed); return their ids."""
    from prefect.artifacts import create_table_artifact

    ids = {
        "summary": create_table_artifact(
            table=summary_rows(summary),
            key=artifact_key(namespace, summary.stage, "summary"),
            description=f"Stage `{summary.stage}`{where}: items processed, cached (reused), failed (this run's and "
                        "cached failures) and throughput.",
        )
    }
    if summary.failed:
        ids["failures"] = create_table_artifact(
            table=failure_rows(summary),
            key=artifact_key(namespace, summary.stage, "failures"),
            description=f"Stage `{summary.stage}`{where}: failed items and why (first {MAX_FAILURE_ROWS}).",
        )
    return ids


# (flow run id, key) -> progress artifact id: the artifact is created once per run and then updated in place.
_progress_artifacts: dict[tuple[str | None, str], UUID] = {}


def stage_progress(stage: str, done: int, total: int, *, namespace: str = "") -> UUID:
    """Create (first call in a flow run) or update the ``<namespace>-<stage>-progress`` artifact to ``done / total``."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run_id = str(context.flow_run.id) if context is not None and context.flow_run is not None else None
    key = artifact_key(namespace, stage, "progress")
    percent = progress_percent(done, total)
    description = f"Stage `{stage}`: {done} of {total} items done."
    artifact_id = _progress_artifacts.get((run_id, key))
    if artifact_id is None:
        artifact_id = create_progress_artifact(progress=percent, key=key, description=description)
        _progress_artifacts[(run_id, key)] = artifact_id
    else:
        update_progress_artifact(artifact_id=artifact_id, progress=percent, description=description)
    return artifact_id


def publish_gallery(stage: str, out_dir: str | os.PathLike, rows: Iterable[dict], *, namespace: str = "",
                    where: str = "", **options: Any) -> UUID:
    """Create the ``<namespace>-<stage>-gallery`` markdown of representative rows (see ``representative_rows``)."""
    from prefect.artifacts import create_markdown_artifact

    chosen = representative_rows(list(rows), options.pop("max_images", 5))
    markdown = gallery_markdown(out_dir, chosen, title=f"{stage}: examples", max_images=len(chosen) or 1, **options)
    return create_markdown_artifact(
        markdown=markdown,
        key=artifact_key(namespace, stage, "gallery"),
        description=f"Stage `{stage}`{where}: representative images of those this run computed (no region, worst and "
                    "best scores) with their structure maps, numbered regions, crops, sentences and similarity scores.",
    )


def publish_training(out_dir: str | os.PathLike, *, namespace: str = "", where: str = "") -> UUID | None:
    """Create the ``<namespace>-train-loss`` markdown (losses, loss weights and LR on separate axes, epoch
    boundaries) from OUT/train/metrics.jsonl; None if absent."""
    from prefect.artifacts import create_markdown_artifact

    from pipelines.reporting.report import read_training_rows
    from pipelines.reporting.report_plots import LOSS_PREFIX, training_curves_png

    path = OutputLayout(out_dir).train_metrics
    rows = read_training_rows(path) if path.is_file() else []
    if not rows:  # (no step logged yet)
        return None
    png = training_curves_png(rows)
    last = ", ".join(f"{name} {value:.4f}" for name, value in sorted(rows[-1].items())
                     if (name == "loss" or name.startswith(LOSS_PREFIX)) and isinstance(value, (int, float))
                     and not isinstance(value, bool))
    return create_markdown_artifact(
        markdown=image_markdown("Training", png, note=f"{len(rows)} logged steps. Last values: {last}."),
        key=artifact_key(namespace, "train-loss"),
        description=f"Training{where}: each StructXLIP loss term, the scheduled loss weights and the learning rate "
                    "per step (separate axes), epoch boundaries dashed.",
    )


def evaluation_rows(metrics: dict) -> list[dict]:
    """Recall rows of the fine-tuned model and, when present, of the zero-shot base model, each with ``n_pairs``."""
    return [{"model": model, **row, "n_pairs": values.get("n_pairs")}
            for model, values in metric_groups(metrics) if values for row in recall_rows(values)]


def publish_evaluation(out_dir: str | os.PathLike, *, namespace: str = "", where: str = "") -> dict[str, UUID] | None:
    """Create the ``<namespace>-eval-recall`` table and ``-eval-recall-plot`` markdown from OUT/eval/metrics.json."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from pipelines.reporting.report_plots import recall_png

    path = OutputLayout(out_dir).eval_metrics
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    return {
        "table": create_table_artifact(
            table=evaluation_rows(metrics),
            key=artifact_key(namespace, "eval-recall"),
            description=f"Retrieval{where} on {metrics.get('n_pairs')} pairs: Recall@K and mean/median rank per "
                        "direction (t2i, i2t, s2t, t2s, ts2i), fine-tuned and zero-shot (base model).",
        ),
        "plot": create_markdown_artifact(
            markdown=image_markdown("Retrieval R@1", recall_png(metrics), note=f"{metrics.get('n_pairs')} pairs."),
            key=artifact_key(namespace, "eval-recall-plot"),
            description="R@1 per retrieval direction, zero-shot (base model) beside fine-tuned, as the explorer "
                        "shows it.",
        ),
    }


def publish_quality(out_dir: str | os.PathLike, *, vocab_dir: str | None, namespace: str = "",
                    where: str = "") -> dict[str, UUID]:
    """Create the dataset quality report: ``...-quality-<table>`` tables (distributions, removed words, failures)
    and one ``...-quality-plots`` markdown of the curator's plots (caption length, removed words, regions per image,
    similarity scores, image sizes, edge density, failures)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from pipelines.reporting.quality import output_quality_report, quality_tables
    from pipelines.reporting.report_plots import quality_plots

    report = output_quality_report(out_dir, vocab_dir=vocab_dir)
    ids = {name: create_table_artifact(table=rows, key=artifact_key(namespace, "quality", name),
                                       description=f"Dataset quality{where}: {name.replace('_', ' ')}.")
           for name, rows in quality_tables(report).items() if rows}
    sections = [image_markdown(name.replace("_", " ").capitalize(), png) for name, png in quality_plots(report).items()]
    ids["plots"] = create_markdown_artifact(
        markdown="# Dataset quality\n\n" + "\n".join(sections),
        key=artifact_key(namespace, "quality-plots"),
        description=f"Dataset quality{where}: caption lengths, removed words, regions, scores, sizes, edge density.")
    return ids


HEADLINE = (("t2i/R@1", "text -> image R@1"), ("i2t/R@1", "image -> text R@1"))


def headline_rows(metrics: dict | None) -> list[tuple[str, float | None, float | None]]:
    """Return ``(label, zero-shot, fine-tuned)`` for the headline recalls of ``metrics.json`` (None where absent)."""
    if not metrics:
        return []
    zero_shot = metrics.get("zero_shot") or {}
    return [(label, zero_shot.get(key), metrics.get(key)) for key, label in HEADLINE if key in metrics]


def _percent(value: float | None) -> str:
    """Recall values in metrics.json are already percentages (``structxlip.metrics``)."""
    return "n/a" if value is None else f"{float(value):.1f}%"


def _artifact_link(label: str, artifact_id: str, ui_url: str | None) -> str:
    return f"[{label}]({ui_url.rstrip('/')}/artifacts/artifact/{artifact_id})" if ui_url else f"`{label}`"


def run_summary_markdown(report: dict, *, namespace: str, config_source: str, ui_url: str | None = None,
                         explorer: str | None = None, metrics: dict | None = None) -> str:
    """Return the run's landing page: headline recall (zero-shot vs fine-tuned), per-stage counts and seconds, a
    link to every artifact this run published (by id: each resolves to this run's artifact), stale later stages,
    the folders, the config and the static explorer."""
    lines = ["# StructXLIP pipeline run", ""]
    headline = headline_rows(metrics)
    if headline:
        lines += [f"Retrieval on {metrics.get('n_pairs', '?')} test pairs:", "",
                  "| metric | zero-shot | fine-tuned | change |", "|---|---|---|---|"]
        for label, zero, tuned in headline:
            change = "n/a" if zero is None or tuned is None else f"{float(tuned) - float(zero):+.1f} pts"
            lines.append(f"| {label} | {_percent(zero)} | {_percent(tuned)} | {change} |")
        lines.append("")
    lines += [f"- images: `{report['images_dir']}`", f"- output: `{report['out_dir']}`", f"- config: `{config_source}`",
              f"- total: {report['seconds']:.1f} s", ""]
    lines += ["| stage | processed | cached | failed | seconds | artifacts |", "|---|---|---|---|---|---|"]
    for s in report["stages"]:
        published = s.get("artifacts") or {}
        links = ", ".join(_artifact_link(label, artifact_id, ui_url) for label, artifact_id in published.items())
        status = " (failed)" if s.get("status") == "failed" else ""
        lines.append(f"| {s['stage']}{status} | {s['processed']} | {s['cached']} | {s['failed']} | "
                     f"{float(s['seconds']):.2f} | {links or '-'} |")
    for stage in report.get("not_run") or []:
        lines.append(f"| {stage} | not run (an earlier stage failed) | | | | |")
    if report.get("stale"):
        lines += ["", f"**Computed from older inputs:** {', '.join(report['stale'])}. This run changed a stage before "
                  "them; run them (or the whole pipeline) to bring them up to date."]
    if explorer:
        lines += ["", f"Static explorer (open from disk, no server): `{explorer}`"]
    if report.get("record_error"):
        lines += ["", f"The run record was not written: {report['record_error']}"]
    return "\n".join(lines) + "\n"


def publish_run_summary(report: dict, *, namespace: str, config_source: str, explorer: str | None = None,
                        metrics_path: str | None = None) -> UUID:
    """Create the ``<namespace>-run-summary`` markdown on the flow run (see ``run_summary_markdown``)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url
    ui_url = str(api).removesuffix("/api") if api else None
    metrics = None
    with contextlib.suppress(OSError, ValueError):  # none yet, or unreadable: the page has no headline
        metrics = json.loads(Path(metrics_path).read_text(encoding="utf-8")) if metrics_path else None
    return create_markdown_artifact(
        markdown=run_summary_markdown(report, namespace=namespace, config_source=config_source, ui_url=ui_url,
                                      explorer=explorer, metrics=metrics),
        key=artifact_key(namespace, "run-summary"),
        description=f"Pipeline run{_where(report['images_dir'], report['out_dir'])}: headline recall, every stage's "
                    "counts and links to this run's artifacts.",
    )


__all__ = [
    "StageSummary",
    "artifact_key",
    "artifact_namespace",
    "evaluation_rows",
    "publish_evaluation",
    "publish_gallery",
    "publish_quality",
    "publish_run_summary",
    "publish_stage_summary",
    "publish_training",
    "run_summary_markdown",
    "stage_progress",
]

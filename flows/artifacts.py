"""Publishing the pipeline's Prefect artifacts: stage summaries and failures, progress, galleries, loss and recall
plots. The content is built by the pure functions of ``pipelines.render``; these thin wrappers send it to the API.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable
from uuid import UUID

from pipelines.render import (
    MAX_FAILURE_ROWS,
    StageSummary,
    artifact_key,
    failure_rows,
    gallery_markdown,
    image_markdown,
    loss_curve_png,
    loss_series,
    parse_retrieval_metrics,
    png_data_uri,
    progress_percent,
    read_jsonl,
    recall_bar_png,
    recall_rows,
    summarize_stage,
    summary_rows,
    thumbnail_png,
)
from storage.layout import OutputLayout


# ---- publishing (Prefect) -------------------------------------------------------------------------------------------
def publish_stage_summary(summary: StageSummary) -> dict[str, UUID]:
    """Create the ``<stage>-summary`` table (and ``<stage>-failures`` when any item failed); return their ids."""
    from prefect.artifacts import create_table_artifact

    ids = {
        "summary": create_table_artifact(
            table=summary_rows(summary),
            key=artifact_key(summary.stage, "summary"),
            description=f"Stage `{summary.stage}`: items processed, cached, failed and throughput in this run.",
        )
    }
    if summary.failed:
        ids["failures"] = create_table_artifact(
            table=failure_rows(summary),
            key=artifact_key(summary.stage, "failures"),
            description=f"Stage `{summary.stage}`: failed items and why (first {MAX_FAILURE_ROWS}).",
        )
    return ids


# (flow run id, key) -> progress artifact id: the artifact is created once per run and then updated in place.
_progress_artifacts: dict[tuple[str | None, str], UUID] = {}


def stage_progress(stage: str, done: int, total: int) -> UUID:
    """Create (first call in a flow run) or update the ``<stage>-progress`` artifact to ``done / total``."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run_id = str(context.flow_run.id) if context is not None and context.flow_run is not None else None
    key = artifact_key(stage, "progress")
    percent = progress_percent(done, total)
    description = f"Stage `{stage}`: {done} of {total} items done."
    artifact_id = _progress_artifacts.get((run_id, key))
    if artifact_id is None:
        artifact_id = create_progress_artifact(progress=percent, key=key, description=description)
        _progress_artifacts[(run_id, key)] = artifact_id
    else:
        update_progress_artifact(artifact_id=artifact_id, progress=percent, description=description)
    return artifact_id


def publish_gallery(stage: str, out_dir: str | os.PathLike, rows: Iterable[dict], **options: Any) -> UUID:
    """Create the ``<stage>-gallery`` markdown artifact of example rows (see ``gallery_markdown``); return its id."""
    from prefect.artifacts import create_markdown_artifact

    markdown = gallery_markdown(out_dir, rows, title=f"{stage}: examples", **options)
    return create_markdown_artifact(
        markdown=markdown,
        key=artifact_key(stage, "gallery"),
        description=f"Stage `{stage}`: example images with their structure maps, regions and captions.",
    )


def publish_training(out_dir: str | os.PathLike) -> UUID | None:
    """Create the ``train-loss`` markdown artifact (loss-curve plot) from OUT/train/metrics.jsonl; None if absent."""
    from prefect.artifacts import create_markdown_artifact

    path = OutputLayout(out_dir).train_metrics
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    png = loss_curve_png(rows)
    series = loss_series(rows)
    last = ", ".join(f"{name} {ys[-1]:.4f}" for name, (_, ys) in sorted(series.items()))
    return create_markdown_artifact(
        markdown=image_markdown("Training losses", png, note=f"{len(rows)} logged steps. Last values: {last}."),
        key="train-loss",
        description="Total loss and each StructXLIP loss term per training step.",
    )


def publish_evaluation(out_dir: str | os.PathLike) -> dict[str, UUID] | None:
    """Create the ``eval-recall`` table and ``eval-recall-plot`` markdown from OUT/eval/metrics.json; None if absent."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    path = OutputLayout(out_dir).eval_metrics
    if not path.is_file():
        return None
    rows = recall_rows(json.loads(path.read_text(encoding="utf-8")))
    return {
        "table": create_table_artifact(
            table=rows,
            key="eval-recall",
            description="Retrieval Recall@K and mean/median rank per direction (t2i, i2t, s2t, t2s, ts2i).",
        ),
        "plot": create_markdown_artifact(
            markdown=image_markdown("Retrieval recall", recall_bar_png(rows)),
            key="eval-recall-plot",
            description="R@1/5/10 per retrieval direction.",
        ),
    }


__all__ = [
    "StageSummary",
    "artifact_key",
    "failure_rows",
    "gallery_markdown",
    "image_markdown",
    "loss_curve_png",
    "loss_series",
    "parse_retrieval_metrics",
    "png_data_uri",
    "progress_percent",
    "publish_evaluation",
    "publish_gallery",
    "publish_stage_summary",
    "publish_training",
    "read_jsonl",
    "recall_bar_png",
    "recall_rows",
    "stage_progress",
    "summarize_stage",
    "summary_rows",
    "thumbnail_png",
]

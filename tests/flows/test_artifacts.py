"""Artifact builders on tiny synthetic inputs, and the publish functions against the session's Prefect server."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from flows import artifacts
from pipelines.reporting import render
from storage.atomic import write_jpeg, write_png
from storage.layout import OutputLayout
from storage.manifest import bbox

DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def decode_pngs(markdown: str) -> list[Image.Image]:
    images = []
    for payload in DATA_URI.findall(markdown):
        data = base64.b64decode(payload)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        images.append(Image.open(io.BytesIO(data)))
    return images


# ---- keys, summaries, progress --------------------------------------------------------------------------------------
def test_artifact_key_is_lowercase_dashes():
    assert render.artifact_key("Structure", "summary") == "structure-summary"
    assert render.artifact_key("eval", "Recall@K plot") == "eval-recall-k-plot"
    with pytest.raises(ValueError, match="letters or digits"):
        render.artifact_key("--", "__")


def test_stage_summary_rows_and_throughput():
    failures = [{"file": "b.png", "reason": "cannot decode"}, {"file": "d", "reason": "unknown error"}]
    summary = render.StageSummary("structure", 3, 4, 2, 2.5, failures)
    # 3 ok + 2 failed attempted in 2.5 s -> 2 items/s; cached ones cost no work.
    assert render.summary_rows(summary) == [
        {"stage": "structure", "processed": 3, "cached": 4, "failed": 2, "total": 9, "seconds": 2.5, "items_per_s": 2.0}
    ]
    assert render.failure_rows(summary) == failures
    assert render.summary_rows(render.StageSummary("ingest", 0, 0, 0, 0.0))[0]["items_per_s"] is None


def test_failure_rows_are_capped_with_a_count_row():
    failures = [{"file": f"img{i}", "reason": f"bad {i}"} for i in range(50)]  # the engine keeps the first 50
    summary = render.StageSummary("regions", 0, 0, 60, 1.0, failures)
    rows = render.failure_rows(summary)
    assert summary.failed == 60 and len(rows) == 51
    assert rows[0] == {"file": "img0", "reason": "bad 0"} and rows[49] == {"file": "img49", "reason": "bad 49"}
    assert rows[50]["file"] == "... 10 more"


def test_progress_percent():
    assert render.progress_percent(0, 8) == 0.0
    assert render.progress_percent(3, 8) == 37.5
    assert render.progress_percent(8, 8) == 100.0
    assert render.progress_percent(0, 0) == 100.0
    with pytest.raises(ValueError):
        render.progress_percent(-1, 2)


# ---- thumbnails and gallery -----------------------------------------------------------------------------------------
def test_thumbnail_area_average_by_hand():
    grey = np.array([[0, 100, 10, 10], [200, 100, 30, 50], [0, 0, 255, 255], [0, 4, 255, 255]], dtype=np.uint8)
    out = np.asarray(Image.open(io.BytesIO(render.thumbnail_png(grey, max_side=2))))
    # Each output pixel is the mean of a 2x2 block: (0+100+200+100)/4=100, (10+10+30+50)/4=25, 1, 255.
    np.testing.assert_array_equal(out, [[100, 25], [1, 255]])


def test_thumbnail_sizes_and_no_enlarging(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (150, 300, 3), dtype=np.uint8)
    assert Image.open(io.BytesIO(render.thumbnail_png(rgb, max_side=112))).size == (112, 56)
    small = np.zeros((20, 50), dtype=np.uint8)
    assert Image.open(io.BytesIO(render.thumbnail_png(small, max_side=112))).size == (50, 20)
    write_png(tmp_path / "tall.png", np.zeros((300, 100), dtype=np.uint8))
    assert Image.open(io.BytesIO(render.thumbnail_png(tmp_path / "tall.png", 96))).size == (32, 96)
    with pytest.raises(ValueError, match="uint8"):
        render.thumbnail_png(np.zeros((4, 4, 4), dtype=np.uint8))


def make_output_folder(tmp_path, n_images=3, n_segments=2):
    """An output folder with source images, structure/scribble maps and crops laid out like the pipeline's."""
    layout = OutputLayout(tmp_path / "out")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n_images):
        image_id = f"{i:02d}" + "ab" * 15
        source = tmp_path / "images" / f"img{i}.jpg"
        write_jpeg(source, rng.integers(0, 256, (100, 200, 3), dtype=np.uint8))
        structure = layout.structure_map(image_id, "skey", "canny")
        scribble = layout.structure_map(image_id, "skey", "scribble")
        write_png(structure, (rng.random((100, 200)) > 0.9).astype(np.uint8) * 255)
        write_png(scribble, (rng.random((100, 200)) > 0.8).astype(np.uint8) * 255)
        segments = []
        for s in range(n_segments):
            crop, structure_crop = layout.crop(image_id, "rkey", s), layout.structure_crop(image_id, "rkey", s)
            write_jpeg(crop, rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
            write_png(structure_crop, np.zeros((30, 40), dtype=np.uint8))
            segments.append(
                {
                    "bbox": bbox(10 * s, 5, 10 * s + 40, 35),
                    "crop_path": layout.relative(crop),
                    "structure_crop_path": layout.relative(structure_crop),
                    "caption": f"segment {s} of image {i} | with a pipe",
                    "similarity_score": 20.0 + s,
                }
            )
        rows.append(
            {
                "image_id": image_id,
                "status": "ok",
                "source_path": str(source),
                "caption": f"A red car number {i}.",
                "filtered_caption": f"A car number {i}.",
                "structure_path": layout.relative(structure),
                "scribble_path": layout.relative(scribble),
                "segments": segments,
            }
        )
    return layout, rows


def test_gallery_embeds_every_thumbnail_at_the_expected_size(tmp_path):
    layout, rows = make_output_folder(tmp_path, n_images=3, n_segments=2)
    failed = {"image_id": "ff" * 16, "status": "failed", "source_path": str(tmp_path / "broken.jpg")}
    markdown = render.gallery_markdown(layout.root, [failed] + rows, max_images=3, max_segments=2, thumbnail_px=112)
    images = decode_pngs(markdown)
    # Per image: image + structure + scribble, then crop + structure crop per segment: 3 * (3 + 2 * 2) = 21.
    assert len(images) == 21
    sizes = [im.size for im in images]
    # The image column is larger (up to render.IMAGE_PX = 256: boxes and numbers readable); 200 px is not enlarged.
    per_image = [(200, 100)] + [(112, 56)] * 2 + [(40, 30)] * 4
    assert sizes == per_image * 3
    assert "broken.jpg" not in markdown and "img0.jpg" in markdown and "img2.jpg" in markdown
    # Highest similarity first, scores with 2 decimals, pipes escaped so the table stays intact.
    assert markdown.index("segment 1 of image 0") < markdown.index("segment 0 of image 0")
    assert "**21.00** segment 1 of image 0" in markdown and "\\| with a pipe" in markdown
    assert render.SIMILARITY_NOTE in markdown and markdown.count("CLIP logit") == 1
    assert "A car number 1." in markdown
    assert len(markdown.encode()) < render.GALLERY_BUDGET_BYTES


def test_gallery_respects_limits_and_budget(tmp_path):
    layout, rows = make_output_folder(tmp_path, n_images=3, n_segments=3)
    one = render.gallery_markdown(layout.root, rows, max_images=1, max_segments=1)
    assert len(decode_pngs(one)) == 3 + 2 and "2 more region(s)" in one
    # A budget smaller than one section still shows the first image, then stops.
    tight = render.gallery_markdown(layout.root, rows, budget_bytes=10)
    assert "img0.jpg" in tight and "img1.jpg" not in tight
    # Missing files become dashes, not errors.
    rows[0]["structure_path"] = "maps/none.png"
    assert "&mdash;" in render.gallery_markdown(layout.root, rows[:1])
    assert "No successfully processed" in render.gallery_markdown(layout.root, [])


# ---- training and evaluation ----------------------------------------------------------------------------------------
def test_training_plot_reads_each_step_once_and_draws_losses_weights_and_lr(tmp_path):
    from pipelines.reporting.report import read_training_rows
    from pipelines.reporting.report_plots import training_curves_png

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "epoch": s // 2, "lr": 1e-4, "loss": 3.0 - s, "loss/global": 2.0,
                         "weight/global": 1.0}) for s in range(3)]
    path.write_text("\n".join(lines) + '\n{"step": 3, "loss": ', encoding="utf-8")  # truncated last line
    rows = read_training_rows(path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    png = training_curves_png(rows)
    assert Image.open(io.BytesIO(png)).size == (640, 720)  # three axes of 2.4 in, 100 dpi
    assert training_curves_png([{"epoch": 0, "loss": 1.0}]) is None  # no step: nothing to draw


def test_recall_rows_flat_and_nested():
    flat = {"n_queries": 10}
    for d, base in (("i2t", 0.2), ("t2i", 0.1), ("ts2i", 0.3)):
        for k in (1, 5, 10, 25, 50):
            flat[f"{d}/R@{k}"] = base + k / 100
        flat[f"{d}/mean_rank"] = 4.5
        flat[f"{d}/median_rank"] = 3.0
    rows = render.recall_rows(flat)
    assert [r["direction"] for r in rows] == ["t2i", "i2t", "ts2i"]  # METHOD.md order
    assert rows[0] == {
        "direction": "t2i", "R@1": 0.11, "R@5": 0.15, "R@10": 0.2, "R@25": 0.35, "R@50": 0.6,
        "mean_rank": 4.5, "median_rank": 3.0,
    }
    nested = render.recall_rows({"s2t": {"R@1": 0.5, "mean_rank": 2.0}})
    assert nested == [{"direction": "s2t", "R@1": 0.5, "R@5": None, "R@10": None, "R@25": None, "R@50": None,
                       "mean_rank": 2.0, "median_rank": None}]
    with pytest.raises(ValueError, match="retrieval metrics"):
        render.recall_rows({"loss": 1.0})
    from pipelines.reporting.report_plots import recall_groups, recall_png

    metrics = {**flat, "zero_shot": {"t2i/R@1": 0.05, "i2t/R@1": 0.07}}
    assert render.metric_groups(metrics) == [("fine-tuned", metrics), ("zero-shot", metrics["zero_shot"])]
    groups = recall_groups(metrics)  # the table's parser, per model
    assert groups["fine-tuned"]["t2i"] == {**{f"R@{k}": 0.1 + k / 100 for k in (1, 5, 10, 25, 50)},
                                           "mean_rank": 4.5, "median_rank": 3.0}
    assert groups["zero-shot"] == {"t2i": {"R@1": 0.05}, "i2t": {"R@1": 0.07}}
    assert Image.open(io.BytesIO(recall_png(metrics))).size == (640, 300)


# ---- publishing to the session's Prefect server ----------------------------------------------------------------------
def read_artifacts(key: str, flow_run_id=None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None,
            )
        )


def test_publish_functions_round_trip(prefect_api, tmp_path):
    from prefect import flow
    from prefect.runtime import flow_run

    layout, rows = make_output_folder(tmp_path, n_images=2, n_segments=1)
    layout.train_dir.mkdir(parents=True)
    layout.train_metrics.write_text(
        "\n".join(json.dumps({"step": s, "loss": 2.0 / (s + 1), "global": 1.0}) for s in range(4)), encoding="utf-8"
    )
    layout.eval_dir.mkdir(parents=True)
    layout.eval_metrics.write_text(json.dumps({"t2i/R@1": 0.25, "i2t/R@1": 0.5, "t2i/mean_rank": 3.0}))

    @flow(name="artifact-publishing")
    def publish() -> str:
        artifacts.publish_stage_summary(render.StageSummary(
            "structure", len(rows), 1, 1, 1.5, [{"file": "x.png", "reason": "unreadable"}]))
        for done in (1, 2, 3):
            artifacts.stage_progress("structure", done, 4)
        artifacts.publish_gallery("structure", layout.root, rows)
        assert artifacts.publish_training(layout.root) is not None
        assert artifacts.publish_evaluation(layout.root) is not None
        return flow_run.get_id()

    run_id = publish()

    (summary,) = read_artifacts("structure-summary", run_id)
    assert summary.type == "table"
    assert json.loads(summary.data) == [
        {"stage": "structure", "processed": 2, "cached": 1, "failed": 1, "total": 4, "seconds": 1.5, "items_per_s": 2.0}
    ]
    (failures,) = read_artifacts("structure-failures", run_id)
    assert json.loads(failures.data) == [{"file": "x.png", "reason": "unreadable"}]
    # Created once, then updated in place: one artifact holding the last value.
    (progress,) = read_artifacts("structure-progress", run_id)
    assert progress.type == "progress" and float(progress.data) == 75.0
    (gallery,) = read_artifacts("structure-gallery", run_id)
    assert gallery.type == "markdown" and len(decode_pngs(gallery.data)) == 2 * (3 + 2)
    (loss,) = read_artifacts("train-loss", run_id)
    assert len(decode_pngs(loss.data)) == 1 and "4 logged steps" in loss.data
    (recall,) = read_artifacts("eval-recall", run_id)
    assert [r["direction"] for r in json.loads(recall.data)] == ["t2i", "i2t"]
    assert json.loads(recall.data)[0]["R@1"] == 0.25 and json.loads(recall.data)[0]["mean_rank"] == 3.0
    assert len(read_artifacts("eval-recall-plot", run_id)) == 1

    # A second run gets its own progress artifact under the same key (a new version in the UI).
    run_two = publish()
    assert len(read_artifacts("structure-progress", run_two)) == 1
    both = {str(artifact.flow_run_id) for artifact in read_artifacts("structure-progress")} & {run_id, run_two}
    assert len(both) == 2  # the same key, one version per run


def test_representative_rows_spread_over_scores_and_include_an_image_without_regions():
    def row(i, score):
        segments = [] if score is None else [{"similarity_score": score}, {"similarity_score": score - 5}]
        return {"image_id": f"{i:02d}", "status": "ok", "segments": segments}

    rows = [row(i, float(i)) for i in range(10)] + [row(10, None), {"image_id": "x", "status": "failed"}]
    chosen = render.representative_rows(rows, 4)
    assert [r["image_id"] for r in chosen] == ["10", "00", "04", "09"]  # no region, worst, middle, best
    assert render.representative_rows(rows[:3], 4) == rows[:3]


def test_regions_are_drawn_on_the_image_at_their_boxes(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(path)
    drawn = render.boxes_image(path, [bbox(10, 20, 50, 40)])
    assert tuple(drawn[20, 30]) == render.BOX_COLOURS[0]  # on the top edge
    assert tuple(drawn[39, 30]) == render.BOX_COLOURS[0]  # on the bottom edge (x2/y2 exclusive)
    assert tuple(drawn[30, 30]) == (128, 128, 128)  # inside: untouched
    assert tuple(drawn[5, 5]) == (128, 128, 128)


def test_run_summary_links_stage_artifacts_and_evaluation_rows_carry_n_pairs_and_zero_shot():
    from flows.artifacts import artifact_namespace, evaluation_rows, run_summary_markdown

    a, b = artifact_namespace("/data/cats", "/out/one"), artifact_namespace("/data/cats", "/out/two")
    assert a != b and a.startswith("cats-one-") and re.fullmatch(r"[a-z0-9-]+", a)
    report = {"images_dir": "/data/cats", "out_dir": "/out/one", "seconds": 3.5, "not_run": ["evaluate"],
              "stale": [],
              "stages": [{"stage": "ingest", "processed": 2, "cached": 1, "failed": 1, "seconds": 0.5,
                          "artifacts": {"ingest summary": "id-1", "ingest failures": "id-2"}},
                         {"stage": "train", "processed": 0, "cached": 0, "failed": 1, "seconds": 1.0,
                          "status": "failed"}]}
    metrics = {"t2i/R@1": 50.0, "i2t/R@1": 75.0, "n_pairs": 4, "zero_shot": {"t2i/R@1": 25.0, "n_pairs": 4}}
    markdown = run_summary_markdown(report, namespace=a, config_source="cfg.yaml", ui_url="http://127.0.0.1:1/",
                                    metrics=metrics)
    assert ("| ingest | 2 | 1 | 1 | 0.50 | [ingest summary](http://127.0.0.1:1/artifacts/artifact/id-1), "
            "[ingest failures](http://127.0.0.1:1/artifacts/artifact/id-2) |") in markdown
    assert "| train (failed) |" in markdown and "| evaluate | not run" in markdown and "`cfg.yaml`" in markdown
    # Headline recall: zero-shot beside fine-tuned, the change in points (i2t has no zero-shot value here).
    assert "| text -> image R@1 | 25.0% | 50.0% | +25.0 pts |" in markdown
    assert "| image -> text R@1 | n/a | 75.0% | n/a |" in markdown
    stale = run_summary_markdown({**report, "stale": ["regions", "captions"]}, namespace=a, config_source="c")
    assert "**Computed from older inputs:** regions, captions." in stale and "Retrieval on" not in stale
    rows = evaluation_rows(metrics)
    assert [(r["model"], r["direction"], r["R@1"], r["n_pairs"]) for r in rows] == [
        ("fine-tuned", "t2i", 50.0, 4), ("fine-tuned", "i2t", 75.0, 4), ("zero-shot", "t2i", 25.0, 4)]


def test_captions_with_markdown_or_html_are_shown_as_text_in_galleries(tmp_path):
    layout, rows = make_output_folder(tmp_path, n_images=1, n_segments=1)
    rows[0]["filtered_caption"] = "A [click](http://evil.example) ![pixel](http://evil.example/p.png) <img onerror=x>"
    rows[0]["segments"][0]["caption"] = "**bold** [link](javascript:alert(1))"
    markdown = render.gallery_markdown(layout.root, rows)
    text = re.sub(r'<img src="data:image/png;base64,[^"]+" alt="[^"]*"/>', "", markdown)
    assert "](http" not in text and "](javascript" not in text and "<img onerror" not in text
    assert "**bold**" not in text and "click" in text


def test_representative_rows_never_repeat_an_image_and_unproposed_regions_are_not_zero_regions(tmp_path):
    layout, rows = make_output_folder(tmp_path, n_images=3, n_segments=1)
    # The structure stage's gallery: regions not proposed yet (None), duplicate files of one image.
    structure_rows = [{**row, "segments": None} for row in rows] * 2
    chosen = render.representative_rows(structure_rows, count=2)
    assert len(chosen) == 2 and len({row["image_id"] for row in chosen}) == 2
    everything = render.representative_rows(structure_rows, count=5)
    assert sorted(row["image_id"] for row in everything) == sorted(row["image_id"] for row in rows)
    markdown = render.gallery_markdown(layout.root, everything, max_images=5)
    assert "region(s)" not in markdown and markdown.count("## img") == 3
    # After regions: an image without regions is shown once, and says 0; the others say how many they have.
    regions_rows = [{**rows[0], "segments": []}] + rows[1:]
    markdown = render.gallery_markdown(layout.root, render.representative_rows(regions_rows, count=5))
    assert markdown.count("0 region(s)") == 1 and markdown.count("1 region(s)") == 2


def test_a_source_above_pil_s_own_guard_gives_galleries_without_warnings(tmp_path, monkeypatch):
    """The pipeline's max_pixels let the image in; PIL's DecompressionBombWarning would only reach the terminal."""
    import warnings

    path = tmp_path / "big.png"
    write_png(path, np.full((48, 64, 3), 90, np.uint8))  # 3,072 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)  # above it, below twice it (PIL's refusal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = render.boxes_image(path, [{"x1": 4, "y1": 4, "x2": 30, "y2": 20}])
        thumbnail = render.thumbnail_png(path, max_side=32)
    assert drawn.shape == (48, 64, 3) and Image.open(io.BytesIO(thumbnail)).size == (32, 24)


def test_a_stage_gallery_shows_the_images_its_run_computed(tmp_path, monkeypatch):
    """What a run that adds images publishes after a stage: the gallery's rows are of the images it computed."""
    from configs import load_config
    from flows import pipeline as flows_pipeline
    from pipelines.engine.execute import run_inline
    from pipelines.engine.plan import Pipeline
    from tests.corpus import make_generated_images

    images, out = tmp_path / "images", tmp_path / "out"
    config = load_config(overrides={"model.clip_model": "structxlip/tiny-clip", "runtime.workers": 1})
    make_generated_images(images, 3, size=(96, 72))
    run_inline(Pipeline(images, out, config), ["ingest", "structure"])
    added = make_generated_images(images, 2, size=(96, 72), start=3)
    run_inline(Pipeline(images, out, config), ["ingest"])
    pending = Pipeline(images, out, config).plan("structure").pending
    (summary,) = run_inline(Pipeline(images, out, config), ["structure"])
    assert (summary["processed"], summary["cached"]) == (2, 3)

    shown = {}
    monkeypatch.setattr(artifacts, "publish_stage_summary", lambda *args, **kwargs: {})
    monkeypatch.setattr(artifacts, "publish_gallery", lambda stage, out_dir, rows, **kwargs: shown.setdefault(stage, rows))
    flows_pipeline._publish(Pipeline(images, out, config), summary, pending)
    assert sorted(row["source_path"] for row in shown["structure"]) == sorted(str(path) for path in added)
    assert all(row["structure_path"] and (out / row["structure_path"]).is_file() for row in shown["structure"])

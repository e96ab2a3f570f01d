"""The explorer as a curation tool, in headless Chromium on two real pipeline runs of the same generated images that
differ in one structure parameter (``structure.canny_low`` 100 vs 50): the comparison page, filtering from a
histogram bar (checked against the manifest with DuckDB), the embedding map written by the evaluate stage, and an
exported selection that ``structxlip select`` + ``structxlip train`` use directly.

Screenshots of each view land in ``tests/_artifacts/`` (gitignored).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from configs import load_config
from pipelines.engine.execute import run_inline
from pipelines.engine.plan import Pipeline, record_config
from storage.layout import OutputLayout
from storage.manifest import read_manifest
from tests.chromium import Page, chromium
from tests.corpus import make_generated_images

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(chromium() is None, reason="chromium not installed (`make browser` installs it)")]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = ROOT / "tests" / "_artifacts"
STAGES = ["ingest", "structure", "regions", "captions", "filter", "manifest", "train", "evaluate"]
CONFIG = {"model.clip_model": "structxlip/tiny-clip", "regions.method": "structure", "regions.max_regions": 3,
          "runtime.chunk_size": 4, "runtime.workers": 1, "train.epochs": 1, "train.batch_size": 2,
          "train.device": "cpu", "evaluate.device": "cpu", "captions.device": "cpu", "evaluate.split": "test",
          "manifest.split_ratios": {"train": 0.5, "val": 0.0, "test": 0.5}}
TRAIN_CONFIG = """model: {clip_model: structxlip/tiny-clip}
train: {epochs: 1, batch_size: 2, device: cpu}
"""
WORDS = r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*"  # pipelines.reporting.quality.WORD_PATTERN, in DuckDB's regex dialect


def _cli(*args: str, timeout: int = 600) -> str:
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"structxlip {' '.join(args)} failed:\n{done.stderr[-3000:]}\n{done.stdout[-1000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two output folders of the same 10 images (canny_low 100 and 50), every stage run, and the comparison page."""
    root = tmp_path_factory.mktemp("curation")
    images = root / "images"
    make_generated_images(images, 10, size=(96, 72))
    outs = {}
    for name, canny_low in (("canny100", 100.0), ("canny50", 50.0)):
        out = root / name
        config = load_config(overrides={**CONFIG, "structure.canny_low": canny_low})
        pipeline = Pipeline(images, out, config)
        run_inline(pipeline, STAGES)
        record_config(pipeline.layout, config)  # as `structxlip run` does
        outs[name] = out
    printed = _cli("report", str(outs["canny100"]), "--compare", str(outs["canny50"]))
    page = outs["canny100"] / "report" / "index.html"
    assert str(page) in printed
    return {"root": root, "a": outs["canny100"], "b": outs["canny50"], "page": page}


def _manifest_sql(out: Path) -> str:
    return f"read_parquet('{out / 'manifest'}/*.parquet')"


def _open(page: Page, path: Path, fragment: str = "") -> None:
    page.goto(path.as_uri() + (f"#{fragment}" if fragment else ""))
    page.wait_for("document.body && document.body.getAttribute('data-rendered') === '1'", "the explorer to render")


def test_comparison_shows_both_runs_maps_and_the_metric_deltas(runs, tmp_path):
    a, b = OutputLayout(runs["a"]), OutputLayout(runs["b"])
    metrics_a = json.loads(a.eval_metrics.read_text())
    metrics_b = json.loads(b.eval_metrics.read_text())
    # One image whose structure map differs between the runs (the canny threshold is the only difference).
    rows_a = {r["image_id"]: r for r in read_manifest(a.root).to_pylist() if r["status"] == "ok"}
    rows_b = {r["image_id"]: r for r in read_manifest(b.root).to_pylist() if r["status"] == "ok"}
    image_id = next(i for i in sorted(rows_a) if (a.root / rows_a[i]["structure_path"]).read_bytes()
                    != (b.root / rows_b[i]["structure_path"]).read_bytes())

    with Page(tmp_path / "profile", height=1300) as page:
        _open(page, runs["page"], "view=compare")
        page.screenshot(ARTIFACTS_DIR / "curation-compare.png")
        assert page.evaluate("[...document.querySelectorAll('#compare-body table:first-of-type td')]"
                             ".map(td => td.textContent).join('|')") == "structure.canny_low|100|50"
        deltas = page.evaluate("Object.fromEntries([...document.querySelectorAll('td.delta[data-key]')].map(td => "
                               "[td.dataset.key, td.dataset.delta]))")
        for model, source_a, source_b in (("fine-tuned", metrics_a, metrics_b),
                                          ("zero-shot", metrics_a["zero_shot"], metrics_b["zero_shot"])):
            for metric in ("t2i/R@1", "i2t/R@1", "t2i/R@5"):
                expected = source_b[metric] - source_a[metric]
                assert math.isclose(float(deltas[f"{model}/{metric}"]), expected, abs_tol=1e-9), (model, metric)

        # The image's card: both runs' structure maps, each loaded from its own output folder.
        _open(page, runs["page"], f"card={image_id}")
        page.wait_for("document.getElementById('card-dialog').open", "the card dialog")
        page.wait_for("[...document.querySelectorAll('#card-dialog img.map')].every(i => i.complete)", "maps to load")
        maps = page.evaluate("[...document.querySelectorAll('#card-dialog .run')].map(run => ({run: run.dataset.run, "
                             "label: run.querySelector('h4').textContent, src: run.querySelector('img.map').src, "
                             "loaded: run.querySelector('img.map').naturalWidth}))")
        page.screenshot(ARTIFACTS_DIR / "curation-compare-card.png")
        page.press("Escape", key_code=27)
        page.wait_for("!document.getElementById('card-dialog').open")
        # The browser's "runs" filter: images whose regions or best score differ between the two runs.
        _open(page, runs["page"], "changed=yes")
        changed = page.evaluate("window.explorer.filteredIds()")
        page.screenshot(ARTIFACTS_DIR / "curation-compare-changed.png")
    assert [m["run"] for m in maps] == ["0", "1"] and maps[0]["label"] == "canny100 (this run)"
    assert maps[1]["label"] == "canny50"
    assert maps[0]["src"] == (a.root / rows_a[image_id]["structure_path"]).as_uri()
    assert maps[1]["src"] == (b.root / rows_b[image_id]["structure_path"]).as_uri()
    assert all(m["loaded"] > 0 for m in maps)

    def regions(row: dict) -> tuple:
        scores = [round(s["similarity_score"], 3) for s in row["segments"] or []
                  if s["similarity_score"] is not None and math.isfinite(s["similarity_score"])]
        boxes = [tuple(s["bbox"][k] for k in ("x1", "y1", "x2", "y2")) for s in row["segments"] or []]
        return boxes, max(scores, default=None)

    assert sorted(changed) == sorted(i for i in rows_a if i in rows_b and regions(rows_a[i]) != regions(rows_b[i]))


def test_clicking_a_histogram_bar_filters_to_exactly_that_bin(runs, tmp_path):
    manifest = _manifest_sql(runs["a"])
    with Page(tmp_path / "profile", height=1100) as page:
        _open(page, runs["page"])
        for name, sql in (("regions", "len(segments)"),
                          ("length", "len(regexp_extract_all(caption, '" + WORDS.replace("'", "''") + "'))")):
            bars = page.evaluate(f"[...document.querySelectorAll('g.bar[data-hist={name}]')].map(g => "
                                 "({bin: +g.dataset.bin, count: +g.dataset.count}))")
            edges = page.evaluate(f"JSON.parse(document.getElementById('report-data').textContent).hist.{name}.edges")
            bin_ = max(bars, key=lambda bar: (bar["count"], -bar["bin"]))["bin"]
            page.click(f"g.bar[data-hist={name}][data-bin='{bin_}']")
            page.wait_for(f"location.hash.includes('bin_{name}={bin_}')")
            shown = page.evaluate("window.explorer.filteredIds()")
            low, high = edges[bin_], edges[bin_ + 1]
            closed = "<=" if bin_ == len(edges) - 2 else "<"
            expected = [row[0] for row in duckdb.sql(
                f"SELECT image_id FROM {manifest} WHERE status = 'ok' AND caption IS NOT NULL "
                f"AND {sql} >= {low} AND {sql} {closed} {high}").fetchall()]
            assert sorted(shown) == sorted(expected) and len(shown) == bars[bin_]["count"] > 0, name
            # The plot shows the filter: the bar is pressed, and the page says how many images match.
            assert page.evaluate(f"document.querySelector('g.bar[data-hist={name}][data-bin=\"{bin_}\"]')"
                                 ".getAttribute('aria-pressed')") == "true"
            pager = page.evaluate("document.getElementById('browse-pager-top').textContent")
            assert f"· {len(expected)} images" in pager
            page.screenshot(ARTIFACTS_DIR / f"curation-histogram-{name}.png")
            page.press("Enter", key_code=13)  # keyboard: the focused bar toggles its filter off again
            page.wait_for(f"!location.hash.includes('bin_{name}')", "the bin filter to clear")

        # "without regions" means the same in the quality report and in the browser's filter: ok images, no regions.
        _open(page, runs["page"], "regions=without")
        report = json.loads(page.evaluate("document.getElementById('report-data').textContent"))
        without = duckdb.sql(f"SELECT count(*) FROM {manifest} WHERE status = 'ok' AND len(segments) = 0")
        without = without.fetchall()[0][0]
        assert len(page.evaluate("window.explorer.filteredIds()")) == report["quality"]["counts"]["without_regions"] \
            == without


def test_embedding_map_has_one_point_per_test_image_and_opens_its_card(runs, tmp_path):
    layout = OutputLayout(runs["a"])
    with np.load(layout.eval_embeddings) as stored:
        assert stored["fine-tuned/image"].shape[0] == len(stored["image_ids"])
    test_ids = sorted(row[0] for row in duckdb.sql(
        f"SELECT image_id FROM {_manifest_sql(runs['a'])} WHERE split = 'test' AND status = 'ok' "
        "AND caption IS NOT NULL").fetchall())
    with Page(tmp_path / "profile", height=900) as page:
        _open(page, runs["page"], "view=map")
        points = page.evaluate("window.explorer.mapPoints()")
        assert sorted(p["id"] for p in points) == test_ids and len(points) == len(test_ids) >= 2
        assert page.evaluate("+document.getElementById('embedding-canvas').dataset.points") == len(test_ids)
        target = points[len(points) // 2]
        page.hover(target["x"], target["y"])
        page.wait_for("!document.querySelector('.map-tip').hidden", "the hover preview")
        page.screenshot(ARTIFACTS_DIR / "curation-map.png")
        page.click_at(target["x"], target["y"])
        page.wait_for("document.getElementById('card-dialog').open", "the card dialog")
        assert page.evaluate("document.querySelector('#card-dialog article.card').dataset.imageId") == target["id"]
        page.screenshot(ARTIFACTS_DIR / "curation-map-card.png")
        page.press("Escape", key_code=27)
        page.wait_for("!document.getElementById('card-dialog').open && !location.hash.includes('card=')")
        # Keyboard: focus the map, step to a point, Enter opens it.
        page.evaluate("document.getElementById('embedding-canvas').focus()")
        page.press("ArrowRight", key_code=39)
        assert page.evaluate("document.getElementById('map-focus').textContent").startswith("point ")
        page.press("Enter", key_code=13)
        page.wait_for("document.getElementById('card-dialog').open", "the card dialog from the keyboard")
        page.press("Escape", key_code=27)
        # The zero-shot model's map of the same images (evaluate keeps both models' embeddings).
        _open(page, runs["page"], "view=map&mmodel=zero-shot&mkind=text&mcolor=score")
        page.wait_for("document.querySelector('select[name=mmodel]').value === 'zero-shot'")
        assert sorted(p["id"] for p in page.evaluate("window.explorer.mapPoints()")) == test_ids
        page.screenshot(ARTIFACTS_DIR / "curation-map-zero-shot-captions.png")


def test_an_exported_selection_trains_with_exactly_the_selected_ids(runs, tmp_path):
    downloads = tmp_path / "downloads"
    with Page(tmp_path / "profile", height=1100, downloads=downloads) as page:
        _open(page, runs["page"], "split=train")
        cards = page.evaluate("[...document.querySelectorAll('#cards article.card')].map(c => c.dataset.imageId)")
        picked = cards[:4]
        for image_id in picked:
            page.click(f"article.card[data-image-id='{image_id}'] input.pick-box")
        page.wait_for("document.getElementById('selection-count').textContent.startsWith('4 picked')")
        page.screenshot(ARTIFACTS_DIR / "curation-selection.png")
        page.click("#export-ids")
        deadline = time.monotonic() + 60
        while not (files := list(downloads.glob("*.txt"))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert files, "the export did not download a file"
    selection = files[0]
    assert selection.read_text().split() == sorted(picked, key=cards.index)

    subset, reference = tmp_path / "selection.parquet", tmp_path / "selection.json"
    printed = _cli("select", str(runs["a"]), "--ids", str(selection), "--parquet", str(subset),
                   "--json", str(reference))
    assert "selected 4 images (4 train)" in printed
    held = [row[0] for row in duckdb.sql(f"SELECT image_id FROM read_parquet('{subset}')").fetchall()]
    assert sorted(held) == sorted(picked)
    assert sorted(r["structxlip"]["image_id"] for r in json.loads(reference.read_text())) == sorted(picked)

    config = tmp_path / "train.yaml"
    config.write_text(TRAIN_CONFIG)
    run = tmp_path / "run"
    printed = _cli("train", str(subset), "--out", str(run), "--config", str(config), "--no-progress")
    assert "trained 1/1 epochs, 2 steps" in printed  # 4 images, batch 2
    assert (run / "train" / "model").is_dir()

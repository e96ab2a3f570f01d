"""The static explorer: its row data by hand, then the real page (``structxlip report``) in headless Chromium.

Screenshots land in ``tests/_artifacts/`` (gitignored) and their paths are printed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from pipelines.reporting.report import (
    _script_json,
    _Thumbnails,
    config_differences,
    embedding_map,
    explorer_row,
    histogram_edges,
    negative_edit,
    rank_by_image,
    read_training_rows,
    row_quantities,
)
from pipelines.reporting.report_plots import recall_groups
from storage.hashing import content_key
from storage.layout import IMAGE_ID_LENGTH, OutputLayout
from storage.manifest import STATUS_FAILED, STATUS_OK, bbox, manifest_table, read_manifest
from storage.parquet import parquet_parts, write_parquet_atomic
from structxlip.app.synthetic import _split, make_synthetic_manifest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = ROOT / "tests" / "_artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    # Virtual time: lazy thumbnails of the visible page finish loading before the screenshot, without a real wait.
    "--virtual-time-budget=5000",
]
HOSTILE_CAPTION = 'A red <img src=x onerror="document.title=\'pwned\'"> box </script><b>bold</b> & more.'


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path, fragment: str, screenshot: Path, profile: Path, height: int = 1400) -> str:
    """Return the DOM of the report at ``page#fragment`` once its script has rendered; save a screenshot."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--window-size=1280,{height}", f"--user-data-dir={profile}",
         f"--screenshot={screenshot}", "--dump-dom", f"{page.as_uri()}#{fragment}"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    # --dump-dom returns after the load event; the page renders synchronously before it, and says so.
    assert 'data-rendered="1"' in dom, "the explorer script did not finish rendering:\n" + result.stderr[-2000:]
    print(f"report screenshot: {screenshot}")
    return dom


def run_report(out_dir: Path) -> str:
    """Run ``structxlip report OUT`` as a user would; return its output."""
    result = subprocess.run([sys.executable, "-m", "flows.cli", "report", str(out_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# ---- row data -------------------------------------------------------------------------------------------------
def test_negative_edit_keeps_the_common_words_and_marks_whole_words():
    caption = "a red car near a blue house"
    assert negative_edit(caption, "a blue car near a blue house") == [2, 22, "blue"]
    assert negative_edit(caption, "a red car near a red house") == [17, 6, "red"]
    assert negative_edit(caption, caption) == [len(caption), 0, ""]
    for negative in ("a red car", "x", "a red bus near a blue house.", "a blue car near a red house"):
        prefix, suffix, middle = negative_edit(caption, negative)
        assert caption[:prefix] + middle + caption[len(caption) - suffix:] == negative


def test_explorer_row_links_files_under_out_and_refuses_escapes(tmp_path):
    layout = OutputLayout(tmp_path)
    row = {
        "image_id": "abc", "status": "ok", "split": "test", "width": 40, "height": 20, "source_path": "/x/a.jpg",
        "caption": "A red box.", "filtered_caption": "A box.", "structure_path": "maps/k/ab/abc.canny.png",
        "scribble_path": "../../etc/passwd", "hard_negatives": ["A blue box."],
        "segments": [{"bbox": bbox(1, 2, 11, 12), "crop_path": "crops/k/ab/abc/000 x.jpg", "structure_crop_path": None,
                      "caption": "a red box", "similarity_score": 21.23456},
                     {"bbox": bbox(0, 0, 4, 4), "crop_path": None, "structure_crop_path": None, "caption": "b",
                      "similarity_score": float("nan")}],
    }
    compact = explorer_row(row, layout=layout, image_url="thumbs/ab/abc.jpg")
    assert compact["map"] == "../maps/k/ab/abc.canny.png" and compact["scr"] is None
    assert compact["rm"] == [[2, 5]] and compact["fc"] == "A box."
    assert compact["seg"][0] == [1, 2, 11, 12, "../crops/k/ab/abc/000%20x.jpg", None, "a red box", 21.235]
    assert compact["seg"][1][7] is None and compact["best"] == 21.235
    assert compact["neg"] == [[2, 5, "blue"]]
    same = explorer_row(dict(row, filtered_caption="A red box."), layout=layout, image_url=None)
    assert same["fc"] == 1 and same["rm"] == []
    assert layout.report_thumbnail("abcdef") == tmp_path.resolve() / "report" / "thumbs" / "ab" / "abcdef.jpg"


def test_thumbnails_stay_under_the_report_folder(tmp_path):
    from PIL import Image

    source = tmp_path / "photo.jpg"
    Image.new("RGB", (600, 300), (200, 10, 10)).save(source)
    layout = OutputLayout(tmp_path / "out")
    thumbnails = _Thumbnails(layout, 128)
    row = {"image_id": "../../escape", "source_path": str(source), "width": 600, "height": 300}
    url = thumbnails.url(row)
    written = [p for p in (tmp_path / "out").rglob("*.jpg")]
    assert len(written) == 1 and written[0].parent.parent == layout.report_dir / "thumbs"
    assert url == written[0].relative_to(layout.report_dir).as_posix()
    assert Image.open(written[0]).size == (128, 64)
    assert thumbnails.url(dict(row, image_id="ab12")) == "thumbs/ab/ab12.jpg" and thumbnails.written == 2
    assert thumbnails.url(dict(row, image_id="ab12")) == "thumbs/ab/ab12.jpg" and thumbnails.reused == 1
    # An image already under OUT and no larger than a thumbnail is linked as it is.
    small = tmp_path / "out" / "images" / "small.png"
    small.parent.mkdir(parents=True)
    Image.new("RGB", (64, 32)).save(small)
    assert thumbnails.url({"image_id": "cd34", "source_path": str(small), "width": 64, "height": 32}) == \
        "../images/small.png"


def test_urls_of_a_re_run_write_only_the_new_thumbnails_in_row_order(tmp_path):
    """Rows whose thumbnail exists are answered without the thread pool; new ones are made; order is the rows'."""
    from PIL import Image

    layout = OutputLayout(tmp_path / "out")
    rows = []
    for n in range(6):
        source = tmp_path / f"photo{n}.jpg"
        Image.new("RGB", (400, 300), (40 * n, 10, 10)).save(source)
        rows.append({"image_id": f"{n:02d}ff", "source_path": str(source), "width": 400, "height": 300})
    rows.append({"image_id": "77ff", "source_path": None})  # no source: no image
    first = _Thumbnails(layout, 64)
    assert first.urls(rows[:3]) == [f"thumbs/{n:02d}/{n:02d}ff.jpg" for n in range(3)] and first.written == 3
    made = {p: p.stat().st_mtime_ns for p in layout.report_dir.rglob("*.jpg")}
    again = _Thumbnails(layout, 64)
    assert again.urls(rows) == [f"thumbs/{n:02d}/{n:02d}ff.jpg" for n in range(6)] + [None]
    assert (again.written, again.reused) == (3, 3)
    assert all(p.stat().st_mtime_ns == when for p, when in made.items())  # the existing ones untouched


def test_thumbnails_are_jpegs_of_the_displayed_image_at_pils_thumbnail_size(tmp_path):
    from PIL import Image

    from pipelines.steps.images import ORIENTATION_TAG

    stored = np.zeros((480, 640, 3), np.uint8)
    stored[:, :320] = (255, 0, 0)  # stored left half red: orientation 6 (turn 90 degrees clockwise) shows it on top
    stored[:, 320:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif)
    Image.new("P", (300, 100)).save(tmp_path / "wide.gif")  # a format OpenCV does not read
    Image.new("RGB", (100, 50)).save(tmp_path / "small.png")
    thumbnails = _Thumbnails(OutputLayout(tmp_path / "out"), 256)
    for name, (width, height) in (("turned.jpg", (480, 640)), ("wide.gif", (300, 100)), ("small.png", (100, 50))):
        url = thumbnails.url({"image_id": name[:4], "source_path": str(tmp_path / name), "width": width,
                              "height": height})
        expected = Image.new("L", (width, height))
        expected.thumbnail((256, 256))
        with Image.open(thumbnails.layout.report_dir / url) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.size == expected.size, name
            if name == "turned.jpg":
                top, bottom = thumbnail.convert("RGB").getpixel((96, 10)), thumbnail.convert("RGB").getpixel((96, 245))
                assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
    assert thumbnails.written == 3


def test_a_runs_quality_plots_are_drawn_once_for_the_artifact_and_the_explorer(tmp_path, monkeypatch):
    from pipelines.reporting import report_plots
    from pipelines.reporting.quality import output_quality_report
    from pipelines.reporting.report import write_report

    make_synthetic_manifest(tmp_path, n_images=3, image_size=48)
    drawn = []
    draw = report_plots._png
    monkeypatch.setattr(report_plots, "_png", lambda figure, **kw: drawn.append(figure) or draw(figure, **kw))
    report_plots._drawn_quality_plots.cache_clear()
    # What flows.artifacts.publish_quality publishes after the manifest stage, then the run's explorer.
    artifact = report_plots.quality_plots(output_quality_report(tmp_path))
    page = write_report(tmp_path).path.read_text()
    assert len(drawn) == len(artifact) == 7  # the six plots and failures by stage, each drawn once
    data = json.loads(page.split('id="report-data">', 1)[1].split("</script>", 1)[0])
    assert list(data["plots"]) == list(artifact)
    assert all(uri.endswith(base64.b64encode(artifact[name]).decode()) for name, uri in data["plots"].items())


def test_script_json_cannot_close_the_script_element():
    text = _script_json({"c": "</script><script>alert(1)</script><!-- & ", "x": float("inf")})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"c": "</script><script>alert(1)</script><!-- & ", "x": None}


def test_read_training_rows_keeps_the_last_record_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_training_rows(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.5}]
    assert read_training_rows(tmp_path / "missing.jsonl") == []


def test_histogram_edges_and_row_quantities():
    # Integers: one bin per value while the range is short, else equal bins on whole numbers.
    assert histogram_edges([0, 2, 3, None], integer=True) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert histogram_edges(list(range(10, 51)), integer=True, bins=20) == [float(v) for v in range(10, 53, 3)]
    assert histogram_edges([1.0, 3.0], integer=False, bins=4) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert histogram_edges([2.0, 2.0], integer=False, bins=2) == [1.5, 2.0, 2.5]
    assert histogram_edges([None], integer=True) == []
    ok = {"status": "ok", "caption": "A red box, a blue-green ball.",
          "segments": [{"similarity_score": 20.12345}, {"similarity_score": float("nan")}, {"similarity_score": 3.0}]}
    assert row_quantities(ok, [(2, 5), (14, 24)]) == {"regions": 3, "score": 20.123, "removed": 2, "length": 6}
    assert row_quantities({"status": "failed", "segments": []}, []) == dict.fromkeys(
        ("regions", "score", "removed", "length"))
    no_caption = row_quantities({"status": "ok", "caption": None, "segments": []}, [])
    assert no_caption == {"regions": 0, "score": None, "removed": None, "length": None}


def test_rank_by_image_config_differences_and_recall_groups(tmp_path):
    rankings = {"image_ids": ["a", "b"], "models": {"fine-tuned": {"ranks": [1, 3]}, "zero-shot": {"ranks": [2, 2]}}}
    assert rank_by_image(rankings) == {"a": [1, 2], "b": [3, 2]}
    assert rank_by_image({"image_ids": ["a"], "models": {"zero-shot": {"ranks": [4]}}}) == {"a": [None, 4]}
    assert rank_by_image(None) == {}
    (tmp_path / "a.yaml").write_text("structure: {canny_low: 100, canny_high: 200}\nregions: {method: sam}\n")
    (tmp_path / "b.yaml").write_text("structure: {canny_low: 50, canny_high: 200}\ntrain: {lr: 0.1}\n")
    assert config_differences(tmp_path / "a.yaml", tmp_path / "b.yaml") == [
        ["regions.method", "sam", None], ["structure.canny_low", 100, 50], ["train.lr", None, 0.1]]
    assert config_differences(tmp_path / "a.yaml", tmp_path / "missing.yaml")[0] == ["regions.method", "sam", None]
    groups = recall_groups({"n_pairs": 4, "t2i/R@1": 50.0, "i2t/R@1": 25.0, "zero_shot": {"t2i/R@1": 10.0}})
    assert groups == {"fine-tuned": {"t2i": {"R@1": 50.0}, "i2t": {"R@1": 25.0}}, "zero-shot": {"t2i": {"R@1": 10.0}}}


def test_embedding_map_projects_each_kind_and_keeps_manifest_rows(tmp_path):
    import numpy as np

    # Images on a line along dimension 0 (x grows with the index); captions along dimension 1 in reverse.
    image = np.zeros((4, 3), np.float16)
    image[:, 0] = [0.0, 0.1, 0.2, 0.9]
    text = np.zeros((4, 3), np.float16)
    text[:, 1] = [3.0, 2.0, 1.0, 0.0]
    path = tmp_path / "embeddings.npz"
    np.savez(path, image_ids=np.asarray(["a", "b", "c", "x"]), models=np.asarray(["fine-tuned"]),
             split=np.asarray("test"), has_structure=np.ones(4, bool),
             **{"fine-tuned/image": image, "fine-tuned/text": text})
    result = embedding_map(path, {"a": 5, "b": 6, "c": 7})  # "x" is not in the manifest
    assert result["rows"] == [5, 6, 7] and result["not_in_manifest"] == 1 and result["method"] == "pca"
    xs = [p[0] for p in result["points"]["fine-tuned"]["image"]]
    assert xs in ([0.0, 0.5, 1.0], [1.0, 0.5, 0.0])  # PCA's sign is free; the spacing is not
    assert result["models"] == ["fine-tuned"] and sorted(result["points"]["fine-tuned"]) == ["image", "text"]
    assert embedding_map(tmp_path / "missing.npz", {}) is None


def test_placeholder_text_in_the_title_does_not_move_the_data(tmp_path):
    from pipelines.reporting.report import write_report

    make_synthetic_manifest(tmp_path, n_images=3, image_size=48)
    page = write_report(tmp_path, title="__DATA__ and __MAP__", max_edge_maps=0).path.read_text()
    assert "<h1>__DATA__ and __MAP__</h1>" in page
    data = page.split('id="report-data">', 1)[1].split("</script>", 1)[0]
    assert len(json.loads(data)["rows"]) == 4  # 3 images and the synthetic failed one
    assert page.split('id="map-data">', 1)[1].split("</script>", 1)[0] == "null"  # no eval/embeddings.npz


def test_compared_run_links_the_other_folders_maps_from_this_page(tmp_path):
    from urllib.parse import unquote

    from pipelines.reporting.report import compared_run

    make_synthetic_manifest(tmp_path / "run a", n_images=3, image_size=48)
    make_synthetic_manifest(tmp_path / "run b", n_images=4, image_size=48)  # the same 3 images and one more
    here = OutputLayout(tmp_path / "run a")
    ids = {r["image_id"] for r in read_manifest(here.root).to_pylist()}
    other = compared_run(here, tmp_path / "run b", ids)
    assert other["label"] == "run b" and other["only_there"] == 1 and set(other["rows"]) == ids
    rows_b = {r["image_id"]: r for r in read_manifest(tmp_path / "run b").to_pylist()}
    for image_id, row in other["rows"].items():
        if rows_b[image_id]["structure_path"]:
            assert row["map"] == "../../run%20b/" + rows_b[image_id]["structure_path"]
            assert (here.report_dir / unquote(row["map"])).resolve().is_file()
        boxes = [[s["bbox"][k] for k in ("x1", "y1", "x2", "y2")] for s in rows_b[image_id]["segments"] or []]
        assert [segment[:4] for segment in row["seg"]] == boxes
        assert all(segment[4:7] == [None, None, None] for segment in row["seg"])
    assert other["config"] == [] and other["eval"] is None


def test_a_manifest_larger_than_the_page_is_shown_as_a_sample_and_counted_whole(tmp_path):
    from pipelines.reporting.report import compared_run, write_report

    out_dir = tmp_path / "out"
    make_synthetic_manifest(out_dir, n_images=6, image_size=48)
    make_scaled_manifest(out_dir, n_rows=300)
    layout = OutputLayout(out_dir)
    rows = read_manifest(out_dir).to_pylist()
    for part in parquet_parts(layout.manifest_dir):  # three parts, as a larger run writes them
        part.unlink()
    for start in range(0, 300, 100):
        write_parquet_atomic(manifest_table(rows[start:start + 100]), layout.manifest_part(f"p{start}"))
    ok = [r["image_id"] for r in rows if r["status"] == STATUS_OK]
    failed = sorted(r["image_id"] for r in rows if r["status"] != STATUS_OK)
    evaluated = ok[10:15]
    layout.eval_dir.mkdir(parents=True, exist_ok=True)
    layout.eval_rankings.write_text(json.dumps({"image_ids": evaluated, "models": {
        "fine-tuned": {"ranks": [1, 2, 3, 4, 5]}}}))
    rest = sorted(set(ok) - set(evaluated))

    def page_data(result):
        page = result.path.read_text()
        return page, json.loads(page.split('id="report-data">', 1)[1].split("</script>", 1)[0])

    assert len(failed) == 49 and len(rest) == 246
    # 80 rows: the 5 evaluated images, the 49 failed ones, then the 26 of the other 246 with the smallest ids.
    result = write_report(out_dir, max_rows=80)
    page, data = page_data(result)
    expected = {*evaluated, *failed, *rest[:26]}
    shown = [row["i"] for row in data["rows"]]
    assert shown == [r["image_id"] for r in rows if r["image_id"] in expected]  # in manifest order
    assert len(shown) == result.rows == 80 and result.total == 300
    assert [row["rk"][0] for row in data["rows"] if row["i"] in evaluated] == [1, 2, 3, 4, 5]
    assert data["quality"]["counts"]["rows"] == 300 and data["quality"]["counts"]["failed"] == 49
    assert "80 of 300 images (the evaluated and failed ones first" in page
    # Fewer rows than those come first: the evaluated ones, then the failed ones with the smallest ids.
    _, data = page_data(write_report(out_dir, max_rows=9))
    assert {row["i"] for row in data["rows"]} == {*evaluated, *failed[:4]}
    # A compared run: its rows of the images shown, and of its images only those this whole run lacks count.
    other = compared_run(layout, out_dir, set(shown))
    assert set(other["rows"]) == set(shown) and other["only_there"] == 0
    # A run that adds images changes the sample by those images only: the thumbnails already made stay in use.
    added = [dict(rows[0], image_id=content_key("added", n, length=IMAGE_ID_LENGTH)) for n in range(5)]
    write_parquet_atomic(manifest_table(added), layout.manifest_part("added"))
    _, data = page_data(write_report(out_dir, max_rows=80))
    again = {row["i"] for row in data["rows"]}
    assert len(again) == 80 and again - expected <= {row["image_id"] for row in added}
    assert data["quality"]["counts"]["rows"] == 305
    layout.manifest_part("added").unlink()
    # A manifest within the limit is shown whole.
    result = write_report(out_dir, max_rows=300)
    assert result.rows == result.total == 300 and "300 images in" in page_data(result)[0]


def test_structxlip_report_max_rows_from_the_command_line(tmp_path):
    make_synthetic_manifest(tmp_path, n_images=12, image_size=48)
    command = [sys.executable, "-m", "flows.cli", "report", str(tmp_path), "--max-rows"]
    done = subprocess.run([*command, "5"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("report of 5 of 13 images"), done.stderr[-2000:]
    refused = subprocess.run([*command, "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "structxlip report: error: argument --max-rows: expected a whole number >= 1, got '0'")


# ---- the page in a browser ------------------------------------------------------------------------------------
def _small_output_folder(out_dir: Path) -> dict:
    """A synthetic output folder with a hostile caption, training metrics, eval metrics and hand-made rankings."""
    make_synthetic_manifest(out_dir, n_images=6, image_size=96)
    layout = OutputLayout(out_dir)
    table = read_manifest(out_dir)
    rows = table.to_pylist()
    rows[1]["caption"] = HOSTILE_CAPTION
    rows[1]["filtered_caption"] = HOSTILE_CAPTION.replace("A red ", "A ")
    for part in parquet_parts(layout.manifest_dir):
        part.unlink()
    write_parquet_atomic(manifest_table(rows), layout.manifest_part("hostile"))
    layout.train_dir.mkdir(parents=True, exist_ok=True)
    layout.train_metrics.write_text("".join(
        json.dumps({"step": s, "epoch": (s - 1) // 3, "lr": 1e-4 / s, "loss": 3.0 / s, "loss/global": 2.0 / s,
                    "weight/global": 1.0}) + "\n" for s in range(1, 7)))
    layout.eval_dir.mkdir(parents=True, exist_ok=True)
    layout.eval_metrics.write_text(json.dumps({"n_pairs": 4, "t2i/R@1": 25.0, "t2i/mean_rank": 2.0}))
    ids = [r["image_id"] for r in rows if r["status"] == "ok"][:4]
    # Fine-tuned: query 2 finds its image at rank 4 (the worst), the others first; zero-shot: every query second.
    fine_top = [[0, 1, 2], [1, 0, 2], [0, 1, 3], [3, 0, 1]]
    zero_top = [[1, 0, 2], [0, 1, 2], [0, 2, 1], [0, 3, 1]]
    rankings = {"version": 1, "split": "test", "top_k": 3, "query": "caption", "image_ids": ids, "models": {
        "zero-shot": {"checkpoint": "z", "ranks": [2, 2, 2, 2], "top": zero_top, "scores": [[0.3, 0.2, 0.1]] * 4},
        "fine-tuned": {"checkpoint": "f", "ranks": [1, 1, 4, 1], "top": fine_top, "scores": [[0.9, 0.5, 0.1]] * 4},
    }}
    layout.eval_rankings.write_text(json.dumps(rankings))
    return {"rows": rows, "ids": ids}


@pytest.mark.e2e
def test_report_page_shows_regions_removed_words_and_retrieval_hits(tmp_path):
    if chromium() is None:
        pytest.skip("chromium not installed (`make browser` installs the Debian package)")
    out_dir = tmp_path / "out"
    made = _small_output_folder(out_dir)
    printed = run_report(out_dir)
    page = out_dir / "report" / "index.html"
    assert str(page) in printed

    dom = render(page, "", ARTIFACTS_DIR / "report-browser.png", tmp_path / "chromium-1", height=2600)
    # Region boxes: one SVG rect per segment of each image on the page (7 synthetic images incl. one failed, < 1 page).
    boxes = re.findall(r'<rect class="region-box"[^>]*>', dom)
    assert len(boxes) == sum(len(r["segments"] or []) for r in made["rows"]) > 0
    first = made["rows"][0]["segments"][0]["bbox"]
    assert f'x="{first["x1"]}" y="{first["y1"]}" width="{first["width"]}" height="{first["height"]}"' in boxes[0]
    # Removed words struck through in the raw caption: the synthetic filter drops the colour words.
    removed = re.findall(r'<del class="removed-word"[^>]*>([^<]*)</del>', dom)
    assert "red" in removed or "blue" in removed or "green" in removed
    # Hard negatives: the swapped words marked (the synthetic negatives swap the two colours, or the relation).
    assert len(re.findall(r'<mark class="swap">[^<]+</mark>', dom)) == sum(len(r["hard_negatives"] or [])
                                                                          for r in made["rows"])
    # The hostile caption is text, never markup: its tags appear escaped and no element was created from them.
    assert "&lt;img src=x onerror=" in dom and "&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in dom
    assert "<b>bold</b>" not in dom and "<title>pwned</title>" not in dom and 'src="x"' not in dom
    # Quality report, training curves and metrics rendered.
    assert 'class="plot plot-similarity_score"' in dom and 'class="plot plot-training"' in dom
    assert "Words removed by the filter" in dom and "<td>t2i</td>" in dom

    # Retrieval explorer: worst fine-tuned query first, its own image not first; a hit framed and ticked.
    queries = re.findall(r'<div class="query" data-query="(\d+)">', dom)
    assert queries[0] == "2" and sorted(queries) == ["0", "1", "2", "3"]
    first_query = dom[dom.index('data-query="2"'):dom.index('data-query="', dom.index('data-query="2"') + 5)]
    fine = first_query[first_query.index('data-model="fine-tuned"'):]
    assert fine.count('<figure class="hit"') == 0  # rank 4 is beyond top 3: no hit shown
    zero = first_query[first_query.index('data-model="zero-shot"'):first_query.index('data-model="fine-tuned"')]
    assert re.search(r"<figure class=\"miss\"[^>]*>.*?</figure><figure class=\"hit\"", zero, re.S)  # rank 2
    assert re.search(r'<figure class="hit"[^>]*><img[^>]*><figcaption><span class="hit-mark">✓ </span>1 · ', dom)

    # A link to one section shows it (screenshots of the quality report, training and the retrieval explorer).
    render(page, "view=quality", ARTIFACTS_DIR / "report-quality.png", tmp_path / "chromium-4", height=2400)
    render(page, "view=training", ARTIFACTS_DIR / "report-training.png", tmp_path / "chromium-5", height=1000)
    render(page, "view=retrieval", ARTIFACTS_DIR / "report-retrieval.png", tmp_path / "chromium-6", height=1600)

    # Filters through the URL: failed rows only; a text search.
    dom = render(page, "status=failed", ARTIFACTS_DIR / "report-failed.png", tmp_path / "chromium-2")
    assert "page 1 of 1 · 1 images" in dom and "cannot decode image" in dom
    dom = render(page, "q=onerror", ARTIFACTS_DIR / "report-search.png", tmp_path / "chromium-3")
    assert "page 1 of 1 · 1 images" in dom


SCALED_FAILURES = (
    "ingest: cannot identify image file",
    "structure: image is 1x1 pixels, too small for a structure map",
    "regions: no region found in the structure map",
    "no caption: no caption found for this image",
    "filter: caption filtering failed: ValueError: empty document",
)


def make_scaled_manifest(out_dir: str | os.PathLike, n_rows: int = 10_000, seed: int = 0,
                         failed_every: int = 37) -> Path:
    """Replace ``OUT/manifest`` with ``n_rows`` rows cycling through its current rows (a fresh synthetic folder is
    made first when ``OUT`` has no manifest); return the manifest folder.

    Each copy gets its own image id, a split by index, jittered similarity scores, every ``failed_every``-th row a
    failure from a rotating stage, and every 5th ok row no regions, while pointing at the same images, maps and crops,
    so a 10,000-row explorer (paging, filtering, lazy thumbnails) can be tried without 10,000 image files.
    """
    layout = OutputLayout(out_dir)
    if not parquet_parts(layout.manifest_dir):
        make_synthetic_manifest(layout.root, seed=seed)
    originals = read_manifest(layout.root).to_pylist()
    if not originals or n_rows < 1:
        raise ValueError(f"expected n_rows >= 1 and a manifest with rows in {layout.root}, got {n_rows} and "
                         f"{len(originals)} rows")
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n_rows):
        row = dict(originals[index % len(originals)])
        row["image_id"] = content_key("scaled", row["image_id"], index, length=IMAGE_ID_LENGTH)
        row["segments"] = [dict(s, similarity_score=float(np.float32((s.get("similarity_score") or 0.0)
                                                                       + rng.normal(0.0, 4.0))))
                           for s in row.get("segments") or []]
        if index % failed_every == failed_every - 1:
            failure = SCALED_FAILURES[(index // failed_every) % len(SCALED_FAILURES)]
            row.update(status=STATUS_FAILED, error=failure, split=None, filtered_caption=None, segments=[],
                       hard_negatives=[])
        elif row.get("status") == STATUS_OK:
            row["split"] = _split(index)
            if index % 5 == 4:
                row["segments"] = []
        rows.append(row)
    old_parts = parquet_parts(layout.manifest_dir)
    written = write_parquet_atomic(manifest_table(rows), layout.manifest_part(content_key("scaled", n_rows, seed)))
    for part in old_parts:
        if part.resolve() != written.resolve():
            part.unlink()
    return layout.manifest_dir


@pytest.mark.e2e
def test_report_pages_through_10000_rows(tmp_path):
    if chromium() is None:
        pytest.skip("chromium not installed (`make browser` installs the Debian package)")
    out_dir = tmp_path / "out"
    make_synthetic_manifest(out_dir, n_images=12, image_size=64)
    make_scaled_manifest(out_dir, n_rows=10_000)
    table = read_manifest(out_dir, columns=["status"])
    failed = int(pc.sum(pc.equal(table["status"], "failed")).as_py())
    assert table.num_rows == 10_000 and 0 < failed < 10_000
    # Embeddings as the evaluate stage writes them, for 2,000 of the images (the map's points).
    import numpy as np

    ok_ids = [r["image_id"] for r in read_manifest(out_dir, columns=["image_id", "status"]).to_pylist()
              if r["status"] == "ok"][:2000]
    rng = np.random.default_rng(0)
    layout = OutputLayout(out_dir)
    layout.eval_dir.mkdir(parents=True, exist_ok=True)
    np.savez(layout.eval_embeddings, image_ids=np.asarray(ok_ids), models=np.asarray(["fine-tuned"]),
             split=np.asarray("all"), has_structure=np.ones(len(ok_ids), bool),
             **{f"fine-tuned/{kind}": rng.normal(size=(len(ok_ids), 64)).astype(np.float16)
                for kind in ("image", "structure", "text")})
    printed = run_report(out_dir)
    page = out_dir / "report" / "index.html"
    print(printed.strip())

    dom = render(page, "page=200", ARTIFACTS_DIR / "report-10k-page200.png", tmp_path / "chromium-1")
    assert "page 200 of 417 · 10000 images" in dom  # 24 per page
    numbers = [int(n) for n in re.findall(r'class="rownum">#(\d+)<', dom)]
    assert numbers == list(range(199 * 24 + 1, 200 * 24 + 1))
    # Only the page's images are in the DOM, each loaded lazily.
    assert dom.count('<article class="card"') == 24
    assert all('loading="lazy"' in tag for tag in re.findall(r"<img [^>]*>", dom.split('id="quality"')[0]))
    ready_ms = re.search(r'data-ready-ms="(\d+)"', dom).group(1)
    render_ms = re.search(r'data-render-ms="([\d.]+)"', dom).group(1)
    print(f"10,000 rows: page ready {ready_ms} ms after navigation, one render {render_ms} ms")

    dom = render(page, "status=failed&page=2", ARTIFACTS_DIR / "report-10k-failed.png", tmp_path / "chromium-2")
    pages = -(-failed // 24)
    assert f"page 2 of {pages} · {failed} images" in dom
    assert dom.count('<span class="badge status-failed">failed</span>') == min(24, failed - 24)

    # A histogram bar at 10,000 rows filters to exactly its images (DuckDB over the manifest), and the map draws
    # one point per embedded image.
    import duckdb

    from tests.chromium import Page

    with Page(tmp_path / "chromium-3", height=1100) as browser:
        browser.goto(page.as_uri())
        browser.wait_for("document.body && document.body.dataset.rendered === '1'", "the explorer")
        bars = browser.evaluate("[...document.querySelectorAll('g.bar[data-hist=regions]')]"
                                ".map(g => [+g.dataset.bin, +g.dataset.count])")
        bin_, count = max(bars, key=lambda bar: bar[1])
        browser.click(f"g.bar[data-hist=regions][data-bin='{bin_}']")
        browser.wait_for(f"location.hash.includes('bin_regions={bin_}')")
        edges = json.loads(browser.evaluate("JSON.stringify(JSON.parse(document.getElementById('report-data')"
                                            ".textContent).hist.regions.edges)"))
        expected = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out_dir / 'manifest'}/*.parquet') WHERE "
                              f"status = 'ok' AND len(segments) >= {edges[bin_]} AND len(segments) < {edges[bin_ + 1]}")
        assert len(browser.evaluate("window.explorer.filteredIds()")) == count == expected.fetchall()[0][0]
        filter_ms = browser.evaluate("document.body.dataset.renderMs")
        browser.screenshot(ARTIFACTS_DIR / "report-10k-histogram.png")
        browser.click("[data-goto=map]")
        browser.wait_for("location.hash.includes('view=map')")
        assert browser.evaluate("window.explorer.mapPoints().length") == len(ok_ids)
        map_ms = browser.evaluate("document.body.dataset.renderMs")
        browser.screenshot(ARTIFACTS_DIR / "report-10k-map.png")
    print(f"10,000 rows: histogram filter render {filter_ms} ms, map of {len(ok_ids)} points {map_ms} ms")


def test_thumbnails_of_broken_sources_are_none_and_print_nothing(tmp_path, capfd):
    """A failed row's corrupt PNG gets no thumbnail, and no decoder message reaches the terminal (libpng writes its
    errors to stderr itself); a PNG and a JPEG still get theirs."""
    import cv2

    from pipelines.reporting.report import _thumbnail_jpeg

    good = np.full((40, 60, 3), 128, np.uint8)
    cv2.imwrite(str(tmp_path / "good.png"), good)
    cv2.imwrite(str(tmp_path / "good.jpg"), good)
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "header.png").write_bytes(data[:8] + b"\0\0\0\rIDAB" + data[16:])
    capfd.readouterr()
    assert _thumbnail_jpeg(str(tmp_path / "truncated.png"), 32, 60) is None
    assert _thumbnail_jpeg(str(tmp_path / "header.png"), 32, 60) is None
    for name in ("good.png", "good.jpg"):
        thumbnail = cv2.imdecode(np.frombuffer(_thumbnail_jpeg(str(tmp_path / name), 32, 60), np.uint8), 1)
        assert thumbnail.shape == (21, 32, 3)
    assert capfd.readouterr().err == ""

"""Quality report statistics on a five-row manifest whose every number is counted by hand below."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.reporting.quality import (
    edge_density,
    output_quality_report,
    failure_stage,
    histogram,
    quality_report,
    quality_tables,
    read_edge_density,
    removed_spans,
    removed_words,
    summary,
    vocabulary_categories,
)
from configs.schema import CONFIGS_DIR
from storage.atomic import write_png
from storage.layout import OutputLayout
from storage.manifest import bbox


def _segment(score: float) -> dict:
    return {"bbox": bbox(0, 0, 10, 10), "crop_path": None, "structure_crop_path": None, "caption": "x",
            "filtered_caption": "x", "similarity_score": score}


@pytest.fixture()
def tiny_manifest(tmp_path):
    layout = OutputLayout(tmp_path)
    edges = np.zeros((4, 5), np.uint8)
    edges[0, 0] = edges[1, 2] = edges[3, 4] = edges[2, 1] = 255  # 4 of 20 pixels: density 0.2
    map_a = layout.relative(write_png(tmp_path / "maps" / "a.canny.png", edges))
    map_b = layout.relative(write_png(tmp_path / "maps" / "b.canny.png", np.zeros((4, 5), np.uint8)))
    rows = [
        {"image_id": "a", "status": "ok", "split": "train", "width": 100, "height": 50,
         "caption": "A red shirt and a blue hat.", "filtered_caption": "A shirt and a hat.",
         "structure_path": map_a, "segments": [_segment(20.0), _segment(30.0)]},
        {"image_id": "b", "status": "ok", "split": "test", "width": 200, "height": 100,
         "caption": "An orange car.", "filtered_caption": "A car.", "structure_path": map_b, "segments": []},
        {"image_id": "c", "status": "failed", "error": "structure: cannot read the map", "segments": []},
        {"image_id": "d", "status": "failed", "error": "ingest: cannot identify image file", "segments": []},
        {"image_id": "e", "status": "ok", "split": "train", "width": 100, "height": 50,
         "caption": "The car is red.", "filtered_caption": "The car is red.", "structure_path": None,
         "segments": [_segment(10.0)]},
    ]
    return layout, rows


def test_removed_spans_mark_the_deleted_words_with_articles_rechosen():
    caption = "An orange shirt and a red hat. The shirt is red."
    assert removed_spans(caption, "A shirt and a hat.") == [(3, 9), (22, 25), (31, 34), (35, 40), (41, 43), (44, 47)]
    assert removed_words(caption, "A shirt and a hat.") == ["orange", "red", "the", "shirt", "is", "red"]
    assert removed_spans("A red car", "A red car") == []
    assert removed_spans("A red car", None) == []  # no filtering result: nothing to mark
    # Not a subsequence (a word the caption lacks): the full alignment still finds the one deletion.
    assert removed_words("The red car stops", "The car halts") == ["red", "stops"]


def test_summary_histogram_failure_stage_and_edge_density():
    assert summary([3, 7, 4]) == {"count": 3, "min": 3.0, "mean": 14 / 3, "median": 4.0, "max": 7.0}
    assert summary([])["count"] == 0 and summary([])["mean"] is None
    assert histogram([0, 1, 2, 3], bins=3) == {"edges": [0.0, 1.0, 2.0, 3.0], "counts": [1, 1, 2]}
    assert failure_stage("no caption: none found") == "no caption"
    assert failure_stage("regions: SAM failed: x") == "regions"
    assert failure_stage("xdog: not computed") == "xdog"  # a plugin stage's failures count under its name
    assert failure_stage("cannot decode image: not a PNG") == "other"
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0, 2] = 9
    assert edge_density(rgb) == 0.25


def test_a_rewritten_structure_map_is_measured_again(tmp_path):
    path = tmp_path / "a.canny.png"
    write_png(path, np.zeros((4, 5), np.uint8))
    assert read_edge_density(path) == 0.0
    edges = np.zeros((4, 5), np.uint8)
    edges[0] = 255
    write_png(path, edges)  # the same name, new content: measured again, not the remembered value
    assert read_edge_density(path) == 0.25
    path.unlink()
    assert read_edge_density(path) is None


def test_quality_report_matches_hand_counts(tiny_manifest):
    layout, rows = tiny_manifest
    report = quality_report(rows, word_categories=vocabulary_categories(CONFIGS_DIR / "vocab"), resolve_path=layout.resolve)

    assert report["counts"] == {"rows": 5, "ok": 3, "failed": 2, "by_split": {"test": 1, "train": 2},
                                "with_regions": 2, "without_regions": 1}
    # Words: "A red shirt and a blue hat" 7, "An orange car" 3, "The car is red" 4; filtered 5, 2, 4.
    length = report["caption_length"]
    assert length["raw"] == {"count": 3, "min": 3.0, "mean": 14 / 3, "median": 4.0, "max": 7.0}
    assert length["filtered"] == {"count": 3, "min": 2.0, "mean": 11 / 3, "median": 4.0, "max": 5.0}
    assert sum(length["histogram"]["raw"]) == 3 and sum(length["histogram"]["filtered"]) == 3

    removed = report["removed_words"]
    assert removed["total"] == 3 and removed["captions_changed"] == 2 and removed["captions_unchanged"] == 1
    assert removed["top"] == [["red", 1], ["blue", 1], ["orange", 1]]
    assert removed["by_category"] == {"colors": [["red", 1], ["blue", 1], ["orange", 1]]}

    assert report["regions_per_image"]["counts"] == {"0": 1, "1": 1, "2": 1}
    assert report["regions_per_image"]["summary"]["mean"] == 1.0

    scores = report["similarity_score"]
    assert scores["summary"] == {"count": 3, "min": 10.0, "mean": 20.0, "median": 20.0, "max": 30.0}
    # 20 bins of width 1 over [10, 30]: 10 -> bin 0, 20 -> bin 10, 30 -> the last bin (right edge included).
    counts = scores["histogram"]["counts"]
    assert len(counts) == 20 and counts[0] == counts[10] == counts[19] == 1 and sum(counts) == 3
    assert "100 * cos" in scores["scale"]

    size = report["image_size"]
    assert size["width"]["count"] == 3 and math.isclose(size["width"]["mean"], 400 / 3)
    assert size["common"] == [["100x50", 2], ["200x100", 1]]

    density = report["edge_density"]
    assert density["measured"] == 2 and density["unreadable"] == 0
    assert density["summary"]["min"] == 0.0 and density["summary"]["max"] == 0.2
    assert math.isclose(density["summary"]["mean"], 0.1)

    assert report["failures"] == {
        "count": 2, "by_stage": {"structure": 1, "ingest": 1},
        "reasons": [["structure: cannot read the map", 1], ["ingest: cannot identify image file", 1]],
    }


def test_edge_maps_are_sampled_and_missing_ones_counted(tiny_manifest):
    layout, rows = tiny_manifest
    rows[1]["structure_path"] = "maps/missing.canny.png"
    report = quality_report(rows, resolve_path=layout.resolve, max_edge_maps=1)
    # One map read (the first by image id, "a"); without word categories no per-category split.
    assert report["edge_density"]["measured"] == 1 and report["edge_density"]["summary"]["mean"] == 0.2
    assert report["removed_words"]["by_category"] == {}
    report = quality_report(rows, resolve_path=layout.resolve)
    assert report["edge_density"]["measured"] == 1 and report["edge_density"]["unreadable"] == 1


def test_quality_tables_flatten_the_report(tiny_manifest):
    layout, rows = tiny_manifest
    tables = quality_tables(quality_report(rows, word_categories=vocabulary_categories(CONFIGS_DIR / "vocab")))
    assert tables["distributions"][0] == {"quantity": "caption length, raw (words)", "count": 3, "min": 3.0,
                                          "mean": 14 / 3, "median": 4.0, "max": 7.0}
    assert tables["removed_words"] == [{"word": w, "category": "colors", "count": 1} for w in ("red", "blue", "orange")]
    assert tables["failures"] == [
        {"stage": "structure", "reason": "structure: cannot read the map", "count": 1},
        {"stage": "ingest", "reason": "ingest: cannot identify image file", "count": 1},
    ]


def test_output_quality_report_reads_a_synthetic_folder(tmp_path):
    from structxlip.app.synthetic import make_synthetic_manifest

    make_synthetic_manifest(tmp_path, n_images=4, image_size=64)
    report = output_quality_report(tmp_path, vocab_dir=CONFIGS_DIR / "vocab")
    # 4 shape images + 1 undecodable file; each synthetic caption loses exactly its two colour words.
    assert report["counts"]["rows"] == 5 and report["counts"]["failed"] == 1
    assert report["removed_words"]["total"] == 8 and report["removed_words"]["captions_changed"] == 4
    assert set(report["removed_words"]["by_category"]) == {"colors"}
    assert report["edge_density"]["measured"] == 4 and report["edge_density"]["summary"]["min"] > 0
    assert report["failures"]["by_stage"] == {"other": 1}


def test_a_manifest_in_parts_is_reported_batch_by_batch_once_per_state(tiny_manifest, monkeypatch):
    from pipelines.reporting import quality
    from storage.manifest import manifest_table
    from storage.parquet import write_parquet_atomic

    layout, rows = tiny_manifest
    stored = [{"source_path": f"/images/{row['image_id']}.jpg", **row} for row in rows]
    write_parquet_atomic(manifest_table(stored[:3]), layout.manifest_part("a"))
    write_parquet_atomic(manifest_table(stored[3:]), layout.manifest_part("b"))
    monkeypatch.setattr(quality, "BATCH_ROWS", 2)  # parts of 3 and 2 rows: three batches
    added = []
    add = quality._Accumulator.add
    monkeypatch.setattr(quality._Accumulator, "add",
                        lambda self, batch, *more: added.append(batch.num_rows) or add(self, batch, *more))
    captioned = []  # rows whose captions were counted (the per-row Python part)
    count = quality._CaptionCounts.add
    monkeypatch.setattr(quality._CaptionCounts, "add",
                        lambda self, captions, filtered: captioned.append(len(captions)) or count(self, captions, filtered))
    quality._manifest_quality.cache_clear()

    report = output_quality_report(layout.root, vocab_dir=CONFIGS_DIR / "vocab")
    assert added == [2, 1, 2]
    # The hand counts of test_quality_report_matches_hand_counts, from the files.
    report_of_rows = quality_report(rows, word_categories=vocabulary_categories(CONFIGS_DIR / "vocab"),
                                    resolve_path=layout.resolve)
    assert report == report_of_rows
    assert report["counts"]["rows"] == 5 and report["removed_words"]["total"] == 3
    assert report["edge_density"]["measured"] == 2 and report["similarity_score"]["summary"]["mean"] == 20.0
    added.clear()

    # The run's explorer asks again: the same manifest is answered from memory, and a change of the answer stays local.
    report["counts"]["rows"] = -1
    assert output_quality_report(layout.root, vocab_dir=CONFIGS_DIR / "vocab")["counts"]["rows"] == 5
    assert added == []
    # A rewritten manifest is read again.
    layout.manifest_part("b").unlink()
    assert output_quality_report(layout.root, vocab_dir=CONFIGS_DIR / "vocab")["counts"]["rows"] == 3
    assert added == [2, 1]

    # The captions of a part are counted once: a later report (another process) reads their counts from OUT/cache,
    # and counts the captions of a new part only; the report is the one counted row by row.
    write_parquet_atomic(manifest_table(stored[3:]), layout.manifest_part("b"))
    quality._manifest_quality.cache_clear()
    captioned.clear()
    assert output_quality_report(layout.root, vocab_dir=CONFIGS_DIR / "vocab") == report_of_rows
    assert captioned == [1] and layout.quality_captions.is_file()  # part b's ok row (its other row failed)
    quality._manifest_quality.cache_clear()
    captioned.clear()
    assert output_quality_report(layout.root, vocab_dir=CONFIGS_DIR / "vocab") == report_of_rows
    assert captioned == []
    layout.quality_captions.unlink()  # safe to delete: counted again
    quality._manifest_quality.cache_clear()
    assert output_quality_report(layout.root, vocab_dir=CONFIGS_DIR / "vocab") == report_of_rows
    assert captioned == [2, 0, 1]  # every ok row, batch by batch

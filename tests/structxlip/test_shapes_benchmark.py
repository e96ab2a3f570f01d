"""The generated shapes benchmark: deterministic, ingestible, captions that match the drawing, and the intended
colour/texture shift between train and test."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from pipelines.steps.ingest import read_captions, scan_images
from storage.manifest import read_manifest
from structxlip.app.shapes_benchmark import (
    COLOURS,
    HOME_COLOUR,
    Shape,
    _describe,
    make_benchmark,
    read_benchmark,
    sample_scene,
    scene_rng,
)
from tests.benchmark_manifest import benchmark_manifest


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_benchmark(tmp_path / "a", images=10, seed=3)
    b = make_benchmark(tmp_path / "b", images=10, seed=3)
    c = make_benchmark(tmp_path / "c", images=10, seed=4)
    assert _files(a.root) == _files(b.root)
    assert (a.root / "train" / "scene-00000.png").read_bytes() != (c.root / "train" / "scene-00000.png").read_bytes()


def test_a_scene_does_not_depend_on_how_many_images_are_made(tmp_path):
    small = make_benchmark(tmp_path / "small", images=10, seed=0)
    large = make_benchmark(tmp_path / "large", images=30, seed=0)
    for split in ("train", "test"):
        assert (small.split_dirs[split] / "scene-00001.png").read_bytes() == \
            (large.split_dirs[split] / "scene-00001.png").read_bytes()


def test_folders_counts_and_captions_are_what_ingest_reads(tmp_path):
    benchmark = make_benchmark(tmp_path / "bench", images=20, seed=0, test_fraction=0.25)
    assert benchmark.counts == {"train": 15, "test": 5}
    assert read_benchmark(benchmark.root)["counts"] == {"train": 15, "test": 5}
    assert read_benchmark(tmp_path) is None
    for split, count in benchmark.counts.items():
        scan = scan_images(benchmark.split_dirs[split], extensions=["png"])
        assert len(scan.files) == count and not scan.problems
        index = read_captions(benchmark.split_dirs[split], scan.files)
        assert not index.problems
        assert all(caption.caption_source == "jsonl" and caption.caption for caption in index.entries.values())


def test_caption_names_count_shapes_sizes_positions_overlaps_and_colours():
    shapes = (Shape("circle", "red", "large", "top left", (0, 0, 40, 40)),
              Shape("star", "blue", "small", "centre", (30, 30, 60, 60)))
    scene = _describe(shapes, "striped", ((1, 0),))
    assert scene.caption == ("two shapes on a striped background. a large red circle at the top left. "
                             "a small blue star in the centre. the star overlaps the circle.")
    assert scene.filtered_caption == ("two shapes on a background. a large circle at the top left. "
                                      "a small star in the centre. the star overlaps the circle.")
    assert scene.local_captions == ("a large red circle at the top left", "a small blue star in the centre")


def test_each_shape_is_drawn_in_its_colour():
    for index in range(20):
        scene, image = sample_scene(scene_rng(0, "train", index), "train", 128)
        top = scene.shapes[-1]  # drawn last, so nothing covers its centre
        x1, y1, x2, y2 = top.box
        pixel = image[(y1 + y2) // 2, (x1 + x2) // 2].astype(float)
        nearest = min(COLOURS, key=lambda name: np.linalg.norm(pixel - np.array(COLOURS[name])))
        assert nearest == top.colour, (index, top)


def test_test_split_shifts_colour_and_texture_statistics():
    train = [sample_scene(scene_rng(0, "train", i), "train", 64)[0] for i in range(300)]
    test = [sample_scene(scene_rng(0, "test", i), "test", 64)[0] for i in range(300)]
    home_train = np.mean([s.colour == HOME_COLOUR[s.kind] for scene in train for s in scene.shapes])
    home_test = np.mean([s.colour == HOME_COLOUR[s.kind] for scene in test for s in scene.shapes])
    # train: 0.8 + 0.2/6 ~ 0.83 in expectation; test: uniform colours, 1/6 ~ 0.17
    assert home_train > 0.75 and home_test < 0.25
    assert all(len({s.colour for s in scene.shapes}) == 1 for scene in test)
    assert any(len({s.colour for s in scene.shapes}) > 1 for scene in train)
    textures_train, textures_test = Counter(s.texture for s in train), Counter(s.texture for s in test)
    assert textures_train["striped"] + textures_train["checkered"] > 0.8 * len(train)
    assert textures_test["dotted"] + textures_test["textured"] > 0.8 * len(test)
    assert Counter(len(s.shapes) for s in train).keys() == {1, 2, 3}


def test_too_few_images_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2 train and 2 test"):
        make_benchmark(tmp_path / "x", images=4, seed=0)


def test_ground_truth_manifest_keeps_splits_and_one_segment_per_shape(tmp_path):
    benchmark = make_benchmark(tmp_path / "bench", images=10, seed=0)
    rows = read_manifest(benchmark_manifest(benchmark.root, tmp_path / "data")).to_pylist()
    assert Counter(row["split"] for row in rows) == {"train": 8, "test": 2}
    scenes = {json.loads(line)["caption"]: json.loads(line)
              for split in ("train", "test")
              for line in (benchmark.root / split / "scenes.jsonl").read_text().splitlines()}
    for row in rows:
        scene = scenes[row["caption"]]
        assert len(row["segments"]) == len(scene["shapes"])
        assert [s["bbox"]["x1"] for s in row["segments"]] == [shape["box"][0] for shape in scene["shapes"]]
        assert not any(colour in row["filtered_caption"].split() for colour in COLOURS)

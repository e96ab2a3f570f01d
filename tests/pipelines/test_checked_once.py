"""A run checks each stage part's output files once (``Pipeline._checked``, ``StageStore.stored(checked=...)``): the
engine re-reads every later stage after each stage writes, and a run that adds two images to a catalogue used to
stat the catalogue's files once per re-read. The verdict of a part is kept by its path and stat fields, so a part
written again is checked again, and a new run (a new ``Pipeline``) checks everything afresh."""

from __future__ import annotations

import collections
import shutil

import pyarrow as pa

import storage.stage_store as stage_store
from configs import load_config
from pipelines.engine.execute import run_inline
from pipelines.engine.plan import Pipeline
from storage.layout import OutputLayout
from storage.stage_store import OUTPUT_TYPE, StageStore
from tests.corpus import make_generated_images

DATA = ["ingest", "structure", "regions", "captions", "filter", "manifest"]
CONFIG = {"model.clip_model": "structxlip/tiny-clip", "regions.method": "structure", "regions.max_regions": 3,
          "runtime.chunk_size": 2, "runtime.workers": 1, "captions.device": "cpu"}


def _counting_sizes(monkeypatch) -> collections.Counter:
    """Count every output file the store stats (``_sizes``), by path."""
    counted: collections.Counter = collections.Counter()
    real = stage_store._sizes

    def sizes(paths):
        counted.update(paths)
        return real(paths)

    monkeypatch.setattr(stage_store, "_sizes", sizes)
    return counted


def test_a_run_with_new_images_checks_each_output_file_once(tmp_path, monkeypatch):
    images = tmp_path / "images"
    paths = make_generated_images(images, 4, size=(96, 72))
    out = tmp_path / "out"
    run_inline(Pipeline(images, out, load_config(overrides=CONFIG)), DATA)
    for n, path in enumerate(paths[:2]):  # two new images (new bytes: mirrored), with captions of their own
        from PIL import Image

        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / f"new_{n}.jpg", quality=95)
    with (images / "captions.jsonl").open("a", encoding="utf-8") as lines:
        for n in range(2):
            lines.write(f'{{"file_name": "new_{n}.jpg", "caption": "A mirrored scene with a blue circle."}}\n')
    counted = _counting_sizes(monkeypatch)
    summaries = run_inline(Pipeline(images, out, load_config(overrides=CONFIG)), DATA)
    assert [s["processed"] for s in summaries[:5]] == [2, 2, 2, 2, 2]
    assert counted, "the run checked no output file"
    assert max(counted.values()) == 1, counted.most_common(3)
    # Every file the stages list (the new images' too) was checked by some read.
    listed = set()
    layout = OutputLayout(out)
    for stage, definition in Pipeline(images, out, load_config(overrides=CONFIG)).stages.items():
        if stage in DATA and "outputs" in definition.schema.names:
            store = StageStore(layout, stage, Pipeline(images, out, load_config(overrides=CONFIG)).keys[stage],
                               definition.schema)
            for part in store.parts():
                table = store._read_part(part, ["outputs"])
                listed.update(f"{layout.root}/{o['path']}" for row in table.column("outputs").to_pylist()
                              for o in row or ())
    assert listed and listed - set(counted) <= {p for p in listed if "new_" in p}  # (new ones: written this run)


def _store_with_one_file(tmp_path) -> tuple[StageStore, pa.Table]:
    schema = pa.schema([pa.field("item_key", pa.string(), nullable=False), pa.field("status", pa.string()),
                        pa.field("outputs", OUTPUT_TYPE)])
    layout = OutputLayout(tmp_path)
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "a.png").write_bytes(b"12345")
    store = StageStore(layout, "structure", "k1", schema)
    store.write_part([{"item_key": "a", "status": "ok", "outputs": [{"path": "maps/a.png", "size": 5}]}])
    return store, schema


def test_a_part_written_again_is_checked_again(tmp_path):
    store, _ = _store_with_one_file(tmp_path)
    checked: dict = {}
    assert store.stored(checked=checked).invalid == {}
    (tmp_path / "maps" / "a.png").unlink()
    # The same part, unchanged: its verdict is the one kept (a run checks a part's files once) ...
    assert store.stored(checked=checked).invalid == {}
    # ... without ``checked`` (another run), or once the part is written again, its files are checked again.
    assert store.stored().invalid == {"a": "maps/a.png is missing"}
    shutil.copyfile(store.parts()[0], tmp_path / "copy")
    (tmp_path / "copy").replace(store.parts()[0])
    assert store.stored(checked=checked).invalid == {"a": "maps/a.png is missing"}


def test_a_new_run_finds_a_file_removed_after_the_last_one(tmp_path):
    images = tmp_path / "images"
    make_generated_images(images, 2, size=(96, 72))
    out = tmp_path / "out"
    run_inline(Pipeline(images, out, load_config(overrides=CONFIG)), DATA)
    maps = sorted((out / "maps").rglob("*.png"))
    maps[0].unlink()
    summaries = run_inline(Pipeline(images, out, load_config(overrides=CONFIG)), DATA[:2])
    assert summaries[1]["processed"] == 1 and maps[0].is_file()

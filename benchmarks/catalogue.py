"""A million-image catalogue with nothing to do: ``structxlip run`` (the CLI as a user runs it, a fresh process tree)
on a synthesised output folder of N images whose every data stage is done, beside the same command on a small
catalogue of the same kind; the cost beyond the small run, per image, is what the catalogue's size adds.

Synthesised, without computing a stage (N = 1,000,000; $STRUCTXLIP_BENCH_CATALOGUE; 2,000 with --quick; the small
catalogue: 1,000 images, 200 with --quick):
- the images folder: N files in folders of 1,000, hard links to a few tiny PNGs (distinct paths and so distinct file
  keys; links keep the file system's inode count within reach), and ``captions.jsonl`` with one caption per file;
- every data stage's store as a run of the demo config leaves it: the stage keys of ``configs/demo.yaml``, parts of
  256 rows (the chunk size's cap) compacted as the run does at the stage's end (``StageStore.compact``), ok rows keyed as the stages key them (file keys, image ids, text keys), two
  structure maps and ``REGIONS`` regions of two crops per image (empty files, hard-linked: 2 + 2 x REGIONS output
  files per image, each checked by the run), and the manifest (parts of 50,000 rows) with its stage row, keyed by
  ``Manifest.item_key`` of the synthesised folder;
- the explorer page a previous run wrote (a cached run only checks that it is there), and what that run keeps in
  ``OUT/cache/``: each manifest row's signature and the quality report's caption counts per manifest part.
Per row: the folder's images and output files, wall seconds and the tree's peak PSS and CPU (``scale.measure_tree``),
and what the run printed for the first stage (it must report every image cached and none processed). The 1-minute load
average is taken before each row. The last row adds ``ADDED`` generated 640x480 photos with captions to the large
catalogue and runs again: every stage must compute those only; it reports the wall, CPU and PSS of the whole tree,
the stages' seconds, and the manifest stage's seconds and rows written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from benchmarks.common import BenchmarkResult, Target
from benchmarks.scale import CONFIG, ROOT, measure_tree

SIZE_ENV = "STRUCTXLIP_BENCH_CATALOGUE"
FILES_PER_FOLDER = 1000
ROWS_PER_PART = 256  # pipelines.engine.plan.MAX_CHUNK: the largest part a run writes
REGIONS = 1
ADDED = 20  # generated photos the last row adds to the large catalogue
LINKS_PER_FILE = 60_000  # below ext4's 65,000 links per inode


class _Linker:
    """Creates files as hard links to a few real files (a new one every ``LINKS_PER_FILE`` links)."""

    def __init__(self, folder: Path, suffix: str, data: bytes):
        self.folder, self.suffix, self.data = folder, suffix, data
        self.count, self.base = 0, None

    def link(self, path: str) -> None:
        if self.count % LINKS_PER_FILE == 0:
            self.base = self.folder / f"base-{self.count // LINKS_PER_FILE}{self.suffix}"
            self.base.write_bytes(self.data)
        self.count += 1
        os.link(self.base, path)


def synthesise(root: Path, n: int) -> tuple[Path, Path, int]:
    """Write the images folder and the finished output folder of ``n`` images under ``root``; return both and the
    number of output files."""
    from configs import load_config
    from pipelines.engine.plan import Pipeline
    from pipelines.engine.stages import text_item_key
    from storage.hashing import content_key
    from storage.parquet import write_parquet_atomic
    from storage.stage_store import ITEM_KEY, OUTPUTS, StageStore

    images, out = root / "images", root / "out"
    bases = root / "bases"
    for folder in (images, out, bases):
        folder.mkdir(parents=True)
    _ok, png = cv2.imencode(".png", np.full((8, 8, 3), 127, np.uint8))
    pictures = _Linker(bases, ".png", png.tobytes())
    names = [f"{i // FILES_PER_FOLDER:04d}/img-{i:07d}.png" for i in range(n)]
    for start in range(0, n, FILES_PER_FOLDER):
        (images / names[start]).parent.mkdir()
    captions = [f"a small grey square number {i} beside a round shape" for i in range(n)]
    with open(images / "captions.jsonl", "w", encoding="utf-8") as handle:
        for name, caption in zip(names, captions):
            pictures.link(str(images / name))
            handle.write(json.dumps({"file": name, "caption": caption}) + "\n")

    pipeline = Pipeline(images, out, load_config(CONFIG))
    layout, keys = pipeline.layout, pipeline.keys
    files = pipeline.scan.files
    if len(files) != n:
        raise RuntimeError(f"expected {n} scanned images, got {len(files)}")
    ids = [content_key("synthetic image", i, length=32) for i in range(n)]
    paths = [f.source_path for f in files]
    empty = _Linker(bases, ".empty", b"")
    outputs_per_image = 2 + 2 * REGIONS

    def files_of(kinds: list[Path]) -> list[dict]:
        relative = []
        for path in kinds:
            path.parent.mkdir(parents=True, exist_ok=True)
            empty.link(str(path))
            relative.append({"path": layout.relative(path), "size": 0})
        return relative

    status = {"status": ["ok"] * n, "error": [None] * n}
    structure_key, regions_key = keys["structure"], keys["regions"]
    maps = [files_of([layout.structure_map(i, structure_key, kind) for kind in ("canny", "scribble")]) for i in ids]
    crops = [files_of([p for r in range(REGIONS) for p in (layout.crop(i, regions_key, r),
                                                            layout.structure_crop(i, regions_key, r))]) for i in ids]
    box = {"x1": 0, "y1": 0, "x2": 8, "y2": 8}
    segments = [[{"bbox": box, "crop_path": c[2 * r]["path"], "structure_crop_path": c[2 * r + 1]["path"],
                  "caption": None, "filtered_caption": None, "similarity_score": None} for r in range(REGIONS)]
                for c in crops]
    scored = [[{**s, "caption": caption, "similarity_score": 0.25} for s in image_segments]
              for image_segments, caption in zip(segments, captions)]
    text_keys = [text_item_key(i, caption) for i, caption in zip(ids, captions)]
    filtered = [caption.replace("grey ", "") for caption in captions]
    columns = {
        "ingest": {ITEM_KEY: [f.file_key for f in files], "image_id": ids, **status, OUTPUTS: [[]] * n,
                   "source_path": paths, "width": [8] * n, "height": [8] * n, "note": [None] * n},
        "structure": {ITEM_KEY: ids, "image_id": ids, **status, OUTPUTS: maps,
                      "structure_path": [m[0]["path"] for m in maps], "scribble_path": [m[1]["path"] for m in maps]},
        "regions": {ITEM_KEY: ids, "image_id": ids, **status, OUTPUTS: crops, "segments": segments,
                    "region_method": ["grouping"] * n},
        "captions": {ITEM_KEY: text_keys, "image_id": ids, **status, OUTPUTS: [[]] * n, "caption": captions,
                     "caption_source": ["jsonl"] * n, "segments": scored},
        "filter": {ITEM_KEY: text_keys, "image_id": ids, **status, OUTPUTS: [[]] * n, "filtered_caption": filtered,
                   "segments": [[{**s, "filtered_caption": f} for s in image_segments]
                                for image_segments, f in zip(scored, filtered)],
                   "hard_negatives": [[f"{f} upside down"] for f in filtered]},
    }
    for stage, values in columns.items():
        schema = pipeline.stages[stage].schema
        table = pa.table({name: values.get(name, [None] * n) for name in schema.names}, schema=schema)
        for start in range(0, n, ROWS_PER_PART):
            part = table.slice(start, ROWS_PER_PART)
            part_key = content_key(sorted(part.column(ITEM_KEY).to_pylist()))
            write_parquet_atomic(part, layout.stage_part(stage, keys[stage], part_key))
        StageStore(layout, stage, keys[stage], schema).compact()  # as the run that wrote the parts does at its end

    from storage.manifest import MANIFEST_SCHEMA
    from pipelines.steps.manifest import MAX_ROWS_PER_PART, assign_split

    ratios = dict(pipeline.config.manifest.split_ratios)
    manifest = {"image_id": ids, "source_path": paths, "status": ["ok"] * n, "error": [None] * n,
                "width": [8] * n, "height": [8] * n, "split": [assign_split(i, ratios) for i in ids],
                "caption": captions, "caption_source": ["jsonl"] * n, "filtered_caption": filtered,
                "structure_path": columns["structure"]["structure_path"],
                "scribble_path": columns["structure"]["scribble_path"],
                "segments": columns["filter"]["segments"], "hard_negatives": columns["filter"]["hard_negatives"]}
    table = pa.table({name: manifest.get(name, [None] * n) for name in MANIFEST_SCHEMA.names}, schema=MANIFEST_SCHEMA)
    table = table.sort_by("image_id")
    parts = []
    for start in range(0, n, MAX_ROWS_PER_PART):
        part = table.slice(start, MAX_ROWS_PER_PART)
        parts.append(write_parquet_atomic(part, layout.manifest_part(content_key(
            "synthetic manifest", start, length=32))))
    pipeline = Pipeline(images, out, load_config(CONFIG))  # reads what was just written
    relative = [layout.relative(p) for p in parts]
    result = {"rows": n, "ok": n, "written_rows": n, "kept_rows": 0, "duplicates": 0, "parts": relative}
    stage = pipeline.stages["manifest"]
    row = {ITEM_KEY: stage.item_key(pipeline), "image_id": None, "status": "ok", "error": None,
           OUTPUTS: [{"path": p, "size": (out / p).stat().st_size} for p in relative], "result": json.dumps(result)}
    write_parquet_atomic(pa.Table.from_pylist([row], schema=stage.schema),
                         layout.stage_part("manifest", keys["manifest"], content_key([row[ITEM_KEY]])))
    layout.report_index.parent.mkdir(parents=True, exist_ok=True)
    layout.report_index.write_text("<!doctype html><title>explorer of a previous run</title>\n", encoding="utf-8")
    # What the run that wrote the manifest keeps beside it: each row's signature (the manifest above is the one its
    # rows build: checked on small catalogues by tests/benchmarks) and the quality report's caption counts per part.
    from pipelines.reporting.quality import output_quality_report
    from pipelines.steps.manifest import manifest_digest
    from storage.parquet import write_derived

    write_derived(layout.manifest_index, manifest_digest(layout.manifest_dir), pipeline.manifest_signatures())
    output_quality_report(out, max_edge_maps=0)
    return images, out, n * outputs_per_image


def _command(images: Path, out: Path) -> list[str]:
    from pipelines.engine.stages import data_stage_names

    return [sys.executable, "-m", "flows.cli", "run", str(images), "--out", str(out), "--config", str(CONFIG),
            "--stages", ",".join(data_stage_names())]


def _cached_row(label: str, n: int, root: Path, env: dict) -> dict:
    started = time.perf_counter()
    images, out, outputs = synthesise(root, n)
    synthesis_s = time.perf_counter() - started
    log = root / "run.log"
    load = os.getloadavg()[0]
    usage = measure_tree(_command(images, out), log=log, env=env, timeout_s=3600)
    printed = log.read_text(encoding="utf-8", errors="replace")
    if usage.returncode != 0:
        raise RuntimeError(f"{label} exited with {usage.returncode}: {printed[-2000:]}")
    first = next(line for line in printed.splitlines() if line.startswith("ingest "))
    processed, cached = (int(v) for v in first.split()[1:3])
    if processed or cached != n:
        raise RuntimeError(f"{label}: expected {n} cached images and none processed, the run printed: {first}")
    return {"run": label, "images": n, "output_files": outputs, "wall_s": usage.wall_s,
            "peak_tree_pss_mb": usage.peak_pss_mb, "tree_cpu_s": usage.cpu_s, "synthesis_s": synthesis_s,
            "load_1m": load}


def _added_row(label: str, n: int, added: int, root: Path, env: dict) -> dict:
    """``structxlip run`` after ``added`` generated 640x480 photos (with captions) joined the catalogue at ``root``:
    what a user adding a few images to a large catalogue waits for; every stage must compute those images only."""
    from benchmarks.scale import new_run_report, timing_row
    from tests.corpus import make_generated_images

    images, out = root / "images", root / "out"
    make_generated_images(images / "added", added, seed=7)
    own = images / "added" / "captions.jsonl"  # its lines join the catalogue's captions file
    with open(images / "captions.jsonl", "a", encoding="utf-8") as handle:
        for line in own.read_text(encoding="utf-8").splitlines():
            handle.write(json.dumps({**json.loads(line), "file": f"added/{json.loads(line)['file']}"}) + "\n")
    own.unlink()
    known = {p.name for p in (out / "runs").glob("*.json")}
    load = os.getloadavg()[0]
    log = root / "added.log"
    usage = measure_tree(_command(images, out), log=log, env=env, timeout_s=3600)
    if usage.returncode != 0:
        raise RuntimeError(f"{label} exited with {usage.returncode}: {log.read_text(errors='replace')[-2000:]}")
    stages = new_run_report(out / "runs", known)["stages"]
    wrong = [s["stage"] for s in stages if "rows" not in s and int(s["processed"]) != added]
    if wrong:
        raise RuntimeError(f"{label}: expected {added} images computed by every data stage, not so in {wrong}")
    row = timing_row(label, usage, stages, load)
    manifest = next(s for s in stages if "rows" in s)
    return {"run": label, "images": n + added, "wall_s": usage.wall_s, "peak_tree_pss_mb": usage.peak_pss_mb,
            "tree_cpu_s": usage.cpu_s, "stages_s": row["stages_s"], "manifest_s": float(manifest["seconds"]),
            "manifest_rows_written": int(manifest["processed"]), "load_1m": load}


def run(*, quick: bool = False, n_images: int | None = None) -> BenchmarkResult:
    """Return the small and the large catalogue's fully cached ``structxlip run`` and the cost per image between."""
    n = n_images or (2000 if quick else int(os.environ.get(SIZE_ENV) or 1_000_000))
    small = 200 if quick else 1000
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    rows = []
    load_before = os.getloadavg()[0]
    for label, size in (("small catalogue, fully cached", small), ("large catalogue, fully cached", n)):
        root = Path(tempfile.mkdtemp(prefix="bench-catalogue-"))
        env["PREFECT_HOME"] = str(root / "prefect-home")
        try:
            rows.append(_cached_row(label, size, root, env))
            if size == n:
                added_row = _added_row(f"large catalogue, +{ADDED} images", n, ADDED, root, env)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    first, last = rows
    added = last["images"] - first["images"]
    us_per_image = 1e6 * (last["wall_s"] - first["wall_s"]) / added
    kb_per_image = 1024 * (last["peak_tree_pss_mb"] - first["peak_tree_pss_mb"]) / added
    rows.append({"run": "beyond the small catalogue, per image", "images": added,
                 "output_files": last["output_files"] - first["output_files"], "wall_us_per_image": us_per_image,
                 "pss_kb_per_image": kb_per_image,
                 "cpu_us_per_image": 1e6 * (last["tree_cpu_s"] - first["tree_cpu_s"]) / added})
    rows.append(added_row)
    return BenchmarkResult(
        name="catalogue",
        description=f"A fully cached `structxlip run` (data stages, demo config) on a synthesised catalogue of {n:,} "
                    f"images ({2 + 2 * REGIONS} output files each) beside one of {small:,}: what the catalogue's "
                    "size adds per image.",
        params={"images": n, "small": small, "regions_per_image": REGIONS, "rows_per_part": ROWS_PER_PART,
                "load_1m_before": load_before, "load_1m_after": os.getloadavg()[0]},
        rows=rows,
        targets=[Target(f"fully cached run, wall beyond {small:,} images", us_per_image, 30.0, "at_most",
                        " us/image"),
                 Target(f"fully cached run, tree peak PSS beyond {small:,} images", kb_per_image, 2.0, "at_most",
                        " KB/image")],
        notes=[f"{n:,} images in folders of {FILES_PER_FOLDER:,} and their store were synthesised in "
               f"{last['synthesis_s']:.0f} s (not part of the run); every output file of the store is checked by the "
               "run (its size, one stat each).",
               "KB are KiB: 1024 bytes."],
    )

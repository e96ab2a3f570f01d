"""Data stages against the floor: per stage, the pipeline's images/s (``pipelines.engine.execute.run_inline``: the stage engine
and store the flows use, without an orchestrator), the bare library call's images/s (``Stage.run`` over every image
in one call, models warm) and the floor measured in the same run from primitives; then the whole data pipeline cold
and fully cached: wall, CPU, peak RSS and the real process/thread count.

Floors (CPU-ms per image on one thread, median over a sample; images/s = usable cores x 1000 / ms):
- ingest: read the file + SHA-256 + one reduced JPEG decode (OpenCV 1/8 grey: reads the whole stream, so it still
  catches truncated files).
- structure: grey decode + resize to ``long_side`` + Canny + scribble + PNG encode of both maps + writing them as
  two new files (plain open/write/close).
- regions: colour decode + structure-map PNG decode + every crop cut from memory and encoded (JPEG, and PNG for its
  structure crop) + writing those files; with the grouping proposer also its graph segmentation (skimage
  Felzenszwalb at the grouping work size; the hierarchical grouping itself is not in the floor).
- captions: one reduced colour decode (1/2) + sentence split (spaCy ``senter``) + the tiny CLIP forward over the
  image, its crops and its sentences (batched over the sample, as the stage batches a chunk).
- filter: one full spaCy parse of each distinct text of the image (caption + segment captions).
- manifest: not measured (one whole-dataset write).
Besides images/s (wall, at the machine's current load) each stage reports CPU-ms per image (this process, its
children and live worker pools): on a shared machine CPU time is the steadier measure of work.
Everything runs in a fresh child process per scenario; a warm-up run of one smallest chunk per engine worker loads
the models in every worker first, so "cold" is an empty output folder, not an empty process (the warm-up's seconds
are reported as start-up).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import BenchmarkResult, Census, Target, cpu_seconds, peak_rss_mb, run_in_child, usable_cpus
from pipelines.engine.stages import STAGE_DEFINITIONS, data_stage_names

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DATA_STAGES = data_stage_names()
STAGES = [name for name in DATA_STAGES if not STAGE_DEFINITIONS[name].whole]  # the per-image stages (with a floor)
FLOOR_SAMPLE = 40


# ---- the child's scenario ------------------------------------------------------------------------------------------
def _run(pipeline_cls, run_inline, images: Path, out: Path, config) -> dict:
    cpu, start = cpu_seconds(), time.perf_counter()
    stages = {}
    with Census() as census:
        pipeline = pipeline_cls(images, out, config)
        for stage in DATA_STAGES:  # one stage at a time, as run_inline does, to read each stage's CPU time
            stage_cpu = cpu_seconds()
            (summary,) = run_inline(pipeline, [stage])
            stages[stage] = {**{k: summary[k] for k in ("processed", "cached", "failed", "seconds")},
                             "cpu_s": cpu_seconds() - stage_cpu}
    return {"seconds": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu,
            "processes": census.max_processes, "threads": census.max_threads, "stages": stages}


def _bare(pipeline, stage_name: str) -> dict:
    """Time the stage's library call over every image at once (recomputes and rewrites the same outputs)."""
    plan = pipeline.plan(stage_name, refresh=True)
    records = [record for _key, record in plan.pending]
    stage = STAGE_DEFINITIONS[stage_name]
    stage.run(records[:2], layout=pipeline.layout, stage_key=plan.stage_key, params=plan.params,
              runtime=plan.runtime)  # models load in this process first, outside the timing
    cpu, start = cpu_seconds(), time.perf_counter()
    rows = stage.run(records, layout=pipeline.layout, stage_key=plan.stage_key, params=plan.params,
                     runtime=plan.runtime)
    seconds = time.perf_counter() - start
    return {"items": len(records), "seconds": seconds, "cpu_s": cpu_seconds() - cpu,
            "ok": sum(r.get("status") == "ok" for r in rows)}


def _box(segment: dict) -> tuple[int, int, int, int]:
    box = segment["bbox"]
    return int(box["x1"]), int(box["y1"]), int(box["x2"]), int(box["y2"])


def _median_ms(fn, items) -> float:
    """Median CPU-ms of ``fn(item)`` (this process's CPU time: steady on a shared machine; the primitives run on one
    thread, OpenCV and torch are set to one)."""
    times = []
    for item in items:
        start = time.process_time()
        fn(item)
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def _floors(pipeline, config, sample: int) -> dict[str, dict]:
    """Return, per stage, the primitives' CPU-ms per image (each measured separately on ``sample`` images)."""
    import hashlib

    import cv2
    import numpy as np
    import spacy

    from pipelines.steps.captions import ClipScorer
    from pipelines.steps.filtering import FALLBACK_MODELS, load_spacy
    from pipelines.steps.structure import canny_map, scribble_map

    cv2.setNumThreads(1)
    images = pipeline.images[:sample]
    paths = [i["source_path"] for i in images]
    regions = pipeline.done_rows("regions")
    captions = pipeline.done_rows("captions")
    structure = pipeline.done_rows("structure")
    s = config.structure
    p: dict[str, float] = {}

    def read_hash(path):
        hashlib.sha256(Path(path).read_bytes()).digest()

    p["read+hash"] = _median_ms(read_hash, paths)
    p["decode 1/8 grey"] = _median_ms(lambda path: cv2.imread(path, cv2.IMREAD_REDUCED_GRAYSCALE_8), paths)
    p["decode grey"] = _median_ms(lambda path: cv2.imread(path, cv2.IMREAD_GRAYSCALE), paths)
    greys = []

    def resize(path):
        grey = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        scale = s.long_side / max(grey.shape)
        greys.append(cv2.resize(grey, (round(grey.shape[1] * scale), round(grey.shape[0] * scale)),
                                interpolation=cv2.INTER_AREA) if scale < 1 else grey)

    resize_ms = _median_ms(resize, paths)
    p["resize"] = max(resize_ms - p["decode grey"], 0.0)
    edges = []
    p["canny"] = _median_ms(lambda g: edges.append(canny_map(g, s.canny_low, s.canny_high)), greys)
    scribbles = []
    p["scribble"] = _median_ms(lambda e: scribbles.append(scribble_map(
        e, sigma=s.scribble.sigma, threshold=s.scribble.threshold, final_sigma=s.scribble.final_sigma)), edges)
    p["png encode x2"] = _median_ms(lambda pair: (cv2.imencode(".png", pair[0]), cv2.imencode(".png", pair[1])),
                                    list(zip(edges, scribbles)))
    # Outputs are files: creating and writing them (plain open/write/close of new files in a fresh folder, no
    # temporary name or rename) is part of the floor.
    scratch = Path(tempfile.mkdtemp(prefix="floor-", dir=pipeline.layout.root))
    written = iter(range(10 ** 9))

    def write_files(buffers):
        for buffer in buffers:
            with open(scratch / f"{next(written)}.bin", "wb") as handle:
                handle.write(buffer)

    map_files = [[cv2.imencode(".png", e)[1].tobytes(), cv2.imencode(".png", c)[1].tobytes()]
                 for e, c in zip(edges, scribbles)]
    # Writes cost kernel time that swings with the page cache's writeback: the best of three passes is the floor.
    p["write map files"] = min(_median_ms(write_files, map_files) for _ in range(3))
    p["decode colour"] = _median_ms(lambda path: cv2.imread(path, cv2.IMREAD_COLOR), paths)
    p["structure map decode"] = _median_ms(
        lambda i: cv2.imread(str(pipeline.layout.resolve(structure[i["image_id"]]["structure_path"])),
                             cv2.IMREAD_GRAYSCALE), images)
    colour = {i["image_id"]: cv2.imread(i["source_path"], cv2.IMREAD_COLOR) for i in images}
    edge_of = {i["image_id"]: cv2.imread(str(pipeline.layout.resolve(structure[i["image_id"]]["structure_path"])),
                                         cv2.IMREAD_GRAYSCALE) for i in images}

    def crops(image):
        rgb, edge = colour[image["image_id"]], edge_of[image["image_id"]]
        sy, sx = edge.shape[0] / rgb.shape[0], edge.shape[1] / rgb.shape[1]
        for segment in regions[image["image_id"]]["segments"]:
            x0, y0, x1, y1 = _box(segment)
            cv2.imencode(".jpg", rgb[y0:y1, x0:x1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            cv2.imencode(".png", edge[int(y0 * sy):int(y1 * sy), int(x0 * sx):int(x1 * sx)])

    p["crops cut+encode"] = _median_ms(crops, images)
    crop_files = []
    for image in images:
        rgb, edge = colour[image["image_id"]], edge_of[image["image_id"]]
        sy, sx = edge.shape[0] / rgb.shape[0], edge.shape[1] / rgb.shape[1]
        buffers = []
        for segment in regions[image["image_id"]]["segments"]:
            x0, y0, x1, y1 = _box(segment)
            buffers += [cv2.imencode(".jpg", rgb[y0:y1, x0:x1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(),
                        cv2.imencode(".png", edge[int(y0 * sy):int(y1 * sy), int(x0 * sx):int(x1 * sx)])[1].tobytes()]
        crop_files.append(buffers)
    p["write crop files"] = min(_median_ms(write_files, crop_files) for _ in range(3))
    if config.regions.method == "grouping":
        # The weight-free proposer's own primitive: its compiled segmentation at the grouping work size (area
        # resize, then OpenCV's watershed from the seed grid, as pipelines.steps.grouping does); the grouping is not in it.
        from pipelines.steps import grouping
        defaults = grouping.grouping_boxes.__kwdefaults__

        def segment(image):
            rgb = np.ascontiguousarray(colour[image["image_id"]][:, :, ::-1])
            work = grouping.work_image(rgb, defaults["work_side"])
            step = defaults["seed_step"]
            markers = np.zeros(work.shape[:2], np.int32)
            ys, xs = np.arange(step // 2, work.shape[0], step), np.arange(step // 2, work.shape[1], step)
            markers[np.ix_(ys, xs)] = np.arange(1, ys.size * xs.size + 1).reshape(ys.size, xs.size)
            cv2.watershed(work, markers)

        p["segmentation"] = _median_ms(segment, images)
    p["decode 1/2 colour"] = _median_ms(lambda path: cv2.imread(path, cv2.IMREAD_REDUCED_COLOR_2), paths)

    name = config.filter.spacy_model
    senter = None
    for candidate in [name] + ([FALLBACK_MODELS[name]] if name in FALLBACK_MODELS else []):
        try:
            senter = spacy.load(candidate, exclude=["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer",
                                                    "ner"])
            senter.enable_pipe("senter")
            break
        except (OSError, ValueError):
            continue
    texts = {i["image_id"]: pipeline.caption_of(i["source_path"])[0] or "" for i in images}
    p["sentence split"] = _median_ms(lambda i: list(senter(texts[i["image_id"]]).sents), images)
    nlp = load_spacy(name)

    def distinct(image):
        row = captions.get(image["image_id"]) or {}
        return list(dict.fromkeys([texts[image["image_id"]]] + [seg["caption"] for seg in row.get("segments") or []]))

    all_texts = [text for image in images for text in distinct(image)]
    list(nlp.pipe(all_texts[:8]))  # warm
    start = time.process_time()
    list(nlp.pipe(all_texts))  # batched, as the stage parses a chunk
    p["parse distinct texts"] = (time.process_time() - start) * 1000 / len(images)

    scorer = ClipScorer(config.scoring_model, device="cpu", batch_size=config.captions.batch_size)
    rgb_small = [np.ascontiguousarray(cv2.imread(path, cv2.IMREAD_REDUCED_COLOR_2)[:, :, ::-1]) for path in paths]
    crop_arrays, sentences = [], []
    for image, small in zip(images, rgb_small):
        crop_arrays.append(small)
        for segment in regions[image["image_id"]]["segments"]:
            x0, y0, x1, y1 = (v // 2 for v in _box(segment))
            crop_arrays.append(np.ascontiguousarray(small[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]))
        sentences += [sent.text for sent in senter(texts[image["image_id"]]).sents]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    scorer.embed_images(crop_arrays[:4])  # warm
    start = time.process_time()
    scorer.embed_images(crop_arrays)
    scorer.embed_texts(sentences)
    p["tiny CLIP forward"] = (time.process_time() - start) * 1000 / len(images)
    torch.set_num_threads(threads)

    per_stage = {
        "ingest": ["read+hash", "decode 1/8 grey"],
        "structure": ["decode grey", "resize", "canny", "scribble", "png encode x2", "write map files"],
        "regions": ["decode colour", "structure map decode", "crops cut+encode", "write crop files"] + (
            ["segmentation"] if "segmentation" in p else []),
        "captions": ["decode 1/2 colour", "sentence split", "tiny CLIP forward"],
        "filter": ["parse distinct texts"],
    }
    return {stage: {"ms": sum(p[k] for k in keys), "parts": {k: round(p[k], 3) for k in keys}}
            for stage, keys in per_stage.items()}


def scenario(root: str, n_images: int, sample: int, full: bool = True, overrides: dict | None = None) -> dict:
    """Child-process entry: warm-up, cold run and cached run on ``n_images`` (config ``overrides`` on demo.yaml);
    with ``full`` also the bare library calls and the floors."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from configs.schema import load_config
    from pipelines.engine.execute import run_inline
    from pipelines.engine.plan import MIN_CHUNK, Pipeline
    from pipelines.engine.stages import local_workers
    from tests.corpus import make_generated_images

    work = Path(root)
    config = load_config(CONFIG, overrides or {})
    workers = local_workers(config, n_images)[1] or 1
    # One smallest chunk per worker, so every worker process has started and loaded its models before the timed runs.
    make_generated_images(work / "warmup-images", MIN_CHUNK * workers, seed=99)
    start = time.perf_counter()
    run_inline(Pipeline(work / "warmup-images", work / "warmup-out", config), DATA_STAGES)
    startup = time.perf_counter() - start
    images, out = work / "images", work / "out"
    make_generated_images(images, n_images, seed=0)
    cold = _run(Pipeline, run_inline, images, out, config)
    cached = _run(Pipeline, run_inline, images, out, config)
    measured = {"startup_s": startup, "cold": cold, "cached": cached, "cpus": usable_cpus(), "workers": workers,
                "rss_mb": peak_rss_mb()}  # of the runs: before the bare calls load models in this process
    if full:
        pipeline = Pipeline(images, out, config)
        measured["bare"] = {stage: _bare(pipeline, stage) for stage in STAGES}
        measured["floors"] = _floors(Pipeline(images, out, config), config, sample)
    from pipelines.engine import workers as engine_workers
    engine_workers.shutdown()
    return measured


LARGE_ENV = "STRUCTXLIP_BENCH_STAGES_LARGE"


def _child(n: int, sample: int, full: bool, overrides: dict | None = None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-data-stages-"))
    try:
        return run_in_child("benchmarks.data_stages:scenario", root=str(root), n_images=n, sample=sample, full=full,
                            overrides=overrides)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(*, quick: bool = False, n_images: int | None = None, large: int | None = None) -> BenchmarkResult:
    """Per stage at ``n_images`` (200): pipeline vs library vs floor; the whole data pipeline at ``n_images`` and
    ``large`` (2,000; $STRUCTXLIP_BENCH_STAGES_LARGE) cold and cached, with the linear-time and memory targets."""
    n = n_images or (12 if quick else int(os.environ.get("STRUCTXLIP_BENCH_STAGES_N") or 200))
    large = large or (48 if quick else int(os.environ.get(LARGE_ENV) or 2000))
    sample = min(n, 8 if quick else FLOOR_SAMPLE)
    measured = _child(n, sample, full=True)
    measured_large = _child(large, sample, full=False)
    # The proposer the 65 img/s target was set with (weight-free, edge components): the grouping proposer
    # (the demo's, added since) costs a ~14 ms graph segmentation per image on its own.
    measured_structure = _child(large, sample, full=False, overrides={"regions.method": "structure"})
    data = measured["result"]
    cpus = data["cpus"]
    result = BenchmarkResult(
        name="data_stages",
        description=f"Data stages on {n} generated 640x480 images (demo config: tiny CLIP, grouping regions): "
                    f"pipeline vs bare library vs the floor from primitives; the whole data pipeline at {n} and "
                    f"{large} images, cold and cached.",
        params={"images": n, "large": large, "floor_sample": sample, "cpus": cpus, "workers": data["workers"],
                "config": "configs/demo.yaml", "engine": "pipelines.engine.execute.run_inline (no Prefect)"},
    )
    for stage in STAGES:
        seconds = data["cold"]["stages"][stage]["seconds"]
        pipeline_rate = n / seconds if seconds else float("nan")
        bare = data["bare"][stage]
        bare_rate = bare["items"] / bare["seconds"] if bare["seconds"] else float("nan")
        floor = data["floors"][stage]
        floor_rate = cpus * 1000.0 / floor["ms"] if floor["ms"] else float("nan")
        cpu_ms = data["cold"]["stages"][stage]["cpu_s"] * 1000 / n
        result.rows.append({"stage": stage, "pipeline_img_s": pipeline_rate, "library_img_s": bare_rate,
                            "floor_ms_per_img": floor["ms"], f"floor_img_s_{cpus}_cores": floor_rate,
                            "pipeline_vs_floor": pipeline_rate / floor_rate,
                            "pipeline_cpu_ms_per_img": cpu_ms,
                            "library_cpu_ms_per_img": bare["cpu_s"] * 1000 / max(bare["items"], 1),
                            "floor_vs_pipeline_cpu": floor["ms"] / cpu_ms if cpu_ms else float("nan"),
                            "floor_parts_ms": ", ".join(f"{k} {v:.2f}" for k, v in floor["parts"].items())})
    whole = {}
    for size, child, suffix in ((n, measured, ""), (large, measured_large, ""),
                                (large, measured_structure, ", structure regions")):
        for label in ("cold", "cached"):
            run_data = child["result"][label]
            whole[size, label, suffix] = run_data
            result.rows.append({"stage": f"whole data pipeline, {size} images, {label}{suffix}",
                                "pipeline_img_s": size / run_data["seconds"], "wall_s": run_data["seconds"],
                                "cpu_s": run_data["cpu_s"], "cpu_ms_per_img": run_data["cpu_s"] * 1000 / size,
                                "peak_rss_mb": child["result"]["rss_mb"]["own"],
                                "workers_peak_rss_mb": child["result"]["rss_mb"]["worker"],
                                "processes": run_data["processes"], "threads": run_data["threads"]})
    result.notes.append(f"{data['workers']} engine worker processes (runtime.workers: 0 = one per usable core); "
                        f"start-up (imports, model loads in every worker, a {data['workers']}-chunk warm-up run) "
                        f"before the timed runs: {data['startup_s']:.1f} s; peak RSS: the running process's own and "
                        f"its largest worker's, each up to the end of the cold and cached runs (warm-up included)")
    result.notes.append("library img/s: the stage's library call over every image at once in one process (one "
                        "core); pipeline img/s: the engine with its worker processes; floor img/s: the primitives' "
                        "CPU-ms on one thread, times the usable cores")
    result.targets = [Target(f"{row['stage']} pipeline >= 50% of its floor", row["pipeline_vs_floor"], 0.5)
                      for row in result.rows[:len(STAGES)]]
    cold_small, cold_large = whole[n, "cold", ""], whole[large, "cold", ""]

    def rss(child):
        return child["result"]["rss_mb"]["own"] + child["result"]["rss_mb"]["worker"] * data["workers"]

    result.targets += [
        Target(f"whole data pipeline, cold, {large} images", large / cold_large["seconds"], 65.0, unit=" img/s"),
        Target(f"whole data pipeline, cold, {large} images, structure regions",
               large / whole[large, "cold", ", structure regions"]["seconds"], 65.0, unit=" img/s"),
        Target("fully cached run wall", whole[large, "cached", ""]["seconds"], 3.0, direction="at_most", unit=" s"),
        Target(f"time per image at {large} / at {n}",
               (cold_large["seconds"] / large) / (cold_small["seconds"] / n), 1.2, direction="at_most"),
        Target(f"peak RSS (this process + workers) at {large} / at {n}", rss(measured_large) / rss(measured), 1.3,
               direction="at_most"),
    ]
    return result

"""Region proposers side by side: box recall on generated scenes with known boxes, regions on real photos, time.

Scenes: ``tests.scenes.make_scene`` (640x480; textured backgrounds, two to five objects, overlaps, clutter), seeds
10,000 and up (the tests use 0-11). Recall: the share of the scenes' object boxes that a kept region overlaps with
IoU >= 0.5. Kept: the stage's selection (box area 1%-80% of the image, NMS at IoU 0.7, at most 16 regions). Real
photos: every photo of ``sample/images`` (14 photos); "with content" leaves out the three pure textures (brick,
grass, gravel), which have no object to find; four photos also have hand-drawn object boxes (``PHOTO_BOXES``).

Proposers: ``structure`` (connected edges of the structure map, the first weight-free proposer) and ``grouping``
(``pipelines.steps.grouping``). Both get the structure map the structure stage would make (grey, PIL-sized to 512 px on
the long side, Canny 100/200); making it and decoding the image are not timed. Time per image: one process, one
thread, the proposer and the selection; wall and CPU time (the CPU time is the one to read on a loaded machine).

The stage: ``pipelines.steps.regions.propose_regions`` (the library call the regions stage runs) on the scenes written as
JPEGs with their structure-map PNGs, in the engine's worker processes (``pipelines.engine.workers``, one per core), chunks
of an eighth of the images, crops written to a temporary output folder; img/s is the wall time of the whole set,
CPU the tree's, memory the peak PSS of the whole process tree (this process and its workers). Its floor, measured
in the same run: the compiled segmentation alone (OpenCV's area resize to the work size and the watershed from the
seed grid, ``pipelines.steps.grouping``'s defaults) per image on one thread, as images/s on the same number of cores.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from benchmarks.common import BenchmarkResult, PeakTreePss, Target, usable_cpus, worker_cpu_seconds

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO / "sample" / "images"
TEXTURES = ("brick.jpg", "grass.jpg", "gravel.jpg")
# Objects in four sample photos, boxes drawn by hand on a 50 px grid (approximate, xyxy in the photos' pixels):
# astronaut: head, helmet, mission patch, shuttle model, flag, neck ring, the astronaut; coffee: cup, saucer,
# spoon, the coffee; camera: the man, tripod, camera, head, tower; chelsea: both eyes, nose.
PHOTO_BOXES = {
    "astronaut.jpg": [[150, 15, 300, 160], [275, 342, 505, 512], [133, 345, 212, 425], [352, 0, 475, 290],
                      [0, 0, 95, 512], [112, 150, 305, 300], [20, 15, 365, 512]],
    "coffee.jpg": [[172, 15, 420, 305], [75, 70, 480, 390], [320, 65, 425, 328], [200, 95, 380, 195]],
    "camera.jpg": [[0, 65, 335, 512], [228, 290, 410, 512], [255, 138, 330, 190], [155, 65, 270, 200],
                   [410, 118, 445, 200]],
    "chelsea.jpg": [[133, 85, 205, 148], [295, 105, 345, 165], [235, 220, 295, 265]],
}
SELECTION = dict(min_area_fraction=0.01, max_area_fraction=0.8, nms_iou=0.7, max_regions=16)
RECALL_GOAL = 0.95
PHOTO_SHARE_GOAL = 0.9
STAGE_IMG_S_GOAL = 150.0
GROUPING_SIDE = 192


def structure_map_of(rgb: np.ndarray) -> np.ndarray:
    """Return the (h, w) uint8 Canny map the structure stage makes of ``rgb`` (512 px long side, 100/200)."""
    from pipelines.steps.images import resize_like_pil, thumbnail_size
    from pipelines.steps.structure import canny_map

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    width, height = thumbnail_size(rgb.shape[1], rgb.shape[0], 512)
    return canny_map(resize_like_pil(grey, width, height), 100.0, 200.0)


def _structure_proposer(rgb: np.ndarray, structure: np.ndarray, max_regions: int = 16) -> np.ndarray:
    from pipelines.steps.regions import scale_boxes, select_boxes, structure_boxes

    height, width = rgb.shape[:2]
    boxes = scale_boxes(structure_boxes(structure, dilation=2), (structure.shape[1], structure.shape[0]),
                        (width, height))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / float(width * height)
    return boxes[select_boxes(boxes, areas, areas, **{**SELECTION, "max_regions": max_regions})]


def _grouping_proposer(rgb: np.ndarray, structure: np.ndarray, max_regions: int = 16) -> np.ndarray:
    from pipelines.steps.grouping import grouping_boxes
    from pipelines.steps.regions import select_boxes

    proposals = grouping_boxes(rgb, structure, work_side=GROUPING_SIDE)
    kept = select_boxes(proposals.boxes, proposals.scores, proposals.area_fractions,
                        **{**SELECTION, "max_regions": max_regions})
    return proposals.boxes[kept]


PROPOSERS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "structure": _structure_proposer,
    "grouping": _grouping_proposer,
}


def _timed(proposer, rgb: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    kept = proposer(rgb, structure)
    return kept, time.perf_counter() - wall, time.process_time() - cpu


# ---- the stage in the engine's workers, and its floor ---------------------------------------------------------------
def stage_chunk(records: list[dict], root: str, stage_key: str, max_regions: int) -> int:
    """Worker entry: run the regions library call on one chunk; return how many segments it wrote."""
    from pipelines.steps.regions import propose_regions
    from storage.layout import OutputLayout

    results = propose_regions(records, layout=OutputLayout(root), stage_key=stage_key, method="grouping",
                              max_regions=max_regions)
    failed = [r["error"] for r in results if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} images failed, first: {failed[0]}")
    return sum(len(r["segments"]) for r in results)


def warm_chunk(records: list[dict], root: str, stage_key: str, max_regions: int) -> int:
    """Worker entry for the warm-up: one chunk, then a pause, so that each worker takes one of the warm-up tasks."""
    stage_chunk(records, root, stage_key, max_regions)
    time.sleep(1.0)
    return os.getpid()


def write_scene_files(scenes, root: Path) -> list[dict]:
    """Write each scene as a JPEG (quality 90) and its structure map as ``root/maps/<i>.png``; return the stage's
    input records (structure paths relative to ``root``, as the stage gets them)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    records = []
    for index, scene in enumerate(scenes):
        image = root / "images" / f"scene_{index:05d}.jpg"
        cv2.imwrite(str(image), cv2.cvtColor(scene.rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(root / "maps" / f"{index:05d}.png"), structure_map_of(scene.rgb))
        records.append({"image_id": f"{index:032x}", "source_path": str(image),
                        "structure_path": f"maps/{index:05d}.png"})
    return records


def measure_stage(records: list[dict], root: Path, *, workers: int, max_regions: int, label: str) -> dict:
    """Run the regions library call over ``records`` in ``workers`` engine workers (8 chunks); return img/s (wall),
    the workers' CPU ms per image, the tree's peak PSS (sampled every second: reading smaps costs CPU, which is
    this process's and not counted) and the segments per image."""
    from pipelines.engine import workers as engine_workers
    pool = engine_workers.pool(workers)
    # Warm-up: every worker imports the stage and OpenCV before the timed run (one tiny chunk each, untimed).
    warmed = {f.result() for f in [pool.submit(warm_chunk, records[i:i + 1], str(root), f"warm-{label}-{i}",
                                               max_regions) for i in range(workers)]}
    if len(warmed) != workers:
        raise RuntimeError(f"warm-up reached {len(warmed)} of {workers} workers")
    size = max(1, -(-len(records) // 8))
    chunks = [records[i:i + size] for i in range(0, len(records), size)]
    with PeakTreePss(interval=1.0) as memory:
        cpu, wall = worker_cpu_seconds(), time.perf_counter()
        segments = sum(f.result() for f in [pool.submit(stage_chunk, chunk, str(root), f"timed-{label}", max_regions)
                                            for chunk in chunks])
        wall, cpu = time.perf_counter() - wall, worker_cpu_seconds() - cpu
    return {"img_s": len(records) / wall, "cpu_ms_per_img": 1000 * cpu / len(records), "wall_s": wall,
            "segments_per_img": segments / len(records), "tree_pss_peak_mb": memory.peak_mb}


def segmentation_floor_s(rgbs: list[np.ndarray], repeats: int = 3) -> float:
    """Mean over images of the best of ``repeats`` times of the compiled segmentation alone (area resize to the
    grouping's work size, then the watershed from its seed grid), seconds per image on one thread."""
    from pipelines.steps.grouping import SEED_STEP, grouping_boxes

    work_side, step = grouping_boxes.__kwdefaults__["work_side"], SEED_STEP
    best = []
    for rgb in rgbs:
        height, width = rgb.shape[:2]
        factor = min(1.0, work_side / max(height, width))
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        seeds = np.zeros((size[1], size[0]), np.int32)
        ys, xs = np.arange(step // 2, size[1], step), np.arange(step // 2, size[0], step)
        seeds[np.ix_(ys, xs)] = np.arange(1, ys.size * xs.size + 1).reshape(ys.size, xs.size)
        times = []
        for _ in range(repeats):
            markers = seeds.copy()
            start = time.perf_counter()
            work = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            cv2.watershed(work, markers)
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return float(np.mean(best))


def file_floor_s(root: Path, files_per_image: int, images: int = 40) -> float:
    """CPU seconds per image (this process) of only creating the stage's files: ``files_per_image`` small files
    (4 KiB) written as the crops are (into a staging folder that becomes the image's folder, not fsynced) under
    ``root``."""
    from storage.atomic import atomic_directory, write_new_file

    data = bytes(4096)
    cpu = time.process_time()
    for image in range(images):
        with atomic_directory(root / "file-floor" / f"{image:02x}"[:2] / f"{image:032x}") as staging:
            for index in range(files_per_image):
                write_new_file(staging / f"{index:03d}.bin", data)
    cpu = time.process_time() - cpu
    shutil.rmtree(root / "file-floor", ignore_errors=True)
    return cpu / images


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run(*, quick: bool = False) -> BenchmarkResult:
    """Return the regions benchmark: recall on 100 scenes and the 14 sample photos, the stage on 400 scenes in the
    engine's workers against its floor (quick: 20 and 40)."""
    import torch
    from PIL import Image

    from pipelines.engine import workers as engine_workers
    from tests.scenes import box_recall, make_scene

    n_scenes = 20 if quick else 100
    n_stage = 40 if quick else 400
    load_start = _load()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-regions-"))
    try:
        scenes = [make_scene(10_000 + i) for i in range(n_scenes)]
        scene_maps = [structure_map_of(s.rgb) for s in scenes]
        photo_paths = sorted(SAMPLE_IMAGES.glob("*.jpg"))
        photos = [np.asarray(Image.open(p).convert("RGB")) for p in photo_paths]
        photo_maps = [structure_map_of(p) for p in photos]
        workers = usable_cpus()
        result = BenchmarkResult(
            name="regions",
            description=(f"Region proposers on {n_scenes} generated 640x480 scenes with known object boxes "
                         f"(recall at IoU >= 0.5 among the kept regions) and on the {len(photos)} sample photos; "
                         "kept = box area 1%-80%, NMS 0.7, at most 16; one thread. The regions stage (grouping) on "
                         f"{n_stage} scenes in {workers} engine worker processes against its floor (the compiled "
                         "segmentation alone, same run)."),
            params={"scenes": n_scenes, "objects": int(sum(len(s.boxes) for s in scenes)), "size": [640, 480],
                    "selection": SELECTION, "grouping_side": GROUPING_SIDE, "photos": [p.name for p in photo_paths],
                    "stage_images": n_stage, "workers": workers, "versions": {
                        "opencv": cv2.__version__, "numpy": np.__version__, "python": platform.python_version()}},
        )
        _timed(_grouping_proposer, scenes[0].rgb, scene_maps[0])  # first-call costs untimed
        for name, proposer in PROPOSERS.items():
            found = total = regions = 0
            wall_s, cpu_s = [], []
            for scene, structure in zip(scenes, scene_maps):
                kept, wall, cpu = _timed(proposer, scene.rgb, structure)
                hits, count = box_recall(scene.boxes, kept, 0.5)
                found, total, regions = found + hits, total + count, regions + len(kept)
                wall_s.append(wall)
                cpu_s.append(cpu)
            counts = {}
            photo_found = photo_total = uncapped_found = 0
            for path, photo, structure in zip(photo_paths, photos, photo_maps):
                kept = proposer(photo, structure)
                counts[path.name] = len(kept)
                if path.name in PHOTO_BOXES:
                    truth = np.asarray(PHOTO_BOXES[path.name])
                    hits, count = box_recall(truth, kept, 0.5)
                    photo_found, photo_total = photo_found + hits, photo_total + count
                    uncapped_found += box_recall(truth, proposer(photo, structure, max_regions=10**6), 0.5)[0]
            content = {k: v for k, v in counts.items() if k not in TEXTURES}
            row = {
                "proposer": name,
                "recall_iou_0.5": found / total,
                "objects_found": f"{found}/{total}",
                "regions_per_scene": regions / n_scenes,
                "ms_per_image": 1000 * float(np.mean(wall_s)),
                "cpu_ms_per_image": 1000 * float(np.mean(cpu_s)),
                "regions_per_photo": float(np.mean(list(counts.values()))),
                "photos_ge_2_regions": float(np.mean([v >= 2 for v in counts.values()])),
                "content_photos_ge_2_regions": float(np.mean([v >= 2 for v in content.values()])),
                "photo_recall_iou_0.5": photo_found / photo_total,
                "photo_objects_found": f"{photo_found}/{photo_total}",
                "photo_objects_found_uncapped": f"{uncapped_found}/{photo_total}",
            }
            result.rows.append(row)
            result.params[f"{name}_regions_per_photo"] = counts
            if name == "grouping":
                result.targets += [
                    Target("grouping recall at IoU 0.5", row["recall_iou_0.5"], RECALL_GOAL),
                    Target("grouping: sample photos with >= 2 regions", row["photos_ge_2_regions"],
                           PHOTO_SHARE_GOAL),
                ]

        # The stage against its floor, on more scenes (the first ones are the recall scenes again).
        stage_scenes = scenes + [make_scene(10_000 + i) for i in range(n_scenes, n_stage)]
        records = write_scene_files(stage_scenes, root)
        floor_s = segmentation_floor_s([s.rgb for s in stage_scenes[: min(n_stage, 100)]])
        floor_img_s = workers / floor_s
        for max_regions, label in ((16, "default config, max_regions 16"), (8, "demo config, max_regions 8")):
            stage = measure_stage(records, root, workers=workers, max_regions=max_regions, label=str(max_regions))
            files_s = file_floor_s(root, files_per_image=round(2 * stage["segments_per_img"]))
            result.rows.append({
                "proposer": f"regions stage ({label})", "stage_img_s": stage["img_s"],
                "floor_img_s": floor_img_s, "stage_vs_floor": stage["img_s"] / floor_img_s,
                "workers_cpu_ms_per_image": stage["cpu_ms_per_img"],
                "file_creation_cpu_ms_per_image": 1000 * files_s,
                "img_s_at_workers_cpu": workers * 1000 / stage["cpu_ms_per_img"],
                "segments_per_image": stage["segments_per_img"],
                "tree_pss_peak_mb": stage["tree_pss_peak_mb"], "load_average_1m": _load(),
            })
            if max_regions == 16:
                result.targets.append(Target(f"regions stage, {workers} workers, 640x480 scenes",
                                             stage["img_s"], STAGE_IMG_S_GOAL, unit=" img/s"))
        result.params["load_average_1m"] = {"start": load_start, "end": _load()}
        result.notes.append("structure: on cluttered photos the dilated edges form one component above the 80% "
                            "limit, so it keeps nothing; grouping: watershed superpixels from an 18 px seed grid at "
                            "192 px, grouped hierarchically (colour, size, fill, structure-map edges) in rounds of "
                            "reciprocal best pairs, scored by colour contrast with their surroundings")
        result.notes.append("photo recall: the hand-drawn boxes of 19 objects in 4 sample photos (PHOTO_BOXES, "
                            "approximate); 'uncapped': among every region the area filter and NMS keep, before the "
                            "16-region cap (where it is much higher, the ranking limits recall, not the grouping)")
        result.notes.append("stage_img_s is wall time, so it falls with the machine's load; img_s_at_workers_cpu "
                            "is what the workers' own CPU time per image gives on idle cores (cores / CPU s per "
                            "image), the number to compare across loads")
        result.notes.append(f"stage floor: OpenCV area resize + watershed alone, {1000 * floor_s:.2f} ms per image "
                            f"on one thread = {floor_img_s:.0f} img/s on {workers} cores; the stage also decodes "
                            "the JPEG and the map, groups, and encodes and writes every crop (JPEG + PNG)")
        result.notes.append("file_creation_cpu_ms_per_image: the CPU time of only creating the stage's files (two "
                            "per segment, a crop JPEG and a structure PNG, 4 KiB each, written as the crops are: "
                            "into a staging folder that then becomes the image's folder) on the output folder's file "
                            "system, no encoding: part of the stage's CPU time that no proposer change can remove")
        result.notes.append(f"load average (1 min) {load_start} at the start, {_load()} at the end; OpenCV "
                            f"{cv2.__version__}, NumPy {np.__version__}, Python {platform.python_version()}")
        result.notes.append("SAM (segment-anything checkpoint or transformers sam_model) needs real weights, which "
                            "are not on this machine: not measured here")
        return result
    finally:
        engine_workers.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)

"""GPU numbers: the project's CUDA paths with random weights, each timed between ``torch.cuda.synchronize()`` calls.

- structure maps: the kornia backend (``pipelines.steps.structure.torch_maps``: Canny + scribble) on batches of 512x384
  grey images;
- CLIP scoring: ``pipelines.steps.captions.ClipScorer`` (batches of 64, bf16 autocast on CUDA) with a random ViT-B/16
  ``CLIPModel`` built from a ``CLIPConfig`` (``benchmarks.clip_scoring.build_random_vit_b16``, no hub): crops and
  sentences embedded;
- a training step: the StructXLIP objective (``structxlip.app.train``: encoder, ``compute_objective``, AdamW) on the
  random ViT-B/16 in bf16 autocast, batch 32 of a synthetic manifest, batches collated and moved to the device before
  the clock starts (data loading excluded, as ``train`` times a step);
- SAM mask generation: transformers' ``mask-generation`` pipeline (``pipelines.steps.regions.sam_model_boxes``, the regions
  stage's defaults: a 32 x 32 point grid, 64 points a batch) with a randomly initialised base-sized ``SamModel``
  (``SamConfig()``'s ViT-B image encoder, 1024 px) on 640x480 generated images.

Each measurement runs its warm-up calls first (kernels, cuDNN/cuBLAS autotuning, allocator), untimed. Where no CUDA
device is visible the benchmark is skipped with one line (``skip_reason``). The functions take a ``device``, so the
same code runs on CPU with tiny models in the tests.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchmarkResult

STRUCTURE_BATCH = 32
STRUCTURE_SIZE = (512, 384)  # (w, h): the structure stage's long side
CLIP_BATCH = 64
TRAIN_BATCH = 32
SAM_SIDE = 1024


def skip_reason() -> str | None:
    """Return why the GPU benchmark cannot run here (one line), or None when a CUDA device is visible."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False); run it on a machine with a GPU"
    return None


def synchronizer(device: str) -> Callable[[], None]:
    """Return what waits for the device's queued work: ``torch.cuda.synchronize`` on CUDA, nothing on CPU."""
    if str(device).startswith("cuda"):
        import torch

        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_calls(fn: Callable[[], Any], *, repeats: int, warmup: int, synchronize: Callable[[], None]) -> list[float]:
    """Return the seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; the device is
    synchronised before each clock start and before each clock stop, so queued kernels are inside the time."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"expected repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def _summary(seconds: list[float], items: int, unit: str) -> dict:
    mean = statistics.mean(seconds)
    return {"ms_per_call": 1000 * mean, "ms_best": 1000 * min(seconds), f"{unit}_per_s": items / mean,
            "items_per_call": items, "calls_timed": len(seconds)}


# ---- the four workloads -------------------------------------------------------------------------------------------
def grey_batch(n: int, size: tuple[int, int] = STRUCTURE_SIZE, seed: int = 0) -> np.ndarray:
    """Return (n, h, w) uint8 grey versions of generated scenes (``tests.scenes``) resized to ``size``."""
    import cv2

    from tests.scenes import make_scene

    greys = [cv2.resize(cv2.cvtColor(make_scene(seed + i).rgb, cv2.COLOR_RGB2GRAY), size,
                        interpolation=cv2.INTER_AREA) for i in range(min(n, 8))]
    return np.stack([greys[i % len(greys)] for i in range(n)])


def measure_structure(device: str, *, greys: np.ndarray, repeats: int, warmup: int = 2) -> dict:
    """Time kornia Canny + scribble maps of a (B, h, w) uint8 batch (host to device and back included)."""
    from pipelines.steps.structure import StructureParams, torch_maps

    params = StructureParams()
    seconds = timed_calls(lambda: torch_maps(greys, params, device=device), repeats=repeats, warmup=warmup,
                          synchronize=synchronizer(device))
    return {"workload": f"kornia structure maps, batch {len(greys)} at {greys.shape[2]}x{greys.shape[1]}",
            **_summary(seconds, len(greys), "images")}


def measure_clip_scoring(model_dir: Path, device: str, *, n: int, repeats: int, warmup: int = 1) -> list[dict]:
    """Time ClipScorer's image and text embeddings of ``n`` crops (random sizes) and ``n`` sentences."""
    from pipelines.steps.captions import ClipScorer

    scorer = ClipScorer(str(model_dir), device=device, batch_size=CLIP_BATCH)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)
             for h, w in rng.integers(48, 400, (n, 2))]
    words = "a red cup on a wooden table next to a small plant under the window light".split()
    sentences = [" ".join(rng.choice(words, int(rng.integers(8, 30)))) for _ in range(n)]
    sync = synchronizer(device)
    image_s = timed_calls(lambda: scorer.embed_images(crops), repeats=repeats, warmup=warmup, synchronize=sync)
    text_s = timed_calls(lambda: scorer.embed_texts(sentences), repeats=repeats, warmup=warmup, synchronize=sync)
    return [{"workload": f"CLIP scoring: embed {n} crops (48-400 px), batch {CLIP_BATCH}",
             **_summary(image_s, n, "images")},
            {"workload": f"CLIP scoring: embed {n} sentences (8-30 words), batch {CLIP_BATCH}",
             **_summary(text_s, n, "texts")}]


def measure_training(model_dir: Path, manifest: Path, device: str, *, batch_size: int, repeats: int,
                     precision: str = "bf16", warmup: int = 2) -> dict:
    """Time StructXLIP training steps (forward in ``precision`` autocast, the full objective, backward, AdamW) on
    pre-collated batches already on the device."""
    import torch

    from structxlip.data import ImagePreprocessor, StructXLIPCollator, StructXLIPDataset, load_records
    from structxlip.distributed import DistributedContext
    from structxlip.models import load_clip
    from structxlip.app.train import Objective, StructXLIPEncoder, autocast_context, compute_objective, make_optimizer

    torch.manual_seed(0)
    loaded = load_clip(str(model_dir))
    target = torch.device(device)
    clip = loaded.model.to(target).train()
    records = load_records(manifest, split="train")
    dataset = StructXLIPDataset(records, preprocess=ImagePreprocessor.from_image_processor(loaded.image_processor),
                                tokenizer=loaded.tokenizer)
    collator = StructXLIPCollator(loaded.tokenizer, with_negatives=False, pad_to_longest=True)
    if len(dataset) < batch_size:
        raise ValueError(f"the manifest's train split has {len(dataset)} items, fewer than batch {batch_size}")
    batch = collator([dataset[i] for i in range(batch_size)]).to(target)
    encoder = StructXLIPEncoder(clip)
    optimizer = make_optimizer(clip, lr=1e-5, weight_decay=0.05)
    objective = Objective()
    weights = objective.weights(0)
    context = DistributedContext(device=target)
    losses: list[float] = []

    def step() -> None:
        with autocast_context(target, precision):
            embeddings = encoder(batch, with_negatives=False)
        terms = compute_objective(embeddings, batch, weights=weights, chunk_tau=objective.chunk_tau, context=context)
        terms.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(terms.total.detach())

    seconds = timed_calls(step, repeats=repeats, warmup=warmup, synchronize=synchronizer(device))
    final = float(losses[-1])
    if not np.isfinite(final):
        raise RuntimeError(f"training step gave a non-finite loss ({final})")
    peak = torch.cuda.max_memory_allocated(target) / 2**20 if target.type == "cuda" else None
    return {"workload": f"StructXLIP training step, batch {batch_size}, {precision} autocast, AdamW",
            **_summary(seconds, batch_size, "images"), "final_loss": final, "peak_gpu_memory_mb": peak}


def measure_sam(model_dir: Path, device: str, *, images: list[np.ndarray], max_side: int, points_per_side: int,
                repeats: int, warmup: int = 1) -> dict:
    """Time mask generation (``sam_model_boxes`` through transformers' pipeline) per image."""
    from pipelines.steps.regions import build_sam_pipeline, sam_model_boxes

    generator = build_sam_pipeline(str(model_dir), device)
    found: list[int] = []

    def generate() -> None:
        for rgb in images:
            boxes, _, _ = sam_model_boxes(rgb, generator, max_side=max_side, points_per_side=points_per_side,
                                          points_per_batch=64, pred_iou_thresh=0.88, stability_score_thresh=0.95,
                                          nms_iou=0.7)
            found.append(len(boxes))

    seconds = timed_calls(generate, repeats=repeats, warmup=warmup, synchronize=synchronizer(device))
    return {"workload": f"SAM mask generation ({points_per_side}x{points_per_side} points, batch 64), "
                        f"{len(images)} images 640x480 at {max_side} px",
            **_summary(seconds, len(images), "images"), "masks_per_image": float(np.mean(found))}


# ---- random models ------------------------------------------------------------------------------------------------
def build_random_sam(out_dir: Path, *, seed: int = 0, image_size: int = SAM_SIDE) -> Path:
    """Write a randomly initialised base-sized ``SamModel`` (``SamConfig()``: the ViT-B image encoder) and its
    processor (``image_size`` px) to ``out_dir``; return it."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(SamConfig()).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor = SamImageProcessor(size={"longest_edge": image_size},
                                  pad_size={"height": image_size, "width": image_size})
    SamProcessor(image_processor=processor).save_pretrained(out_dir)
    return out_dir


def run(*, quick: bool = False) -> BenchmarkResult:
    """Return the GPU measurements (skip first with ``skip_reason``: this raises without CUDA)."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(f"gpu benchmark needs CUDA: {reason}")
    import torch

    from benchmarks.clip_scoring import build_random_vit_b16
    from structxlip.app.synthetic import make_synthetic_manifest
    from tests.scenes import make_scene

    device = "cuda"
    repeats = 3 if quick else 10
    result = BenchmarkResult(
        name="gpu",
        description=("CUDA paths with random weights, timed between torch.cuda.synchronize() calls after warm-up: "
                     "kornia structure maps, CLIP ViT-B/16 scoring, a bf16 StructXLIP training step of ViT-B/16, "
                     "SAM (base) mask generation through transformers."),
        params={"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                "repeats": repeats, "structure_batch": STRUCTURE_BATCH, "clip_batch": CLIP_BATCH,
                "train_batch": TRAIN_BATCH, "sam_side": SAM_SIDE},
    )
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        result.rows.append(measure_structure(device, greys=grey_batch(STRUCTURE_BATCH), repeats=repeats))
        vit = build_random_vit_b16(root / "vit-b16")
        result.rows += measure_clip_scoring(vit, device, n=256 if quick else 1024, repeats=repeats)
        # 5 of every 8 synthetic images land in the train split.
        manifest = make_synthetic_manifest(root / "data", n_images=TRAIN_BATCH * 8 // 5 + 8, image_size=128, seed=0)
        result.rows.append(measure_training(vit, manifest, device, batch_size=TRAIN_BATCH, repeats=repeats))
        torch.cuda.empty_cache()
        sam = build_random_sam(root / "sam-base")
        images = [make_scene(20_000 + i).rgb for i in range(2 if quick else 4)]
        result.rows.append(measure_sam(sam, device, images=images, max_side=SAM_SIDE, points_per_side=32,
                                       repeats=max(2, repeats // 3)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.notes = [
        "Random weights: the compute is the real architectures'; SAM's mask count (and so its post-processing) "
        "is not what trained weights give.",
        "Host-device copies are inside each time (the library calls return NumPy arrays); the training step's "
        "batch is on the device before the clock starts.",
    ]
    return result

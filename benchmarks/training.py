"""Training speed: seconds per optimiser step of ``structxlip.app.train`` at batch 16 on CPU, for the tiny random CLIP
and a randomly initialised ViT-B/16 CLIP at 224 px, on a synthetic manifest (``structxlip.app.synthetic``).

The full objective runs (global + local structure + chunk + hard-negative losses, Long-CLIP 248 text positions);
a step is what ``train`` times: device transfer, forward, losses, backward, optimiser step (not data loading).
The first step of each run is reported apart and excluded from the mean (allocator and kernel warm-up).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import BenchmarkResult

BATCH_SIZE = 16


def _steps(model: str, manifest: Path, out_dir: Path, steps: int) -> dict:
    from structxlip.app.train import train

    result = train(manifest, out_dir, clip_model=model, batch_size=BATCH_SIZE, epochs=1, max_steps=steps,
                   device="cpu", precision="fp32", progress=False, seed=0)
    seconds = [record["seconds"] for record in result.history]
    if len(seconds) < 2:
        raise RuntimeError(f"training took {len(seconds)} steps; need >= 2 to exclude the warm-up step")
    steady = seconds[1:]
    return {"steps_timed": len(steady), "s_per_step": statistics.mean(steady), "s_per_step_best": min(steady),
            "first_step_s": seconds[0], "images_per_s": BATCH_SIZE / statistics.mean(steady),
            "final_loss": result.history[-1]["loss"]}


def run(*, quick: bool = False) -> BenchmarkResult:
    """Return seconds per training step at batch 16 for the tiny and the ViT-B/16-size model."""
    from benchmarks.clip_scoring import build_random_vit_b16
    from structxlip.models import TINY_CLIP, resolve_model_source
    from structxlip.app.synthetic import make_synthetic_manifest

    tiny_steps, base_steps = (2, 2) if quick else (6, 2)
    # 5 of every 8 synthetic images land in the train split; one epoch must hold all the steps.
    n_images = (max(tiny_steps, base_steps) * BATCH_SIZE * 8) // 5 + 8
    result = BenchmarkResult(
        name="training",
        description=(f"structxlip.app.train on CPU, batch {BATCH_SIZE}, fp32, full objective (global + local + chunk + "
                     "hard negatives, 248 text positions), synthetic 128 px manifest resized by each model's "
                     "processor."),
        params={"batch_size": BATCH_SIZE, "steps": {"tiny": tiny_steps, "vit_b16": base_steps},
                "synthetic_images": n_images, "device": "cpu", "precision": "fp32"},
    )
    root = Path(tempfile.mkdtemp(prefix="bench-training-"))
    try:
        manifest = make_synthetic_manifest(root / "data", n_images=n_images, image_size=128, seed=0)
        tiny = _steps(resolve_model_source(TINY_CLIP), manifest, root / "tiny", tiny_steps)
        result.rows.append({"model": "tiny (structxlip/tiny-clip, 32 px)", **tiny})
        base_dir = build_random_vit_b16(root / "vit-b16")
        base = _steps(str(base_dir), manifest, root / "vit-b16-run", base_steps)
        result.rows.append({"model": "ViT-B/16 random (224 px)", **base})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.notes = [
        ("s_per_step: mean over the steps after the first (first_step_s, the warm-up, shown apart); as timed by "
         "train() per step, data loading excluded."),
        "Random weights: losses are meaningless, the compute is the real model's.",
    ]
    return result

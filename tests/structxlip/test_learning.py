"""The trainer learns: a small CLIP trained from scratch on the generated shapes benchmark retrieves held-out pairs
far above chance, and the full objective's loss goes down.

CI-sized (about a minute on 2 cores): 360 generated images (288 train, 72 held out), a 64 px CLIP with hidden size
64 and 2 layers, the full StructXLIP objective, 12 epochs of batch 32. Nothing here is random at run time: the
images are a pure function of the seed, the model's initial weights and the data order come from fixed seeds, torch
runs single-threaded with deterministic algorithms, so the outcome is the same number on every run of a given
platform; the margins leave room for float differences between platforms. Measured here (twice, same numbers):
t2i R@1 12.5% on 72 held-out pairs (chance 1.39%; asserted >= 4x chance = 5.6%), R@5 47.2% (asserted >= 20.8%),
mean loss 5.74 in epoch 1 and 3.09 in epoch 12 (asserted < 0.8x); about 26 CPU-seconds.
"""

from __future__ import annotations

import pytest
import torch

from structxlip.app.evaluate import evaluate
from structxlip.models import SMALL_CLIP
from structxlip.app.shapes_benchmark import make_benchmark
from structxlip.app.train import Objective, train
from tests.benchmark_manifest import benchmark_manifest

IMAGES = 360
EPOCHS = 12


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    make_benchmark(root / "bench", images=IMAGES, seed=0)
    manifest = benchmark_manifest(root / "bench", root / "data")
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        result = train(manifest, root / "run", clip_model=SMALL_CLIP, objective=Objective(), epochs=EPOCHS,
                       batch_size=32, lr=5e-4, weight_decay=0.05, max_text_tokens=77, precision="fp32", device="cpu",
                       seed=0, progress=False)
        metrics = evaluate(manifest, checkpoint=result.model_dir, base_model=SMALL_CLIP, split="test",
                           max_text_tokens=77, precision="fp32", device="cpu")
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return result, metrics


def test_held_out_text_to_image_recall_is_far_above_chance(learned):
    _, metrics = learned
    n_pairs = metrics["n_pairs"]
    assert n_pairs == IMAGES // 5
    chance_r1 = 100.0 / n_pairs  # a random ranking puts the match first 1 time in n_pairs
    print(f"t2i R@1 {metrics['t2i/R@1']:.2f}% vs chance {chance_r1:.2f}%; R@5 {metrics['t2i/R@5']:.2f}%")
    assert metrics["t2i/R@1"] >= 4 * chance_r1
    assert metrics["t2i/R@5"] >= 3 * 5 * chance_r1


def test_full_objective_loss_decreases(learned):
    result, _ = learned
    by_epoch: dict[int, list[float]] = {}
    for record in result.history:
        by_epoch.setdefault(record["epoch"], []).append(record["loss"])
    first, last = (sum(by_epoch[e]) / len(by_epoch[e]) for e in (0, EPOCHS - 1))
    assert all(record["weight/structure_centric"] > 0 and record["weight/local"] > 0 for record in result.history)
    print(f"full objective: epoch 1 mean loss {first:.3f}, epoch {EPOCHS} {last:.3f}")
    assert last < 0.8 * first

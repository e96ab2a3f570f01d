"""CLIP crop-vs-sentence scoring (the captions stage's work): embed every crop and every sentence of a chunk of
images in batches (``pipelines.steps.captions.ClipScorer``), then assign each image's sentences to its best crop
(``assign_sentences``). Tiny random CLIP (the demo model) and a randomly initialised ViT-B/16 CLIP at 224 px (the
size of the real model: same compute, meaningless weights).

Inputs: generated 640x480 photo-like images (``tests.corpus``) with their 30+ word captions split by spaCy; per image
the full image (crop 0, as the stage does) plus random boxes of 48..400 px as region crops.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import BenchmarkResult

CROPS_PER_IMAGE = 6  # the full image + 5 regions (the demo config keeps up to 8)
BATCH_SIZE = 64  # ClipScorer's default


def build_random_vit_b16(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a randomly initialised ``CLIPModel`` with the ViT-B/16 configuration (text 512 x 12 layers, vision
    768 x 12 layers, patch 16, 224 px, projection 512), the real CLIP tokenizer and a 224 px image processor to
    ``out_dir``; return ``out_dir``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from structxlip.models import build_clip_tokenizer, clip_bpe_vocabulary

    vocab, _ = clip_bpe_vocabulary()
    # CLIPConfig's text/vision defaults are ViT-B/32's towers; ViT-B/16 differs only in the patch size.
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "bos_token_id": vocab["<|startoftext|>"],
                     "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"image_size": 224, "patch_size": 16},
        projection_dim=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    build_clip_tokenizer(model_max_length=77).save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(out_dir)
    return out_dir


def make_workload(root: Path, n_images: int, *, seed: int = 0) -> list[tuple[list[np.ndarray], list[str]]]:
    """Return per image (crops, sentences): the full image plus random region crops as (h, w, 3) uint8 RGB, and the
    image's caption split into sentences/clauses as the captions stage splits it."""
    import json

    import cv2

    from pipelines.steps.captions import split_sentences
    from pipelines.steps.filtering import load_spacy
    from tests.corpus import CAPTIONS_FILE, make_generated_images

    paths = make_generated_images(root, n_images, seed=seed)
    captions = {}
    for line in (root / CAPTIONS_FILE).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            captions[row["file"]] = row["caption"]
    nlp = load_spacy()
    rng = np.random.default_rng(seed)
    work = []
    for path in paths:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        height, width = image.shape[:2]
        crops = [image]
        for _ in range(CROPS_PER_IMAGE - 1):
            h, w = (int(v) for v in rng.integers(48, [min(400, height), min(400, width)], endpoint=True))
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            crops.append(np.ascontiguousarray(image[top : top + h, left : left + w]))
        work.append((crops, split_sentences(captions[path.name], nlp=nlp)))
    return work


def score(scorer, work: list[tuple[list[np.ndarray], list[str]]]) -> list:
    """Embed all crops and all sentences of ``work`` in batches, then assign each image's sentences to its crops;
    return the per-image assignments."""
    from pipelines.steps.captions import assign_sentences

    crop_embeds = scorer.embed_images([crop for crops, _ in work for crop in crops])
    sentence_embeds = scorer.embed_texts([sentence for _, sentences in work for sentence in sentences])
    assignments, c, s = [], 0, 0
    for crops, sentences in work:
        assignments.append(assign_sentences(crop_embeds[c : c + len(crops)], sentence_embeds[s : s + len(sentences)]))
        c, s = c + len(crops), s + len(sentences)
    return assignments


def _measure(label: str, model: str, work, repeats: int) -> dict:
    from pipelines.steps.captions import ClipScorer

    start = time.perf_counter()
    scorer = ClipScorer(model, device="cpu", batch_size=BATCH_SIZE)
    load_s = time.perf_counter() - start
    score(scorer, work[:2])  # warm-up: first-call allocations and kernel selection are not per-crop cost
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        assignments = score(scorer, work)
        seconds.append(time.perf_counter() - start)
    if len(assignments) != len(work):
        raise RuntimeError(f"{label}: scored {len(assignments)} of {len(work)} images")
    # Crops and sentences timed apart too: they scale differently (vision tower vs text tower).
    crops = [crop for crops_, _ in work for crop in crops_]
    sentences = [s for _, ss in work for s in ss]
    start = time.perf_counter()
    scorer.embed_images(crops)
    crops_s = time.perf_counter() - start
    start = time.perf_counter()
    scorer.embed_texts(sentences)
    sentences_s = time.perf_counter() - start
    best = min(seconds)
    pairs = sum(len(c) * len(s) for c, s in work)
    return {"model": label, "images": len(work), "crops": len(crops), "sentences": len(sentences),
            "seconds": best, "images_per_s": len(work) / best, "crops_x_sentences_per_s": pairs / best,
            "crops_per_s": len(crops) / crops_s, "sentences_per_s": len(sentences) / sentences_s,
            "load_s": load_s, "runs": repeats}


def run(*, quick: bool = False) -> BenchmarkResult:
    """Return crops x sentences per second of batched CLIP scoring for the tiny and the ViT-B/16-size model."""
    from structxlip.models import TINY_CLIP, resolve_model_source

    tiny_images, base_images, repeats = (8, 4, 1) if quick else (64, 16, 3)
    result = BenchmarkResult(
        name="clip_scoring",
        description=("CLIP crop-vs-sentence scoring (ClipScorer embeddings in batches of "
                     f"{BATCH_SIZE} + assign_sentences per image), {CROPS_PER_IMAGE} crops per generated 640x480 "
                     "image (full image + regions of 48..400 px), the image's caption split into sentences; CPU."),
        params={"crops_per_image": CROPS_PER_IMAGE, "batch_size": BATCH_SIZE, "device": "cpu",
                "images": {"tiny": tiny_images, "vit_b16": base_images}, "repeats": repeats},
    )
    root = Path(tempfile.mkdtemp(prefix="bench-clip-scoring-"))
    try:
        work = make_workload(root / "images", max(tiny_images, base_images))
        result.rows.append(_measure("tiny (structxlip/tiny-clip, 32 px)", resolve_model_source(TINY_CLIP),
                                    work[:tiny_images], repeats))
        base_dir = build_random_vit_b16(root / "vit-b16")
        result.rows.append(_measure("ViT-B/16 random (224 px)", str(base_dir), work[:base_images],
                                    1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.notes = [
        ("crops_x_sentences_per_s = sum over images of (crops x sentences) / seconds of the whole batched scoring "
         "(embed crops + embed sentences + assign); best of the runs after one warm-up call."),
        "crops_per_s / sentences_per_s: the vision / text tower alone on the same inputs (includes preprocessing).",
        "Random weights: the assignments are meaningless, the compute is the real model's.",
    ]
    return result

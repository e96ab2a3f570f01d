"""One training step on a 6-record reference JSON equals METHOD.md section 4, computed by a slow per-sample loop.

The expectation below shares no code with the trainer: it reads the JSON itself, makes the pixels with the
transformers image processor, tokenises to max_length without an attention mask (as the reference trainer does),
stretches the positions, cuts chunks and pools them in Python loops, and writes every loss from its formula.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from storage.layout import OutputLayout

MAX_TOKENS = 248
TOP_K = 3
TAU = 0.07
EPS = 1e-8
BASE = {"global": 1.0, "structure_centric": 0.5, "consistency": 0.05, "local": 0.1}  # epoch 0: warm-up factor 1

# (caption, filtered caption): filtering removed words in 0, 1, 2 (so the reference's pooling is misaligned there);
# 0 and 1 end with one-word clauses; 3's filtered caption is a single word (no chunk at all).
CAPTIONS = [
    ("A red dog runs across the green field. Dog.", "A dog runs across the field. Dog."),
    ("Two wooden chairs stand near a white table; calm", "Two chairs stand near a table; calm"),
    ("A striped cat sleeps.", "A cat sleeps."),
    ("Blue sky.", "Sky."),
    ("An old man reads a newspaper on a bench in the park while pigeons walk around his feet and children play "
     "with a ball near the fountain", None),
    ("A small boat, a tall lighthouse, and waves crash on rocks", None),
]


def _noise(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> str:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return str(path)


@pytest.fixture(scope="module")
def reference_json(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    sizes = [(53, 37), (40, 61), (45, 45), (71, 33), (38, 70), (64, 48)]  # odd landscape and portrait sizes
    records = []
    for i, ((caption, filtered), size) in enumerate(zip(CAPTIONS, sizes, strict=True)):
        crop = lambda n, score, exists=True: {  # noqa: E731
            "similarity_score": score, "filename": None, "caption": f"part {n}",
            "filename_structure_cropped": _noise(root / f"crop{i}_{n}.png", (17 + n, 23 - n), 100 * i + n, "L")
            if exists else str(root / f"missing{i}_{n}.png"),
            "bbox_coordinates": {"x1": 1.5, "y1": 2, "x2": 10.25, "y2": 12, "width": 8.75, "height": 10}}
        segments = {0: [crop(0, 15.0), crop(1, 29.0, exists=False), crop(2, 22.0), crop(3, 25.0)],
                    1: [crop(0, 20.0)], 2: [], 3: [crop(0, 18.0), crop(1, 19.0)],
                    4: [crop(0, 21.0), crop(1, 24.0, exists=False), crop(2, 16.0)], 5: [crop(0, 30.0), crop(1, 17.0)]}
        structure = None if i == 3 else _noise(root / f"structure{i}.png", size, 10 + i, "L")
        record = {"original_filename": _noise(root / f"image{i}.png", size, i), "original_caption": caption,
                  "original_filename_structure": structure, "segment": segments[i]}
        if filtered is not None:
            record["structxlip"] = {"filtered_caption": filtered}
        records.append(record)
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


# ---- the slow, reference-style expectation ------------------------------------------------------------------------
def _stretch_positions(table: torch.Tensor, target: int, keep: int = 20) -> torch.Tensor:
    rows = [table[i] for i in range(keep)]
    for i in range(keep, table.shape[0] - 1):
        a, b = table[i], table[i + 1]
        rows += [a, (3 * a + b) / 4, (a + b) / 2, (a + 3 * b) / 4]
    step = (table[-1] - table[-2]) / 4
    k = 0
    while len(rows) < target:
        rows.append(table[-1] + k * step)
        k += 1
    return torch.stack(rows[:target])


def _reference_model(model_dir: Path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir)
    embeddings = model.text_model.embeddings
    stretched = _stretch_positions(embeddings.position_embedding.weight.detach(), MAX_TOKENS)
    embeddings.position_embedding = torch.nn.Embedding.from_pretrained(stretched, freeze=False)
    embeddings.register_buffer("position_ids", torch.arange(MAX_TOKENS)[None], persistent=False)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)


def _window(n: int) -> int:
    return 2 if n <= 4 else 3 if n <= 10 else 4 if n <= 20 else 5 if n <= 40 else 6


def _spans(text: str, tokenizer, end_limit: int) -> list[tuple[int, int]]:
    """Chunks per METHOD.md 4: sentences between runs of .,;!?; windows over start words 0..n-w; token spans."""
    encoding = tokenizer(text)
    spans = []
    position = 0
    for piece in re.split(r"([.,;!?]+)", text):
        words = [(position + m.start(), position + m.end()) for m in re.finditer(r"\w+", piece)]
        position += len(piece)
        w = _window(len(words)) if words else 0
        for i in range(0, len(words) - w + 1) if words else []:
            start = encoding.char_to_token(words[i][0])
            end = encoding.char_to_token(words[i + w - 1][1] - 1) + 1
            if end <= end_limit and len(spans) < 64:
                spans.append((start, end))
    return spans


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x + EPS, dim=-1)


def _symmetric_ce(logits: torch.Tensor) -> float:
    n = logits.shape[0]
    rows = sum(-torch.log_softmax(logits[i], 0)[i] for i in range(n)) / n
    cols = sum(-torch.log_softmax(logits[:, j], 0)[j] for j in range(n)) / n
    return float((rows + cols) / 2)


@torch.no_grad()
def _expected_terms(json_path: Path, model_dir: Path, *, pool_unfiltered: bool) -> dict[str, float]:
    model, tokenizer, processor = _reference_model(model_dir)
    records = json.loads(json_path.read_text())
    pixels = lambda image: processor(images=image, return_tensors="pt")["pixel_values"]  # noqa: E731
    side = processor.crop_size["height"]
    black = Image.new("RGB", (side, side))

    images, structures, has_structure, crops, crop_valid = [], [], [], [], []
    for record in records:
        images.append(pixels(Image.open(record["original_filename"]).convert("RGB")))
        path = record["original_filename_structure"]
        has_structure.append(path is not None and Path(path).is_file())
        structures.append(pixels(Image.open(path).convert("L").convert("RGB") if has_structure[-1] else black))
        ranked = sorted(record["segment"], key=lambda s: s["similarity_score"], reverse=True)[:TOP_K]
        valid = [Path(s["filename_structure_cropped"]).is_file() for s in ranked] + [False] * (TOP_K - len(ranked))
        crop_valid.append(valid)
        crops.append([pixels(Image.open(s["filename_structure_cropped"]).convert("L").convert("RGB"))
                      for s, ok in zip(ranked, valid) if ok])

    image = torch.cat([model.get_image_features(pixel_values=p).pooler_output for p in images])
    structure = torch.cat([model.get_image_features(pixel_values=p).pooler_output for p in structures])
    captions = [r["original_caption"] for r in records]
    filtered = [(r.get("structxlip") or {}).get("filtered_caption") or r["original_caption"] for r in records]
    tokens = lambda texts: tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS,  # noqa
                                     return_tensors="pt")["input_ids"]
    caption_out = model.text_model(input_ids=tokens(captions))
    filtered_out = model.text_model(input_ids=tokens(filtered))
    text = model.text_projection(caption_out.pooler_output)
    filtered_text = model.text_projection(filtered_out.pooler_output)
    s = float(model.logit_scale.exp())

    terms = {"global": _symmetric_ce(s * _unit(image) @ _unit(text).T)}
    keep = torch.tensor(has_structure)
    terms["structure_centric"] = _symmetric_ce(s * _unit(structure[keep]) @ _unit(filtered_text[keep]).T)
    terms["consistency"] = float(sum(1 - _unit(structure[b]) @ _unit(image[b]) for b in range(6) if has_structure[b])
                                 / sum(has_structure))

    # Local: every valid crop of the batch, with its owner.
    crop_embeds, crop_owner = [], []
    for b, sample_crops in enumerate(crops):
        for p in sample_crops:
            crop_embeds.append(_unit(model.get_image_features(pixel_values=p).pooler_output[0]))
            crop_owner.append(b)
    g = min(s / TAU, 100.0)
    states = caption_out.last_hidden_state if pool_unfiltered else filtered_out.last_hidden_state
    per_sample = []
    for b in range(6):
        spans = _spans(filtered[b], tokenizer, MAX_TOKENS if pool_unfiltered else MAX_TOKENS - 1)
        if not spans or not any(crop_valid[b]):
            continue
        losses = []
        for start, end in spans:
            span = states[b, start:end]
            weights = torch.softmax(span.norm(dim=-1), dim=0)
            pooled = sum(weights[t] * span[t] for t in range(end - start))
            chunk = _unit(model.text_projection(model.text_model.final_layer_norm(pooled)))
            logits = [g * float(chunk @ crop) for crop in crop_embeds]
            own = [value for value, owner in zip(logits, crop_owner) if owner == b]
            losses.append(-(math.log(sum(math.exp(v) for v in own)) - math.log(sum(math.exp(v) for v in logits))))
        per_sample.append(sum(losses) / len(losses))
    terms["local"] = sum(per_sample) / len(per_sample)
    terms["total"] = sum(BASE[name] * terms[name] for name in BASE)
    return terms


def _first_step(json_path: Path, out: Path, model_dir: Path, **options) -> dict:
    from structxlip.app.train import train

    train(json_path, out, clip_model=str(model_dir), epochs=1, batch_size=6, max_text_tokens=MAX_TOKENS,
          device="cpu", progress=False, max_steps=1, **options)
    return json.loads(OutputLayout(out).train_metrics.read_text().splitlines()[0])


@pytest.mark.parametrize("local_pooling", ["filtered", "reference"])
def test_one_step_on_a_reference_json_equals_the_method_formulas(reference_json, tiny_clip_dir, tmp_path,
                                                                 local_pooling):
    logged = _first_step(reference_json, tmp_path, tiny_clip_dir, local_pooling=local_pooling)
    expected = _expected_terms(reference_json, tiny_clip_dir, pool_unfiltered=local_pooling == "reference")
    for name in BASE:
        assert logged[f"loss/{name}"] == pytest.approx(expected[name], rel=1e-4, abs=1e-5), name
        assert logged[f"weight/{name}"] == pytest.approx(BASE[name])
    assert logged["loss"] == pytest.approx(expected["total"], rel=1e-4, abs=1e-5)
    # The intended deviation matters on these captions: the two poolings give different local terms.
    other = _expected_terms(reference_json, tiny_clip_dir, pool_unfiltered=local_pooling != "reference")
    assert abs(other["local"] - expected["local"]) > 1e-3


def test_the_reference_style_spans_equal_chunk_spans(tiny_clip_dir):
    from transformers import AutoTokenizer

    from structxlip.losses import chunk_spans

    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    texts = [f for _, f in CAPTIONS if f] + [c for c, _ in CAPTIONS] + ["Hippopotamuses wallow, ok; déjà vu 🍕 naïve!"]
    for text in texts:
        assert chunk_spans(text, tokenizer, max_length=MAX_TOKENS) == _spans(text, tokenizer, MAX_TOKENS - 1), text

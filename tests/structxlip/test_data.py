"""Records, image preprocessing, chunk spans computed once, collate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from storage.layout import OutputLayout
from storage.manifest import bbox, manifest_table
from storage.parquet import write_parquet_atomic
from structxlip.data import (
    ImagePreprocessor,
    StructXLIPCollator,
    StructXLIPDataset,
    load_records,
    open_rgb,
)
from structxlip.app.synthetic import make_synthetic_manifest


@pytest.fixture(scope="module")
def loaded(tiny_clip_dir):
    from structxlip.models import load_clip

    return load_clip(tiny_clip_dir, max_text_tokens=77)


@pytest.fixture(scope="module")
def preprocess(loaded):
    return ImagePreprocessor.from_image_processor(loaded.image_processor)


def _grey(path: Path, value: int, size=(20, 20)) -> str:
    Image.new("L", size, value).save(path)
    return str(path)


@pytest.fixture()
def hand_manifest(tmp_path) -> Path:
    """Two ok rows and a failed one, with hand-chosen scores, missing files and null paths."""
    layout = OutputLayout(tmp_path)
    (tmp_path / "maps").mkdir()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 20), (10, 200, 10)).save(tmp_path / "b.png")
    seg = lambda path, score: {"bbox": bbox(0, 0, 5, 5), "crop_path": None, "structure_crop_path": path,  # noqa: E731
                               "caption": "c", "filtered_caption": "c", "similarity_score": score}
    rows = [
        {"image_id": "a" * 32, "source_path": str(tmp_path / "a.png"), "status": "ok", "caption": "a red box.",
         "filtered_caption": "a box.", "structure_path": "maps/a.canny.png", "scribble_path": "maps/a.scribble.png",
         "split": "train", "hard_negatives": ["a green box.", "a blue box.", "a grey box."],
         "segments": [seg("maps/s1.png", 15.0), seg(None, 29.0), seg("maps/s3.png", 22.0), seg("maps/s4.png", 25.0)]},
        {"image_id": "b" * 32, "source_path": str(tmp_path / "b.png"), "status": "ok", "caption": "a green box.",
         "filtered_caption": None, "structure_path": "maps/missing.png", "scribble_path": None, "split": "train",
         "hard_negatives": None, "segments": [seg("maps/s1.png", 20.0)]},
        {"image_id": "c" * 32, "source_path": str(tmp_path / "c.png"), "status": "failed", "error": "x",
         "split": "train"},
        {"image_id": "d" * 32, "source_path": str(tmp_path / "a.png"), "status": "ok", "caption": "test image",
         "split": "test"},
    ]
    _grey(tmp_path / "maps" / "a.canny.png", 255)
    _grey(tmp_path / "maps" / "a.scribble.png", 128)
    _grey(tmp_path / "maps" / "s1.png", 255)
    _grey(tmp_path / "maps" / "s4.png", 255)  # s3 is referenced but missing
    write_parquet_atomic(manifest_table(rows), layout.manifest_part("x"))
    return tmp_path


def test_records_filter_split_status_and_rank_segments(hand_manifest):
    records = load_records(hand_manifest, split="train", top_k=3)
    assert [r.image_id for r in records] == ["a" * 32, "b" * 32]
    a, b = records
    root = hand_manifest.resolve()
    # Ranked by similarity_score: 29 (null path), 25 (s4), 22 (s3).
    assert a.structure_crops == (None, root / "maps" / "s4.png", root / "maps" / "s3.png")
    assert b.structure_crops == (root / "maps" / "s1.png", None, None)
    assert b.filtered_caption == "a green box."  # no filtering result: the caption itself
    assert a.structure_path == root / "maps" / "a.canny.png"
    assert load_records(hand_manifest, split="train", structure_kind="scribble")[0].structure_path == \
        root / "maps" / "a.scribble.png"
    assert [r.image_id for r in load_records(hand_manifest, split=None)] == ["a" * 32, "b" * 32, "d" * 32]
    with pytest.raises(ValueError, match="no usable records"):
        load_records(hand_manifest, split="val")
    with pytest.raises(ValueError, match="structure_kind"):
        load_records(hand_manifest, structure_kind="hed")


def test_items_use_black_dummy_and_flags_for_missing_structure(hand_manifest, loaded, preprocess):
    records = load_records(hand_manifest, split="train", top_k=3)
    dataset = StructXLIPDataset(records, preprocess=preprocess, tokenizer=loaded.tokenizer, max_text_tokens=77)
    mean = torch.tensor(loaded.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(loaded.image_processor.image_std).view(3, 1, 1)
    black = (0 - mean) / std
    white = (1 - mean) / std
    a, b = dataset[0], dataset[1]
    assert a["has_structure"] and not b["has_structure"]
    torch.testing.assert_close(b["structure_values"], black.expand(3, 32, 32))
    torch.testing.assert_close(a["structure_values"], white.expand(3, 32, 32))  # white map, grey -> RGB
    assert a["crop_valid"].tolist() == [False, True, False]  # null path, present file, missing file
    torch.testing.assert_close(a["crop_values"][0], black.expand(3, 32, 32))
    assert b["crop_valid"].tolist() == [True, False, False]
    red = torch.tensor([200, 10, 10]).view(3, 1, 1) / 255
    torch.testing.assert_close(a["pixel_values"], ((red - mean) / std).expand(3, 32, 32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("height_width", [(20, 37), (37, 20), (41, 71), (71, 41), (33, 50)])
def test_preprocessing_gives_the_image_processors_pixels(loaded, preprocess, height_width):
    from transformers import CLIPImageProcessorPil

    height, width = height_width
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    ours = preprocess(image)
    theirs = loaded.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)

    # Independently: PIL bicubic resize of the shortest side to 32 (long side truncated), crop offset rounded
    # *down*, rescale, normalise. The PIL-backed processor (the reference's transformers 4) gives exactly this; the
    # torchvision-backed one differs by at most one intensity level (its bicubic rounds differently).
    short = min(height, width)
    size = (32, int(32 * height / short)) if width == short else (int(32 * width / short), 32)
    resized = np.asarray(image.resize(size, Image.BICUBIC), dtype=np.float32)
    top, left = (resized.shape[0] - 32) // 2, (resized.shape[1] - 32) // 2
    crop = torch.from_numpy(resized[top:top + 32, left:left + 32]).permute(2, 0, 1) / 255
    mean = torch.tensor(loaded.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(loaded.image_processor.image_std).view(3, 1, 1)
    by_hand = (crop - mean) / std
    pil_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.testing.assert_close(pil_processor(images=image, return_tensors="pt")["pixel_values"][0], by_hand,
                               atol=1e-5, rtol=0)
    one_level = float((1 / 255 / std).max())
    assert (ours - by_hand).abs().max() <= one_level + 1e-5
    if (max(size) - 32) % 2:  # an odd margin: rounding the offset up (the old bug) shifts the crop by 1 px
        shifted = torch.from_numpy(resized[top + (width == short):top + (width == short) + 32,
                                           left + (height == short):left + (height == short) + 32]).permute(2, 0, 1)
        assert ((shifted / 255 - mean) / std - ours).abs().max() > 10 * one_level


def test_structure_maps_are_read_as_grey(tmp_path, preprocess):
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    grey = round(0.299 * 255)  # PIL's "L" conversion of pure red
    expected = preprocess(Image.new("RGB", (32, 32), (grey, grey, grey)))
    torch.testing.assert_close(preprocess(open_rgb(tmp_path / "red.png", via_grey=True)), expected)


def test_open_rgb_applies_exif_orientation_and_reports_bad_files(tmp_path):
    image = Image.new("RGB", (40, 20), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view": width and height swap
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_rgb(tmp_path / "rotated.jpg").size == (20, 40)
    Image.new("L", (5, 5)).save(tmp_path / "grey.png")
    assert open_rgb(tmp_path / "grey.png").mode == "RGB"
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read image .*bad.jpg"):
        open_rgb(tmp_path / "bad.jpg")


def test_chunk_spans_are_computed_once_per_caption(hand_manifest, loaded, preprocess, monkeypatch):
    import structxlip.losses as losses

    calls = []
    real = losses.chunk_spans
    monkeypatch.setattr(losses, "chunk_spans", lambda text, *a, **k: calls.append(text) or real(text, *a, **k))
    records = load_records(hand_manifest, split="train")
    dataset = StructXLIPDataset(records * 3, preprocess=preprocess, tokenizer=loaded.tokenizer, max_text_tokens=77)
    assert sorted(calls) == ["a box.", "a green box."]  # 6 records, 2 distinct filtered captions
    for _ in range(2):
        dataset[0]
    assert len(calls) == 2


def test_chunk_spans_cover_the_word_windows_of_the_filtered_caption(tmp_path, loaded, preprocess):
    make_synthetic_manifest(tmp_path, n_images=4, image_size=48)
    records = load_records(tmp_path, split=None)
    dataset = StructXLIPDataset(records, preprocess=preprocess, tokenizer=loaded.tokenizer, max_text_tokens=77)
    record, spans = records[0], dataset.spans[0]
    ids = loaded.tokenizer(record.filtered_caption)["input_ids"]
    decoded = [loaded.tokenizer.decode(ids[s:e]).strip() for s, e in spans]
    # Independent expectation: sentences split at punctuation, windows by METHOD's table (w = 3).
    expected = []
    for sentence in record.filtered_caption.replace(".", "|").split("|"):
        words = sentence.split()
        if not words:
            continue
        window = 2 if len(words) <= 4 else 3 if len(words) <= 10 else 4
        if len(words) <= window:
            expected.append(" ".join(words))
        else:
            expected += [" ".join(words[i:i + window]) for i in range(len(words) - window + 1)]
    assert decoded == expected


def test_collate_pads_to_max_tokens_and_marks_valid_negatives(hand_manifest, loaded, preprocess):
    records = load_records(hand_manifest, split="train", top_k=2)
    dataset = StructXLIPDataset(records, preprocess=preprocess, tokenizer=loaded.tokenizer, max_text_tokens=77)
    batch = StructXLIPCollator(loaded.tokenizer, max_text_tokens=77)([dataset[0], dataset[1]])
    assert batch.pixel_values.shape == batch.structure_values.shape == (2, 3, 32, 32)
    assert batch.input_ids.shape == batch.filtered_input_ids.shape == (2, 77)
    assert batch.has_structure.tolist() == [True, False]
    assert batch.crop_values.shape == (2, 2, 3, 32, 32) and batch.crop_valid.tolist() == [[False, True], [True, False]]
    assert batch.negative_valid.tolist() == [[True, True, True], [False, False, False]]
    assert batch.negative_input_ids.shape == (6, 77)
    expected = loaded.tokenizer("a blue box.")["input_ids"]
    assert batch.negative_input_ids[1, :len(expected)].tolist() == expected
    assert batch.attention_mask[0].sum() == len(loaded.tokenizer("a red box.")["input_ids"])
    half = batch.subset([1])
    assert half.negative_input_ids.shape == (3, 77) and half.chunk_spans == [batch.chunk_spans[1]]
    without = StructXLIPCollator(loaded.tokenizer, max_text_tokens=77, with_negatives=False)([dataset[0]])
    assert without.negative_input_ids is None and without.negative_valid is None


def test_collate_pads_to_the_longest_text_when_asked_capped_at_max_tokens(hand_manifest, loaded, preprocess):
    records = load_records(hand_manifest, split="train", top_k=2)
    dataset = StructXLIPDataset(records, preprocess=preprocess, tokenizer=loaded.tokenizer, max_text_tokens=77)
    items = [dataset[0], dataset[1]]
    collate = StructXLIPCollator(loaded.tokenizer, max_text_tokens=77, pad_to_longest=True)
    batch = collate(items)
    # By hand: "a red box." = <sot> a red box . <eot> = 6 tokens, the longest of every caption, filtered caption
    # ("a box." = 5) and negative ("a blue box." = 6; the empty padding slots = 2).
    assert batch.input_ids.shape == batch.filtered_input_ids.shape == (2, 6)
    assert batch.negative_input_ids.shape == batch.negative_attention_mask.shape == (6, 6)
    assert batch.filtered_attention_mask.sum(1).tolist() == [5, 6]
    full = StructXLIPCollator(loaded.tokenizer, max_text_tokens=77)(items)
    for name in ("input_ids", "attention_mask", "filtered_input_ids", "negative_input_ids", "negative_valid"):
        assert torch.equal(getattr(batch, name), getattr(full, name)[:, :6] if name != "negative_valid"
                           else full.negative_valid), name
    assert batch.chunk_spans == full.chunk_spans and batch.subset([1]).negative_input_ids.shape == (3, 6)

    items[0] = {**items[0], "caption": "cat " * 100}  # 102 tokens: truncated to the cap, EOS kept last
    capped = collate(items)
    eos = loaded.tokenizer.eos_token_id
    assert capped.input_ids.shape == (2, 77) and capped.input_ids[0, -1] == eos
    assert capped.input_ids[0].tolist() == loaded.tokenizer("cat " * 100, truncation=True, max_length=77)["input_ids"]
    with pytest.raises(ValueError, match="max_text_tokens must be positive"):
        StructXLIPCollator(loaded.tokenizer, max_text_tokens=0)


def test_reference_json_is_a_record_source(tmp_path, loaded):
    from storage.reference_json import export_reference_json

    make_synthetic_manifest(tmp_path / "out", n_images=4, image_size=48)
    export_reference_json(tmp_path / "out", tmp_path / "ref.json")
    from_json = load_records(tmp_path / "ref.json", split=None)
    from_manifest = load_records(tmp_path / "out", split=None)
    assert from_json == from_manifest and len(from_json) == 4

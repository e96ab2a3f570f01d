"""Several captions per image (COCO / Flickr30k style): the retrieval protocol on a hand-computed case, the epoch's
caption draw, and multi-caption records."""

from __future__ import annotations

import math

import pytest
import torch

from structxlip.data import TrainingRecord, caption_choice, records_from_rows
from structxlip.app.evaluate import EncodedSplit, metrics_table, split_report
from structxlip.metrics import group_match_ranks, match_ranks, retrieval_metrics, retrieval_report

# 3 images x 2 captions. Images are the unit vectors e0, e1, e2 (of R^4); each caption is (s0, s1, s2, pad) with
# the pad making it unit length, so cosine(caption, image k) is exactly s_k. Rows: captions; text_image: their image.
SCORES = [
    [0.6, 0.3, 0.1],  # T0, image 0
    [0.5, 0.4, 0.2],  # T1, image 1
    [0.2, 0.1, 0.7],  # T2, image 2
    [0.1, 0.6, 0.3],  # T3, image 0
    [0.3, 0.5, 0.2],  # T4, image 1
    [0.4, 0.1, 0.4],  # T5, image 2
]
TEXT_IMAGE = torch.tensor([0, 1, 2, 0, 1, 2])
# Worked out by hand from SCORES (ties: the lower index first):
# text->image, rank of the caption's own image in its row:
#   T0: 0.6 highest -> 1; T1: 0.4 < 0.5 -> 2; T2: 0.7 -> 1; T3: 0.1 < 0.6, 0.3 -> 3; T4: 0.5 -> 1;
#   T5: 0.4 ties image 0's 0.4, which comes first -> 2.
T2I_RANKS = [1, 2, 1, 3, 1, 2]
# image->text, best rank of ANY of the image's captions in its column:
#   image 0: column (.6 .5 .2 .1 .3 .4), captions T0 (.6) / T3 (.1): T0 is first -> 1
#   image 1: column (.3 .4 .1 .6 .5 .1), captions T1 (.4) / T4 (.5): T4, below T3's .6 -> 2 (T1 alone would be 3)
#   image 2: column (.1 .2 .7 .3 .2 .4), captions T2 (.7) / T5 (.4): T2 first -> 1
I2T_RANKS = [1, 2, 1]


def _embeddings():
    images = torch.eye(4, dtype=torch.float64)[:3]
    texts = torch.tensor([row + [math.sqrt(1.0 - sum(s * s for s in row))] for row in SCORES], dtype=torch.float64)
    return images, texts


def test_group_ranks_follow_the_standard_protocol_by_hand():
    images, texts = _embeddings()
    assert group_match_ranks(texts, images, TEXT_IMAGE, torch.arange(3)).tolist() == T2I_RANKS
    assert group_match_ranks(images, texts, torch.arange(3), TEXT_IMAGE).tolist() == I2T_RANKS
    report = retrieval_report(images, texts, text_image=TEXT_IMAGE)
    # t2i ranks 1,2,1,3,1,2: 3 of 6 at rank 1; all within 5; mean 10/6; median of 1,1,1,2,2,3 = 1.5.
    assert report["t2i/R@1"] == pytest.approx(50.0)
    assert report["t2i/R@5"] == 100.0
    assert report["t2i/mean_rank"] == pytest.approx(10 / 6)
    assert report["t2i/median_rank"] == 1.5
    # i2t ranks 1,2,1: 2 of 3 at rank 1, mean 4/3, median 1.
    assert report["i2t/R@1"] == pytest.approx(200 / 3)
    assert report["i2t/mean_rank"] == pytest.approx(4 / 3)
    assert report["i2t/median_rank"] == 1.0
    # The same numbers through the evaluation report (texts 0..2 = first captions, 3..5 = the others).
    encoded = EncodedSplit(image=images.float(), text=texts.float(), structure=images.float(),
                           has_structure=torch.ones(3, dtype=torch.bool), text_image=TEXT_IMAGE)
    split = split_report(encoded)
    assert (split["n_pairs"], split["n_texts"]) == (3, 6)
    table = metrics_table(split)
    assert "| t2i | 6 | 50.00 | 100.00" in table and "| i2t | 3 | 66.67 | 100.00" in table
    assert split["t2i/R@1"] == pytest.approx(50.0) and split["i2t/R@1"] == pytest.approx(200 / 3)
    # Structure maps equal to the images: structure->text is image->text, text->structure is text->image.
    assert split["s2t/R@1"] == split["i2t/R@1"] and split["t2s/mean_rank"] == split["t2i/mean_rank"]


def test_first_captions_only_are_the_one_to_one_numbers():
    images, texts = _embeddings()
    # One caption per image (T0, T1, T2): group ranks with text_image = arange coincide with the 1:1 ranks.
    first = texts[:3]
    assert match_ranks(first, images).tolist() == [1, 2, 1]
    assert group_match_ranks(first, images, torch.arange(3), torch.arange(3)).tolist() == [1, 2, 1]
    # image->text among the first captions only: columns (.6 .5 .2), (.3 .4 .1), (.1 .2 .7): each its own first.
    assert match_ranks(images, first).tolist() == [1, 1, 1]
    one_to_one = retrieval_report(images, first, images)
    assert retrieval_report(images, first, images, text_image=torch.arange(3)) == pytest.approx(one_to_one)
    assert one_to_one["t2i/R@1"] == retrieval_metrics(first, images)["R@1"]


def test_group_ranks_equal_match_ranks_on_random_pairs_with_ties():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randint(-2, 3, (40, 3), generator=generator).float() + 0.01  # many exact ties
    gallery = torch.randint(-2, 3, (40, 3), generator=generator).float() + 0.01
    ids = torch.arange(40)
    assert torch.equal(group_match_ranks(queries, gallery, ids, ids, chunk_size=7), match_ranks(queries, gallery))


def test_ranks_against_a_slow_any_caption_loop():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(7, 5, generator=generator)
    text_image = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 0, 3, 5, 6, 6, 6])
    texts = images[text_image] + 0.9 * torch.randn(len(text_image), 5, generator=generator)
    cos = torch.nn.functional.normalize(images, dim=1) @ torch.nn.functional.normalize(texts, dim=1).T  # (7, 14)
    slow_i2t = []
    for i in range(7):
        order = sorted(range(14), key=lambda j: (-float(cos[i, j]), j))
        slow_i2t.append(1 + next(n for n, j in enumerate(order) if int(text_image[j]) == i))
    slow_t2i = []
    for t in range(14):
        order = sorted(range(7), key=lambda i: (-float(cos[i, t]), i))
        slow_t2i.append(1 + order.index(int(text_image[t])))
    assert group_match_ranks(images, texts, torch.arange(7), text_image, chunk_size=3).tolist() == slow_i2t
    assert group_match_ranks(texts, images, text_image, torch.arange(7), chunk_size=4).tolist() == slow_t2i


def test_a_query_without_any_match_is_an_error():
    with pytest.raises(ValueError, match="at least one matching"):
        group_match_ranks(torch.eye(2), torch.eye(2), torch.tensor([0, 5]), torch.tensor([0, 1]))


def test_structure_subset_keeps_the_texts_of_images_with_a_map():
    images, texts = _embeddings()
    encoded = EncodedSplit(image=images.float(), text=texts.float(), structure=images.float(),
                           has_structure=torch.tensor([True, False, True]), text_image=TEXT_IMAGE)
    report = split_report(encoded)
    assert report["n_structure_pairs"] == 2 and report["t2i/R@1"] == pytest.approx(50.0)
    # Images 0 and 2 with captions T0, T2, T3, T5 (image 1 and its captions dropped), scores on e0/e2 only:
    # t2s: T0 (.6 vs .1) 1, T2 (.2 vs .7) 1, T3 (.1 vs .3) 2, T5 (.4 tie .4, image 0 first) 2 -> R@1 50.
    assert report["t2s/R@1"] == pytest.approx(50.0) and report["t2s/mean_rank"] == pytest.approx(1.5)
    # s2t: map 0 column (.6 .2 .1 .4): T0 first -> 1; map 2 column (.1 .7 .3 .4): T2 first -> 1.
    assert report["s2t/R@1"] == 100.0


# ---- the epoch's caption -------------------------------------------------------------------------------------------
def test_caption_choice_is_deterministic_uniform_and_varies_by_epoch():
    draws = [caption_choice(0, epoch, "img", 5) for epoch in range(200)]
    assert draws == [caption_choice(0, epoch, "img", 5) for epoch in range(200)]  # a re-run draws the same
    assert set(draws) == set(range(5))
    counts = [draws.count(k) for k in range(5)]
    assert min(counts) >= 20  # 200 draws of 5: each ~40
    assert caption_choice(0, 3, "img", 1) == 0
    assert [caption_choice(1, e, "img", 5) for e in range(200)] != draws  # the seed matters


def _rows():
    base = {"status": "ok", "split": "train", "structure_path": None, "segments": [], "filtered_caption": None}
    return [
        {**base, "image_id": "a", "source_path": "/a.png", "caption": "a one", "hard_negatives": ["neg a1"],
         "extra_captions": [{"caption": "a two", "filtered_caption": "a 2", "hard_negatives": ["neg a2"]},
                            {"caption": "a three", "filtered_caption": None, "hard_negatives": None}]},
        {**base, "image_id": "b", "source_path": "/b.png", "caption": "b one", "hard_negatives": [],
         "extra_captions": None},
    ]


def test_records_carry_extra_captions_with_their_filtered_forms():
    from storage.layout import OutputLayout

    a, b = records_from_rows(_rows(), layout=OutputLayout("/"), split="train", top_k=0)
    assert a.caption_count == 3 and b.caption_count == 1
    assert a.caption_option(0) == ("a one", "a one", ("neg a1",))
    assert a.caption_option(1) == ("a two", "a 2", ("neg a2",))
    assert a.caption_option(2) == ("a three", "a three", ())  # no filtered form: the caption itself


class _Blank:
    output_hw = (4, 4)

    def __call__(self, image):
        return torch.zeros(3, 4, 4)

    def blank(self):
        return torch.zeros(3, 4, 4)


def test_dataset_draws_one_caption_per_image_per_epoch(tmp_path):
    from PIL import Image

    from storage.layout import OutputLayout
    from structxlip.data import StructXLIPDataset

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    rows = _rows()
    rows[0]["source_path"], rows[1]["source_path"] = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    records = records_from_rows(rows, layout=OutputLayout(tmp_path), split="train", top_k=0)
    dataset = StructXLIPDataset(records, preprocess=_Blank(), with_chunks=False, with_crops=False)
    assert dataset[0]["caption"] == "a one"  # no epoch set (evaluation): the first caption
    seen = set()
    for epoch in range(30):
        dataset.set_epoch(epoch, seed=7)
        item = dataset[0]
        expected = records[0].caption_option(caption_choice(7, epoch, "a", 3))
        assert (item["caption"], item["filtered_caption"], tuple(item["hard_negatives"])) == expected
        assert dataset[1]["caption"] == "b one"
        seen.add(item["caption"])
    assert seen == {"a one", "a two", "a three"}


# ---- evaluation end to end -----------------------------------------------------------------------------------------
def _with_extra_captions(out):
    """Give the synthetic manifest's images 1-3 captions each (the extras describe the image in other words)."""
    from storage.manifest import manifest_table, read_manifest
    from storage.parquet import parquet_parts, write_parquet_atomic

    rows = read_manifest(out).to_pylist()
    for number, row in enumerate(rows):
        words = (row["caption"] or "").split()
        row["extra_captions"] = [{"caption": " ".join(reversed(words[:6 + k])), "filtered_caption": None,
                                  "hard_negatives": None} for k in range(number % 3)] or None
    parts = parquet_parts(out / "manifest")
    write_parquet_atomic(manifest_table(rows), out / "manifest" / "all.parquet")
    for part in parts:
        part.unlink()
    return rows


def test_evaluate_with_several_captions_matches_a_slow_loop(tiny_clip_dir, tmp_path):
    from structxlip.data import load_records
    from structxlip.app.evaluate import evaluate
    from structxlip.models import load_clip
    from structxlip.app.synthetic import make_synthetic_manifest

    out = tmp_path / "data"
    make_synthetic_manifest(out, n_images=7, image_size=48, seed=5)
    _with_extra_captions(out)
    records = load_records(out, split=None, top_k=0)
    report = evaluate(out, checkpoint=tiny_clip_dir, base_model=str(tiny_clip_dir), split="all", batch_size=3,
                      device="cpu", max_text_tokens=77)
    texts = [(i, r.caption) for i, r in enumerate(records)] + [
        (i, extra[0]) for i, r in enumerate(records) for extra in r.extra_captions]
    assert report["n_pairs"] == len(records) and report["n_texts"] == len(texts) > len(records)

    loaded = load_clip(tiny_clip_dir, max_text_tokens=77)
    model = loaded.model.eval()
    from structxlip.data import ImagePreprocessor, open_rgb

    preprocess = ImagePreprocessor.from_image_processor(loaded.image_processor)
    with torch.no_grad():
        pixels = torch.stack([preprocess(open_rgb(r.image_path)) for r in records])
        image = model.get_image_features(pixel_values=pixels).pooler_output
        tokens = loaded.tokenizer([t for _, t in texts], padding="max_length", truncation=True, max_length=77,
                                  return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
    cos = torch.nn.functional.normalize(image, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
    for k in (1, 5):
        t2i = [sorted(range(len(records)), key=lambda i: (-float(cos[i, t]), i)).index(owner) < k
               for t, (owner, _) in enumerate(texts)]
        i2t = []
        for i in range(len(records)):
            order = sorted(range(len(texts)), key=lambda t: (-float(cos[i, t]), t))
            i2t.append(next(n for n, t in enumerate(order) if texts[t][0] == i) < k)
        assert report[f"t2i/R@{k}"] == pytest.approx(100.0 * sum(t2i) / len(t2i))
        assert report[f"i2t/R@{k}"] == pytest.approx(100.0 * sum(i2t) / len(i2t))


def test_training_on_several_captions_resumes_exactly(tiny_clip_dir, tmp_path):
    from storage.layout import OutputLayout
    from structxlip.checkpoint import load_checkpoint
    from structxlip.app.synthetic import make_synthetic_manifest
    from structxlip.app.train import train

    data = tmp_path / "data"
    make_synthetic_manifest(data, n_images=12, image_size=48, seed=1)
    _with_extra_captions(data)
    settings = dict(clip_model=str(tiny_clip_dir), epochs=2, batch_size=4, lr=1e-3, max_text_tokens=77,
                    progress=False, device="cpu", seed=5, logit_scale_max=2.0)
    straight = train(data, tmp_path / "a", **settings)
    assert straight.steps == 4
    train(data, tmp_path / "b", max_steps=3, **settings)
    train(data, tmp_path / "b", resume=True, **settings)
    a = load_checkpoint(OutputLayout(tmp_path / "a").checkpoint("last")).model
    b = load_checkpoint(OutputLayout(tmp_path / "b").checkpoint("last")).model
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, atol=1e-6, rtol=0, msg=name)

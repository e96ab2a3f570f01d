"""Local captions: sentence splitting, hand-computed assignments and 100*cos scores, the tiny CLIP and a tiny captioner."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.steps.captions import (
    Assignment,
    Captioner,
    ClipImageTransform,
    ClipScorer,
    assign_sentences,
    join_sentences,
    score_local_captions,
    split_sentences,
)
from pipelines.steps.filtering import load_spacy
from storage.atomic import write_jpeg, write_png
from storage.layout import OutputLayout
from storage.manifest import bbox


@pytest.fixture(scope="module")
def nlp():
    return load_spacy("en_core_web_sm")


# ---- sentences -------------------------------------------------------------------------------------------------
def test_split_sentences(nlp):
    text = "A cat sits on a mat. The cat is asleep!  A dog barks; a bird sings ; ... Is it night?"
    assert split_sentences(text, nlp) == [
        "A cat sits on a mat.",
        "The cat is asleep!",
        "A dog barks",
        "a bird sings",
        "Is it night?",
    ]
    assert split_sentences("   ", nlp) == [] and split_sentences(None, nlp) == []
    assert split_sentences("; ; .", nlp) == []


def test_join_sentences():
    assert join_sentences(["The cat is asleep.", "a bird sings"]) == "The cat is asleep. a bird sings."


# ---- assignment (pure) -----------------------------------------------------------------------------------------
def test_assign_sentences_hand_computed():
    crops = np.array([[1, 1, 0], [1, 0, 0], [0, 2, 0]], dtype=np.float32)  # full image, crop 1, crop 2 (unnormalised)
    sentences = np.array([[3, 4, 0], [1, 0, 1], [0, 2, 1]], dtype=np.float32)
    # cosines by hand: s0: full 7/(5*sqrt2)=0.98995, c1 0.6, c2 0.8; s1: full 0.5, c1 1/sqrt2, c2 0;
    # s2: full 2/sqrt10, c1 0, c2 2/sqrt5
    assert assign_sentences(crops, sentences) == [
        Assignment(0, pytest.approx(100 * 7 / (5 * math.sqrt(2)), rel=1e-6)),
        Assignment(1, pytest.approx(100 / math.sqrt(2), rel=1e-6)),
        Assignment(2, pytest.approx(100 * 2 / math.sqrt(5), rel=1e-6)),
    ]


def test_assign_sentences_ties_and_errors():
    tie = assign_sentences(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[2.0, 0.0]]))
    assert tie == [Assignment(0, pytest.approx(100.0))]
    assert assign_sentences(np.eye(2), np.zeros((0, 2))) == []
    with pytest.raises(ValueError, match=r"expected \(R, D\) and \(S, D\) embeddings"):
        assign_sentences(np.eye(3), np.eye(2))


# ---- the stage with a stub embedder ----------------------------------------------------------------------------
FULL, CROP1, CROP2, CROP3 = (200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 220)
IMAGE_VECTORS = {FULL: [1, 1, 0], CROP1: [1, 0, 0], CROP2: [0, 2, 0], CROP3: [0, 0, -1]}
TEXT_VECTORS = {
    "A cat sits on a mat.": [3, 4, 0],  # -> full image (0.98995) > crop 2 (0.8) > crop 1 (0.6)
    "The cat is asleep.": [1, 0, 1],  # -> crop 1 (0.70711)
    "A dog barks": [0, 2, 1],  # -> crop 2 (0.89443)
    "a bird sings.": [5, 0, 1],  # -> crop 1 (5/sqrt26 = 0.98058)
}


class StubScorer:
    """Embeds solid-colour images and known sentences with hand-chosen vectors; records its calls."""

    def __init__(self):
        self.image_calls, self.text_calls = [], []

    def embed_images(self, images):
        self.image_calls.append(len(images))
        out = []
        for image in images:
            mean = image.reshape(-1, 3).mean(axis=0)
            colour = min(IMAGE_VECTORS, key=lambda c: np.abs(mean - np.array(c)).sum())
            out.append(IMAGE_VECTORS[colour])
        return np.asarray(out, dtype=np.float32)

    def embed_texts(self, texts):
        self.text_calls.append(list(texts))
        return np.asarray([TEXT_VECTORS[t] for t in texts], dtype=np.float32)


def _solid(colour, size=(24, 32)):
    return np.full(size + (3,), colour, dtype=np.uint8)


BOXES = ((4, 6, 16, 16), (30, 20, 40, 34), (60, 40, 72, 52))  # x1, y1, x2, y2 of CROP1..CROP3 in image a


def _image_a() -> np.ndarray:
    """60 x 80 of FULL with one block of each crop colour at BOXES (small: the mean stays nearest FULL)."""
    image = _solid(FULL, (60, 80))
    for (x1, y1, x2, y2), colour in zip(BOXES, (CROP1, CROP2, CROP3)):
        image[y1:y2, x1:x2] = colour
    return image


@pytest.fixture
def chunk(tmp_path):
    layout = OutputLayout(tmp_path / "out")
    source = tmp_path / "images" / "a.png"
    write_png(source, _image_a())
    # No crop files: the crops are cut from the source by their bbox.
    segments = [
        {"bbox": bbox(*box), "crop_path": layout.relative(layout.crop("a" * 32, "rk", n)),
         "structure_crop_path": f"s{n}.png"}
        for n, box in enumerate(BOXES)
    ]
    write_png(tmp_path / "images" / "b.png", _solid(FULL))
    truncated = tmp_path / "images" / "c.jpg"
    write_jpeg(truncated, _image_a())
    truncated.write_bytes(truncated.read_bytes()[:400])
    records = [
        {
            "image_id": "a" * 32,
            "source_path": str(source),
            "caption": "A cat sits on a mat. The cat is asleep. A dog barks; a bird sings.",
            "caption_source": "sidecar",
            "segments": segments,
        },
        {
            "image_id": "b" * 32,
            "source_path": str(tmp_path / "images" / "b.png"),
            "caption": None,
            "caption_source": None,
            "segments": [],
        },
        {
            "image_id": "c" * 32,
            "source_path": str(truncated),
            "caption": "The cat is asleep.",
            "caption_source": "sidecar",
            "segments": [{"bbox": bbox(0, 0, 5, 5), "crop_path": "crops/c.jpg", "structure_crop_path": None}],
        },
        {
            "image_id": "d" * 32,
            "status": "failed",
            "error": "cannot decode image (d.png)",
            "source_path": "d.png",
            "caption": "x",
            "segments": [],
        },
        {
            "image_id": "e" * 32,
            "source_path": str(source),
            "caption": "The cat is asleep.",
            "caption_source": "sidecar",
            "segments": [{"bbox": None, "crop_path": "crops/missing.jpg", "structure_crop_path": None}],
        },
    ]
    return layout, records, segments


def test_score_local_captions_hand_computed(chunk, nlp):
    layout, records, segments = chunk
    scorer = StubScorer()
    a, b, c, d, e = score_local_captions(records, layout=layout, scorer=scorer, nlp=nlp)
    # One batched call each for the whole chunk: image a (full + 3 crops); images c and e failed before embedding.
    assert scorer.image_calls == [4]
    assert scorer.text_calls == [["A cat sits on a mat.", "The cat is asleep.", "A dog barks", "a bird sings."]]
    assert a["status"] == "ok" and a["caption_source"] == "sidecar" and a["caption"] == records[0]["caption"]
    assert [s["crop_path"] for s in a["segments"]] == [
        segments[0]["crop_path"],
        segments[1]["crop_path"],
    ]  # crop 3 got nothing
    first, second = a["segments"]
    assert first["caption"] == "The cat is asleep. a bird sings."
    assert first["similarity_score"] == pytest.approx(100 * 5 / math.sqrt(26), rel=1e-5)  # max of 70.71 and 98.06
    assert first["bbox"] == segments[0]["bbox"] and first["structure_crop_path"] == "s0.png"
    assert second["caption"] == "A dog barks." and second["similarity_score"] == pytest.approx(
        100 * 2 / math.sqrt(5), rel=1e-5
    )
    assert b == {
        "image_id": "b" * 32,
        "status": "ok",
        "error": None,
        "caption": None,
        "caption_source": None,
        "segments": [],
    }
    # The truncated source fails alone, in one line naming it; a segment without a bbox reads its crop file.
    assert c["status"] == "failed" and c["error"].startswith("cannot decode image: ")
    assert "truncated" in c["error"].lower() and c["error"].endswith("(c.jpg)") and "\n" not in c["error"]
    assert d["status"] == "failed" and d["error"].startswith("skipped: an earlier stage failed")
    assert e["status"] == "failed" and "missing.jpg" in e["error"] and "\n" not in e["error"]


def test_score_local_captions_without_full_image(chunk, nlp):
    layout, records, _ = chunk
    scorer = StubScorer()
    a = score_local_captions(records[:1], layout=layout, scorer=scorer, nlp=nlp, include_full_image=False)[0]
    assert scorer.image_calls == [3]
    # without the full image the first sentence goes to crop 2 (0.8 > 0.6)
    assert [(s["caption"], round(s["similarity_score"], 3)) for s in a["segments"]] == [
        ("The cat is asleep. a bird sings.", round(100 * 5 / math.sqrt(26), 3)),
        ("A cat sits on a mat. A dog barks.", round(100 * 2 / math.sqrt(5), 3)),
    ]


# ---- the real CLIP code path on a tiny random model --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_scorer(tiny_clip_dir):
    return ClipScorer(str(tiny_clip_dir), device="cpu", batch_size=3)


def test_clip_scorer_embeddings(tiny_scorer, tiny_clip_dir):
    import torch
    from transformers import AutoTokenizer, CLIPModel

    texts = ["a cat", "a dog on a red sofa", "two birds", "a long " + "very " * 200 + "long sentence"]
    embeds = tiny_scorer.embed_texts(texts)
    assert embeds.shape == (4, 32) and embeds.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, rtol=1e-5)
    # independent reference: the model called directly, one text at a time, truncated to 77 tokens
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    for text, got in zip(texts, embeds):
        ids = tokenizer(text, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            out = model.get_text_features(**ids)
        ref = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)[0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)
    images = [np.random.default_rng(k).integers(0, 256, (40 + k, 50, 3), dtype=np.uint8) for k in range(5)]
    one_by_one = np.concatenate([tiny_scorer.embed_images([im]) for im in images])
    np.testing.assert_allclose(tiny_scorer.embed_images(images), one_by_one, atol=1e-5)  # batching changes nothing


# ---- batched pixel preprocessing vs the transformers image processor ---------------------------------------------
def _real_images() -> list[np.ndarray]:
    """A real photo (matplotlib's sample data, a declared dependency) and crops of it of awkward shapes, plus noise."""
    import matplotlib.cbook
    from PIL import Image

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        photo = np.array(image.convert("RGB"))  # 600 x 512
    noise = np.random.default_rng(3).integers(0, 256, (97, 161, 3), dtype=np.uint8)
    # portrait, landscape strip (odd crop offset), 1 px short of 224, exactly 224, small (upscaled), full photo
    return [photo[100:400, 50:170], photo[:37, :301], photo[10:233, 20:243], photo[5:229, 7:231], photo[300:340,
            200:251], photo, noise]


@pytest.mark.parametrize(
    "settings",
    [
        {},  # CLIP's published 224 / bicubic / OpenAI mean and std
        {"size": {"shortest_edge": 30}, "crop_size": {"height": 32, "width": 31}, "image_mean": [0.5, 0.4, 0.3],
         "image_std": [0.2, 0.3, 0.4]},  # crop larger than the resize: black padding
        {"size": {"height": 64, "width": 48}, "crop_size": {"height": 40, "width": 40}, "resample": 2},
    ],
)
def test_clip_image_transform_matches_the_transformers_processor(settings, tmp_path):
    from transformers import AutoImageProcessor, CLIPImageProcessor

    CLIPImageProcessor(**settings).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)  # settings come from the saved config
    transform = ClipImageTransform.from_processor(processor)
    assert transform is not None
    images = _real_images()
    ours = transform(images)
    theirs = processor(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    difference = (ours - theirs).abs()
    # One uint8 rounding step is 1 / (255 * std) ~ 0.015; measured here: identical.
    assert float(difference.max()) < 0.02 and float(difference.mean()) < 1e-3


def test_clip_image_transform_hand_computed_constant_image_and_padding():
    from transformers import CLIPImageProcessor

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    transform = ClipImageTransform.from_processor(CLIPImageProcessor(
        size={"shortest_edge": 4}, crop_size={"height": 6, "width": 4}, image_mean=mean, image_std=std))
    colour = np.array([255, 51, 102], dtype=np.uint8)
    # 9 x 13 -> short side 4: 4 x int(4 * 13 / 9) = 4 x 5; crop 6 x 4 pads one black row above and below and cuts
    # the columns at floor((5 - 4) / 2) = 0.
    pixels = transform([np.broadcast_to(colour, (9, 13, 3)).copy()])
    assert pixels.shape == (1, 3, 6, 4)
    for c in range(3):
        inside = (colour[c] / 255 - mean[c]) / std[c]
        expected = np.full((6, 4), inside, dtype=np.float32)
        expected[[0, -1]] = (0 - mean[c]) / std[c]
        np.testing.assert_allclose(pixels[0, c].numpy(), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected an RGB image \(H, W, 3\) uint8, got shape \(5, 5, 4\)"):
        transform([np.zeros((5, 5, 4), dtype=np.uint8)])


def test_clip_scorer_fast_pixels_give_the_processor_embeddings(tiny_scorer, tiny_clip_dir):
    import torch
    from transformers import AutoImageProcessor, CLIPModel

    assert tiny_scorer.image_transform is not None  # the fast path is the one in use
    images = _real_images()
    got = tiny_scorer.embed_images(images)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_clip_dir)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    want = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1).numpy()
    assert (got * want).sum(axis=1).min() > 0.999


def test_clip_scorer_falls_back_to_the_processor_for_unsupported_settings(tiny_clip_dir, tmp_path):
    import json
    import shutil

    from transformers import CLIPImageProcessor

    assert ClipImageTransform.from_processor(CLIPImageProcessor(resample=1)) is None  # LANCZOS
    assert ClipImageTransform.from_processor(CLIPImageProcessor(do_center_crop=False)) is None
    model_dir = shutil.copytree(tiny_clip_dir, tmp_path / "lanczos")
    # transformers 5 keeps the image processor's settings inside processor_config.json
    config_path = model_dir / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"]["resample"] = 1
    config_path.write_text(json.dumps(config))
    scorer = ClipScorer(str(model_dir), device="cpu", batch_size=4)
    assert int(scorer.image_processor.resample) == 1 and scorer.image_transform is None
    images = _real_images()[:3]
    expected = scorer.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert np.array_equal(scorer._pixels(images).numpy(), expected.numpy())
    assert scorer.embed_images(images).shape == (3, 32)


def test_score_local_captions_with_tiny_clip(chunk, nlp, tiny_scorer):
    layout, records, segments = chunk
    a = score_local_captions(records[:1], layout=layout, scorer=tiny_scorer, nlp=nlp)[0]
    # independent reference: the crops sliced from the image array, embedded one by one, every (crop, sentence)
    # pair scored, assigned with plain loops (all are under 448 px: no thumbnail step)
    sentences = list(TEXT_VECTORS)
    image = _image_a()
    pictures = [image] + [image[y1:y2, x1:x2] for x1, y1, x2, y2 in BOXES]
    crop_vecs = [tiny_scorer.embed_images([p])[0] for p in pictures]
    text_vecs = [tiny_scorer.embed_texts([t])[0] for t in sentences]
    expected = {}
    for j, text_vec in enumerate(text_vecs):
        scores = [100 * float(np.dot(c, text_vec)) for c in crop_vecs]
        best = max(range(len(scores)), key=lambda r: (scores[r], -r))
        if best > 0:
            found, top = expected.get(best - 1, ([], -1e9))
            expected[best - 1] = (found + [sentences[j]], max(top, scores[best]))
    want = sorted(
        ((segments[k]["crop_path"], join_sentences(found), top) for k, (found, top) in expected.items()),
        key=lambda x: -x[2],
    )
    got = [(s["crop_path"], s["caption"], s["similarity_score"]) for s in a["segments"]]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], abs=1e-3)


def test_clip_scorer_bad_model_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="could not load CLIP model") as info:
        ClipScorer(str(tmp_path / "empty"), device="cpu")
    assert "\n" not in str(info.value)


# ---- generative captioner: a tiny random ViT + GPT-2 built here --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_captioner_dir(tmp_path_factory):
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from structxlip.models import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    encoder = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    )
    decoder = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=1,
            n_head=2,
            n_positions=64,
            bos_token_id=bos,
            eos_token_id=eos,
            add_cross_attention=True,
            is_decoder=True,
        )
    )
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = bos, eos, eos
    model.generation_config.decoder_start_token_id, model.generation_config.pad_token_id = bos, eos
    model.generation_config.eos_token_id = eos
    out = tmp_path_factory.mktemp("captioner") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_captioner_generates_text(tiny_captioner_dir):
    captioner = Captioner(str(tiny_captioner_dir), device="cpu", max_new_tokens=6)
    captions = captioner.caption([_solid(FULL), _solid(CROP1, (50, 20))])
    assert len(captions) == 2 and all(isinstance(c, str) and c.strip() for c in captions)
    assert captioner.caption([_solid(FULL)]) == captions[:1]  # greedy decoding is deterministic


def test_score_local_captions_generates_missing_captions(chunk, nlp, tiny_scorer, tiny_captioner_dir):
    layout, records, segments = chunk
    captioner = Captioner(str(tiny_captioner_dir), device="cpu", max_new_tokens=6)
    no_caption = {**records[0], "caption": None, "caption_source": None}
    out = score_local_captions(
        [no_caption, records[1]], layout=layout, scorer=tiny_scorer, nlp=nlp, captioner=captioner, caption_regions=True
    )
    for result in out:
        assert result["status"] == "ok" and result["caption_source"] == "generated" and result["caption"].strip()
    # with caption_regions every region ends up with a caption: its sentences or its own generated caption
    assert len(out[0]["segments"]) == len(segments)
    assert all(s["caption"].strip() and isinstance(s["similarity_score"], float) for s in out[0]["segments"])


def test_scorer_reads_the_text_length_from_the_model(tiny_clip_dir):
    from pipelines.steps.captions import ClipScorer

    assert ClipScorer(str(tiny_clip_dir), device="cpu", batch_size=8).max_text_tokens == 77


def test_clauses_cut_by_offsets_equal_spacy_sentence_spans():
    """``_clauses`` cuts sentences at character offsets; the spaCy way (one Span per sentence) must give the same."""
    import random

    import spacy

    from pipelines.steps.captions import _clauses

    def by_spans(doc):
        return [c.strip() for sent in doc.sents for c in sent.text.split(";")
                if any(ch.isalnum() for ch in c.strip())]

    rng = random.Random(7)
    words = ["a", "the", "dog", "red", "cat.", "sits;", "on", "mat!", "Dr.", "No.", "10", "etc.)", "dawn...", "Snow",
             " - ", "aside", "\n", "new", "?", "3.5", "m.", "e.g.", "  ", ";", "ok"]
    texts = ["", " ", ";", "  Two  spaces.  Here ;  too  ", "\n\nA.\n\nB.", "One. Two! Three? Four"]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    docs = list(nlp.pipe(texts))
    assert sum(len(list(d.sents)) > 1 for d in docs if len(d)) > 100  # many multi-sentence texts
    for text, doc in zip(texts, docs):
        assert _clauses(doc) == (by_spans(doc) if len(doc) else []), repr(text)

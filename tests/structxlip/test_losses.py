import math

import pytest
import torch

from structxlip.losses import (
    chunk_spans,
    chunk_window,
    chunk_word_windows,
    clip_loss,
    global_loss,
    hard_negative_loss,
    local_structure_centric_loss,
    rgb_structure_consistency_loss,
    structure_centric_loss,
)


def _ce(row, target):
    return -math.log(math.exp(row[target]) / sum(math.exp(v) for v in row))


def test_clip_loss_by_hand_2x2():
    a, b, c, d = 2.0, 0.5, -1.0, 1.5
    expected = ((_ce([a, b], 0) + _ce([c, d], 1)) / 2 + (_ce([a, c], 0) + _ce([b, d], 1)) / 2) / 2
    assert clip_loss(torch.tensor([[a, b], [c, d]], dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-7)


def test_clip_loss_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        clip_loss(torch.zeros(2, 3))


def test_global_loss_normalises_and_reaches_scale():
    images = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)  # unnormalised on purpose
    texts = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    r = 1 / math.sqrt(2)  # cos between e2 and (1, 1)
    logits = [[10.0, 10 * r], [0.0, 10 * r]]
    expected = ((_ce(logits[0], 0) + _ce(logits[1], 1)) / 2 + (_ce([10.0, 0.0], 0) + _ce([10 * r, 10 * r], 1)) / 2) / 2
    loss = global_loss(images, texts, scale)
    assert loss.item() == pytest.approx(expected, rel=1e-7)
    loss.backward()
    assert scale.grad is not None and scale.grad.item() != 0.0
    assert global_loss(images, texts, 10.0).item() == pytest.approx(expected, rel=1e-7)  # float scale too


def test_structure_centric_uses_structured_rows_and_detached_scale():
    generator = torch.Generator().manual_seed(0)
    structures = torch.randn(4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    has = torch.tensor([True, False, True, True])
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    loss = structure_centric_loss(structures, texts, has, scale)
    keep = has.nonzero().flatten()
    s = structures.detach()[keep]
    t = texts[keep]
    reference = clip_loss(7.0 * (s / s.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-7)
    loss.backward()
    assert scale.grad is None  # the temperature is not moved by this term
    assert structures.grad[1].abs().sum() == 0  # the row without structure takes no part


def test_structure_losses_are_exactly_zero_without_structure():
    structures = torch.randn(3, 4, requires_grad=True)
    texts = torch.randn(3, 4, requires_grad=True)
    images = torch.randn(3, 4, requires_grad=True)
    none = torch.zeros(3, dtype=torch.bool)
    sc = structure_centric_loss(structures, texts, none, torch.tensor(100.0))
    rs = rgb_structure_consistency_loss(images, structures, none)
    assert sc.item() == 0.0 and rs.item() == 0.0
    (sc + rs).backward()
    for tensor in (structures, texts, images):
        assert tensor.grad is not None
        assert torch.all(tensor.grad == 0)


def test_rgb_structure_consistency_by_hand():
    images = torch.tensor([[2.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    structures = torch.tensor([[0.0, 3.0], [1.0, 1.0], [-1.0, 7.0]])
    has = torch.tensor([True, True, False])
    expected = ((1 - 0.0) + (1 - 1 / math.sqrt(2))) / 2
    assert rgb_structure_consistency_loss(images, structures, has).item() == pytest.approx(expected, rel=1e-6)


def test_local_loss_by_hand_with_unit_logit_scale():
    # scale / tau = 0.07 / 0.07 = 1, so logits equal the cosines.
    chunks = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    owner = torch.tensor([0, 1])
    crops = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)  # (B=2, K=1, D=2)
    valid = torch.tensor([[True], [True]])
    loss = local_structure_centric_loss(chunks, owner, crops, valid, scale=0.07, tau=0.07)
    per_chunk = -(1.0 - math.log(math.exp(1.0) + math.exp(0.0)))
    assert loss.item() == pytest.approx(per_chunk, rel=1e-7)


def test_local_loss_caps_logit_multiplier_at_100():
    chunks = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    crops = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]], dtype=torch.float64)
    valid = torch.ones(2, 1, dtype=torch.bool)
    loss = local_structure_centric_loss(chunks, torch.tensor([0]), crops, valid, scale=100.0, tau=0.07)
    # g = min(100 / 0.07, 100) = 100; cosines 1.0 and 0.6.
    assert loss.item() == pytest.approx(math.log(1 + math.exp(100 * 0.6 - 100)), rel=1e-7)


def _local_reference(chunks, owner, crops, valid, scale, tau):
    """Slow per-sample, per-chunk loop over METHOD.md's formula."""
    g = min(scale / tau, 100.0)
    batch = crops.shape[0]
    unit = lambda x: x / (x.norm() + 1e-8)  # noqa: E731
    all_valid = [unit(crops[b, k]) for b in range(batch) for k in range(crops.shape[1]) if valid[b, k]]
    sample_losses = []
    for b in range(batch):
        own_crops = [unit(crops[b, k]) for k in range(crops.shape[1]) if valid[b, k]]
        own_chunks = [unit(chunks[c]) for c in range(chunks.shape[0]) if owner[c] == b]
        if not own_crops or not own_chunks:
            continue
        losses = []
        for chunk in own_chunks:
            own = torch.logsumexp(torch.stack([g * (chunk @ crop) for crop in own_crops]), 0)
            every = torch.logsumexp(torch.stack([g * (chunk @ crop) for crop in all_valid]), 0)
            losses.append(-(own - every))
        sample_losses.append(torch.stack(losses).mean())
    return torch.stack(sample_losses).mean() if sample_losses else torch.tensor(0.0, dtype=chunks.dtype)


@pytest.mark.parametrize("seed", range(4))
def test_local_loss_matches_loop_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, slots, dim, num_chunks = 5, 3, 6, 17
    chunks = torch.randn(num_chunks, dim, generator=generator, dtype=torch.float64)
    owner = torch.randint(0, batch - 1, (num_chunks,), generator=generator)  # last sample has no chunks
    crops = torch.randn(batch, slots, dim, generator=generator, dtype=torch.float64)
    valid = torch.rand(batch, slots, generator=generator) > 0.4
    valid[0] = False  # a sample with chunks but no valid crop
    valid[1, 0] = True
    scale = 0.5 + 3 * seed  # below and above the cap
    loss = local_structure_centric_loss(chunks, owner, crops, valid, scale=scale, tau=0.07)
    reference = _local_reference(chunks, owner, crops, valid, scale, 0.07)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-6)


def test_local_loss_ignores_invalid_crops_and_is_zero_without_crops():
    generator = torch.Generator().manual_seed(3)
    chunks = torch.randn(6, 4, generator=generator, requires_grad=True)
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    crops = torch.randn(3, 2, 4, generator=generator)
    valid = torch.tensor([[True, False], [True, True], [False, True]])
    before = local_structure_centric_loss(chunks, owner, crops, valid, scale=2.0)
    changed = crops.clone()
    changed[0, 1] = 1000.0 * torch.randn(4, generator=generator)
    changed[2, 0] = -changed[2, 1] * 50
    after = local_structure_centric_loss(chunks, owner, changed, valid, scale=2.0)
    assert after.item() == pytest.approx(before.item(), abs=1e-6)

    crops_grad = crops.clone().requires_grad_(True)
    zero = local_structure_centric_loss(chunks, owner, crops_grad, torch.zeros(3, 2, dtype=torch.bool), scale=2.0)
    assert zero.item() == 0.0
    zero.backward()
    assert torch.all(chunks.grad == 0) and torch.all(crops_grad.grad == 0)
    empty = local_structure_centric_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), crops, valid, 2.0)
    assert empty.item() == 0.0 and not torch.isnan(empty)


def test_local_loss_gradient_is_finite_with_crop_less_sample():
    chunks = torch.randn(4, 3, requires_grad=True)
    crops = torch.randn(2, 2, 3, requires_grad=True)
    valid = torch.tensor([[False, False], [True, True]])
    loss = local_structure_centric_loss(chunks, torch.tensor([0, 0, 1, 1]), crops, valid, scale=1.0)
    loss.backward()
    assert torch.isfinite(chunks.grad).all() and torch.isfinite(crops.grad).all()
    assert torch.all(chunks.grad[:2] == 0)


def test_hard_negative_loss_by_hand():
    e1, e2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    images = torch.tensor([e1, e2], dtype=torch.float64)
    texts = torch.tensor([e1, [0.0, 4.0, 0.0]], dtype=torch.float64)
    negatives = torch.tensor([[[1.0, 1.0, 0.0]], [[9.0, 9.0, 9.0]]], dtype=torch.float64)  # (B=2, N=1, D=3)
    valid = torch.tensor([[True], [False]])
    r = 1 / math.sqrt(2)
    expected = (_ce([2.0, 0.0, 2.0 * r], 0) + _ce([0.0, 2.0], 1)) / 2  # scale 2
    assert hard_negative_loss(images, texts, negatives, valid, 2.0).item() == pytest.approx(expected, rel=1e-7)
    negatives[1, 0] = torch.tensor([0.0, -3.0, 1.0], dtype=torch.float64)  # invalid slot: no effect
    assert hard_negative_loss(images, texts, negatives, valid, 2.0).item() == pytest.approx(expected, rel=1e-7)
    none = torch.zeros(2, 1, dtype=torch.bool)
    plain = (_ce([2.0, 0.0], 0) + _ce([0.0, 2.0], 1)) / 2
    assert hard_negative_loss(images, texts, negatives, none, 2.0).item() == pytest.approx(plain, rel=1e-7)


@pytest.mark.parametrize(("words", "window"), [(1, 2), (4, 2), (5, 3), (10, 3), (11, 4), (20, 4), (21, 5), (40, 5),
                                               (41, 6), (100, 6)])
def test_chunk_window_rules(words, window):
    assert chunk_window(words, base_window=3) == window


def test_chunk_word_windows_per_sentence():
    text = "one two three four five six. alpha beta; solo!"
    spans = [text[s:e] for s, e in chunk_word_windows(text)]
    # 6 words -> window 3, stride 1 -> 4 chunks; 2 words -> window 2 -> 1 chunk; 1 word < window 2 -> no chunk.
    assert spans == ["one two three", "two three four", "three four five", "four five six", "alpha beta"]
    assert [text[s:e] for s, e in chunk_word_windows(text, stride=2)][:2] == ["one two three", "three four five"]
    assert len(chunk_word_windows(text, max_spans=3)) == 3
    assert chunk_word_windows("") == [] and chunk_word_windows(" ... ,;!? ") == []


@pytest.fixture(scope="module")
def clip_tokenizer(tiny_clip_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_clip_dir)


def _span_texts(text, tokenizer, **kwargs):
    ids = tokenizer(text, truncation=True, max_length=kwargs.get("max_length") or tokenizer.model_max_length)
    return [tokenizer.decode(ids["input_ids"][s:e]).strip() for s, e in chunk_spans(text, tokenizer, **kwargs)]


def test_chunk_spans_token_indices_cover_the_chunk_words(clip_tokenizer):
    text = "A small dog runs across the field. Hippopotamuses wallow; birds sing!"
    spans = chunk_spans(text, clip_tokenizer)
    assert spans[0][0] == 1  # index 0 is <|startoftext|>
    assert _span_texts(text, clip_tokenizer) == [
        "a small dog", "small dog runs", "dog runs across", "runs across the", "across the field",  # 7 words: w=3
        "hippopotamuses wallow",  # 2 words: window 2 (one chunk, several BPE tokens)
        "birds sing",
    ]
    hippo = spans[5]
    assert hippo[1] - hippo[0] > 2  # a multi-token word is covered entirely


_WORDS = ("apple bird cat dog egg fish goat hat ink jam kite lamp moon nest owl pen queen rose sun tree umbrella "
          "van wolf box yarn zoo ant bell cake door ear fork gate hill iron jar key leaf map nut oak pig ring "
          "sock toy").split()


@pytest.mark.parametrize(("num_words", "window"), [(3, 2), (4, 2), (7, 3), (15, 4), (30, 5), (45, 6)])
def test_chunk_spans_window_follows_sentence_length(clip_tokenizer, num_words, window):
    words = _WORDS[:num_words]
    text = " ".join(words) + "."
    texts = _span_texts(text, clip_tokenizer, max_spans=1000, max_length=500)
    expected = [" ".join(words[i:i + window]) for i in range(num_words - window + 1)]
    assert texts == expected


def test_one_word_clauses_give_no_chunk():
    # METHOD.md section 4: the window slides over i = 0 .. n - w, so n < w gives nothing.
    assert chunk_word_windows("Dog.") == []
    text = "A cat sleeps on the mat; ok"
    assert [text[s:e] for s, e in chunk_word_windows(text)] == ["A cat sleeps", "cat sleeps on", "sleeps on the",
                                                                  "on the mat"]
    assert chunk_word_windows("Calm, alert.") == []
    assert [("Big dog, alert."[s:e]) for s, e in chunk_word_windows("Big dog, alert.")] == ["Big dog"]


def test_chunk_spans_short_sentence_and_max_spans(clip_tokenizer):
    assert _span_texts("Dog.", clip_tokenizer) == []
    assert _span_texts("Café déjà vu 🍕 naïve!", clip_tokenizer) == ["café déjà", "déjà vu", "vu 🍕 naïve"]
    assert len(chunk_spans("one two three four five six seven eight nine ten", clip_tokenizer, max_spans=4)) == 4


def test_chunk_spans_drop_chunks_cut_by_truncation(clip_tokenizer):
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"  # 10 words, window 3 -> 8 chunks
    assert len(chunk_spans(text, clip_tokenizer)) == 8
    # max_length 7 keeps <sot>, 5 word tokens, <eot>: only chunks inside the first 5 words survive.
    kept = chunk_spans(text, clip_tokenizer, max_length=7)
    assert kept == [(1, 4), (2, 5), (3, 6)]
    # The reference's check (end <= max_length) also keeps the chunk that ends at the last position.
    assert chunk_spans(text, clip_tokenizer, max_length=7, allow_last_position=True) == [(1, 4), (2, 5), (3, 6),
                                                                                        (4, 7)]


def test_chunk_spans_empty_and_punctuation_only(clip_tokenizer):
    assert chunk_spans("", clip_tokenizer) == []
    assert chunk_spans(" ... ,;!? ", clip_tokenizer) == []


# ---- plug-and-play modules ----------------------------------------------------------------------------------------
def test_loss_modules_by_hand():
    from structxlip.losses import GlobalLoss, RGBStructureConsistencyLoss, StructureCentricLoss

    eye = torch.eye(2, dtype=torch.float64)
    # Unit scale, orthonormal matches: every row and column is (1, 0) with target 0 -> log(1 + e^-1).
    assert GlobalLoss()(eye, 3 * eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    texts = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 5.0]], dtype=torch.float64)
    structures = torch.tensor([[2.0, 0.0], [7.0, 7.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    has = torch.tensor([True, False, True])
    loss = StructureCentricLoss()(structures, texts, scale, has)  # rows 0 and 2: eye again, logits * 2
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)))
    loss.backward()
    assert scale.grad is None  # the structure-centric term never moves the temperature
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    maps = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    assert RGBStructureConsistencyLoss()(images, maps).item() == pytest.approx(((1 - 2 ** -0.5) + 2) / 2)
    assert RGBStructureConsistencyLoss()(images, maps, torch.tensor([True, False])).item() == \
        pytest.approx(1 - 2 ** -0.5)


def test_local_loss_module_plugs_into_a_plain_transformers_clip(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    from structxlip.losses import LocalStructureCentricLoss

    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    captions = ["a dog runs across the field. it barks loudly", "two chairs; ok"]
    module = LocalStructureCentricLoss(tau=0.07)
    spans = module.chunk_spans(captions, tokenizer, max_length=77)
    assert spans[1] == [(1, 3)]  # "two chairs"; the one-word clause "ok" gives no chunk
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = clip.text_model(**tokens).last_hidden_state
        chunks = module.chunk_embeddings(clip, states, spans)
        crops = torch.randn(2, 2, clip.config.projection_dim, generator=torch.Generator().manual_seed(0))
        valid = torch.tensor([[True, True], [True, False]])
        loss = module(chunks.embeds, chunks.owner, crops, valid, clip.logit_scale.exp())

        # By hand: pool (softmax of norms), final layer norm again, projection, unit length; then the formula.
        g = min(clip.logit_scale.exp().item() / 0.07, 100.0)
        flat = [crops[b, k] / crops[b, k].norm() for b in range(2) for k in range(2) if valid[b, k]]
        owners = [b for b in range(2) for k in range(2) if valid[b, k]]
        per_sample = []
        for b, sample_spans in enumerate(spans):
            values = []
            for start, end in sample_spans:
                span = states[b, start:end]
                pooled = (torch.softmax(span.norm(dim=-1), 0)[:, None] * span).sum(0)
                chunk = clip.text_projection(clip.text_model.final_layer_norm(pooled))
                chunk = chunk / chunk.norm()
                logits = [g * float(chunk @ crop) for crop in flat]
                own = [v for v, o in zip(logits, owners) if o == b]
                values.append(math.log(sum(map(math.exp, logits))) - math.log(sum(map(math.exp, own))))
            per_sample.append(sum(values) / len(values))
    assert loss.item() == pytest.approx(sum(per_sample) / 2, rel=1e-5)

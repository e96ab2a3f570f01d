"""The training objective against hand-called losses, the loop (LR, clamp, NaN skip, export) and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from storage.layout import OutputLayout
from structxlip.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state
from structxlip.data import ImagePreprocessor, StructXLIPCollator, StructXLIPDataset, load_records
from structxlip.app.synthetic import make_synthetic_manifest
from structxlip.app.train import Objective, StructXLIPEncoder, compute_objective, make_optimizer, train

TRAIN = dict(epochs=2, batch_size=4, lr=1e-3, max_text_tokens=77, progress=False, device="cpu", seed=5,
             logit_scale_max=2.0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    # 12 images -> 8 in the train split -> 2 batches of 4 per epoch.
    return make_synthetic_manifest(tmp_path_factory.mktemp("data"), n_images=12, image_size=48, seed=1)


@pytest.fixture(scope="module")
def loaded(tiny_clip_dir):
    from structxlip.models import load_clip

    return load_clip(tiny_clip_dir, max_text_tokens=77)


@pytest.fixture(scope="module")
def straight_run(manifest, tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, train(manifest, out, clip_model=str(tiny_clip_dir), **TRAIN)


def _batch(manifest, loaded, rows):
    records = load_records(manifest, split="train")
    dataset = StructXLIPDataset(records, preprocess=ImagePreprocessor.from_image_processor(loaded.image_processor),
                                tokenizer=loaded.tokenizer, max_text_tokens=77)
    return StructXLIPCollator(loaded.tokenizer, max_text_tokens=77)([dataset[i] for i in rows])


def _hand_weight(base, epoch, floor, warm=1, start=1, end=8):
    if epoch < warm:
        return base * (epoch + 1) / warm
    if epoch < start:
        return base
    p = min(max(epoch - start, 0), end - start)
    return base * (floor + (1 - floor) * (1 + math.cos(math.pi * p / (end - start))) / 2)


def test_objective_weights_follow_the_published_schedule():
    objective = Objective(warmup_structure_epochs=2, lambda_hard_negative=0.3)
    for epoch in (0, 1, 3, 8, 12):
        weights = objective.weights(epoch)
        assert weights["global"] == (0.0 if epoch < 2 else 1.0)
        assert weights["structure_centric"] == pytest.approx(_hand_weight(0.5, epoch, 0.7))
        assert weights["consistency"] == pytest.approx(_hand_weight(0.05, epoch, 0.5))
        assert weights["local"] == pytest.approx(_hand_weight(0.1, epoch, 0.4))
        assert weights["hard_negative"] == 0.3
    assert Objective().weights(8)["local"] == pytest.approx(0.1 * 0.4)


def _normalise(x):
    return x / (x.norm(dim=-1, keepdim=True) + 1e-8)


def _hand_clip_loss(a, b, scale):
    logits = scale * _normalise(a) @ _normalise(b).T
    target = torch.arange(len(a))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def test_total_loss_equals_the_losses_computed_by_hand(manifest, loaded):
    from structxlip import losses
    from structxlip.losses import pool_chunk_embeddings

    model = loaded.model.eval()
    batch = _batch(manifest, loaded, [0, 1, 2, 3])
    batch.has_structure[2] = False  # one sample without a structure map
    epoch = 3
    weights = Objective(lambda_hard_negative=0.2).weights(epoch)
    with torch.no_grad():
        terms = compute_objective(StructXLIPEncoder(model)(batch), batch, weights=weights)

        # Independent path: transformers' own feature functions.
        image = model.get_image_features(pixel_values=batch.pixel_values).pooler_output
        structure = model.get_image_features(pixel_values=batch.structure_values).pooler_output
        text = model.get_text_features(input_ids=batch.input_ids, attention_mask=batch.attention_mask).pooler_output
        filtered_out = model.text_model(input_ids=batch.filtered_input_ids,
                                        attention_mask=batch.filtered_attention_mask)
        filtered = model.text_projection(filtered_out.pooler_output)
        scale = model.logit_scale.exp()
        keep = batch.has_structure
        expected = {
            "global": _hand_clip_loss(image, text, scale),
            "structure_centric": _hand_clip_loss(structure[keep], filtered[keep], scale),
            "consistency": (1 - (_normalise(image[keep]) * _normalise(structure[keep])).sum(-1)).mean(),
        }
        crops = torch.zeros(*batch.crop_valid.shape, image.shape[1])
        for b in range(4):
            for k in range(batch.crop_valid.shape[1]):
                if batch.crop_valid[b, k]:
                    crops[b, k] = model.get_image_features(pixel_values=batch.crop_values[b, k][None]).pooler_output[0]
        chunks = pool_chunk_embeddings(filtered_out.last_hidden_state, batch.chunk_spans,
                                       model.text_model.final_layer_norm, model.text_projection)
        expected["local"] = losses.local_structure_centric_loss(chunks.embeds, chunks.owner, crops, batch.crop_valid,
                                                                scale)
        negatives = model.get_text_features(input_ids=batch.negative_input_ids,
                                            attention_mask=batch.negative_attention_mask).pooler_output
        expected["hard_negative"] = losses.hard_negative_loss(image, text, negatives.reshape(4, -1, image.shape[1]),
                                                              batch.negative_valid, scale)
        # The reference's bug: pooling the *unfiltered* caption's states at the filtered caption's spans.
        unfiltered_states = model.text_model(input_ids=batch.input_ids,
                                             attention_mask=batch.attention_mask).last_hidden_state
        buggy = pool_chunk_embeddings(unfiltered_states, batch.chunk_spans, model.text_model.final_layer_norm,
                                      model.text_projection)
        reference_terms = compute_objective(StructXLIPEncoder(model, local_pooling="reference")(batch), batch,
                                            weights=weights)
        expected_reference_local = losses.local_structure_centric_loss(buggy.embeds, buggy.owner, crops,
                                                                       batch.crop_valid, scale)
    for name, value in expected.items():
        torch.testing.assert_close(terms.terms[name], value, atol=1e-5, rtol=1e-5, msg=name)
    total = sum(weights[name] * expected[name] for name in expected)
    torch.testing.assert_close(terms.total, total, atol=1e-5, rtol=1e-5)
    assert weights["structure_centric"] == pytest.approx(_hand_weight(0.5, 3, 0.7))
    assert not torch.allclose(chunks.embeds, buggy.embeds, atol=1e-3)
    torch.testing.assert_close(reference_terms.terms["local"], expected_reference_local, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference_terms.terms["global"], expected["global"], atol=1e-5, rtol=1e-5)


def test_padding_to_the_longest_text_changes_no_embedding_loss_or_gradient(manifest, tiny_clip_dir):
    from dataclasses import replace

    from structxlip.models import load_clip

    loaded = load_clip(tiny_clip_dir, max_text_tokens=248)  # the published 248 positions
    model = loaded.model.eval()
    records = load_records(manifest, split="train")[:4]
    # One longer caption, so the other rows still carry pad tokens after their EOS with dynamic padding.
    records[1] = replace(records[1], caption=records[1].caption + " It stands on a wooden table in a bright room.")
    dataset = StructXLIPDataset(records, preprocess=ImagePreprocessor.from_image_processor(loaded.image_processor),
                                tokenizer=loaded.tokenizer, max_text_tokens=248)
    items = [dataset[i] for i in range(4)]
    full = StructXLIPCollator(loaded.tokenizer, max_text_tokens=248)(items)
    dynamic = StructXLIPCollator(loaded.tokenizer, max_text_tokens=248, pad_to_longest=True)(items)
    texts = [r.caption for r in records] + [r.filtered_caption for r in records] + \
        [n for r in records for n in r.hard_negatives]
    longest = max(len(loaded.tokenizer(t)["input_ids"]) for t in texts)
    assert full.input_ids.shape[1] == 248 and longest < 50
    for name in ("input_ids", "attention_mask", "filtered_input_ids", "filtered_attention_mask", "negative_input_ids",
                 "negative_attention_mask"):
        cut, whole = getattr(dynamic, name), getattr(full, name)
        assert cut.shape[1] == longest, name
        assert torch.equal(cut, whole[:, :longest]), name  # only pad tokens were dropped
    assert int(full.attention_mask[:, longest:].sum()) == 0 and int(dynamic.attention_mask.sum(1).min()) < longest

    weights = Objective(lambda_hard_negative=0.2).weights(2)
    results = []
    for batch in (full, dynamic):
        model.zero_grad(set_to_none=True)
        embeddings = StructXLIPEncoder(model)(batch)
        losses = compute_objective(embeddings, batch, weights=weights)
        losses.total.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((embeddings, losses, grads))
    (a, loss_a, grad_a), (b, loss_b, grad_b) = results
    for name in ("image", "text", "structure", "filtered_text", "crops", "negatives"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=0, msg=name)
    assert a.chunks.embeds.shape[0] > 4
    torch.testing.assert_close(b.chunks.embeds, a.chunks.embeds, atol=1e-5, rtol=0)
    assert torch.equal(b.chunks.owner, a.chunks.owner)
    for name, term in loss_a.terms.items():
        torch.testing.assert_close(loss_b.terms[name], term, atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(loss_b.total, loss_a.total, atol=1e-5, rtol=0)
    assert set(grad_b) == set(grad_a) and "text_model.encoder.layers.0.self_attn.q_proj.weight" in grad_a
    for name, grad in grad_a.items():
        torch.testing.assert_close(grad_b[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_optimizer_takes_the_same_steps_as_the_for_loop_adamw():
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3))
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    fused = make_optimizer(model, lr=1e-2, weight_decay=0.05)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(3):
        ids = torch.randint(0, 50, (6,))
        for net, optimizer in ((model, fused), (reference, plain)):
            net(ids).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)
    assert not torch.allclose(model[1].weight, initial[1].weight)  # the steps did move the weights


def test_attention_key_biases_change_no_output_and_are_frozen(tiny_clip_dir):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    pixels = torch.randn(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels)
        for name, param in model.named_parameters():
            if name.endswith("self_attn.k_proj.bias"):
                param.add_(torch.randn_like(param))  # a large shift of every key bias
        after = model(input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(after.text_embeds, before.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(after.image_embeds, before.image_embeds, atol=1e-5, rtol=0)

    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.05)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.endswith("self_attn.k_proj.bias") for n in frozen)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) not in optimised for n, p in model.named_parameters() if n in frozen)


def test_first_logged_step_matches_a_hand_computed_loss_and_schedule(manifest, loaded, straight_run):
    tmp_path, result = straight_run
    # Epoch 0's order: randperm seeded seed + epoch, first 4 samples.
    first = torch.randperm(8, generator=torch.Generator().manual_seed(5))[:4].tolist()
    batch = _batch(manifest, loaded, first)
    model = loaded.model.train()
    with torch.no_grad():
        expected = compute_objective(StructXLIPEncoder(model)(batch), batch, weights=Objective().weights(0))
    lines = [json.loads(line) for line in OutputLayout(tmp_path).train_metrics.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[0]["loss"] == pytest.approx(float(expected.total), rel=1e-5)
    assert lines[0]["loss/global"] == pytest.approx(float(expected.terms["global"]), rel=1e-5)
    # Per-step cosine LR from 1e-3 to 0 over 4 steps.
    assert [line["lr"] for line in lines] == pytest.approx([1e-3 * (1 + math.cos(math.pi * s / 4)) / 2
                                                            for s in range(4)])
    assert lines[2]["weight/local"] == pytest.approx(_hand_weight(0.1, 1, 0.4))
    # logit_scale starts at ln(1/0.07) = 2.659 and is clamped to [0, 2.0] after every step.
    assert lines[0]["logit_scale"] == pytest.approx(2.0)
    assert all(0.0 <= line["logit_scale"] <= 2.0 for line in lines)
    assert result.steps == 4 and result.epochs_completed == 2 and result.skipped_steps == 0

    from transformers import CLIPModel

    exported = CLIPModel.from_pretrained(result.model_dir)
    final = load_checkpoint(OutputLayout(tmp_path).checkpoint("last")).model
    assert exported.text_model.embeddings.position_embedding.num_embeddings == 77
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, final[name], msg=name)
    assert (result.model_dir / "tokenizer_config.json").is_file()
    assert (OutputLayout(tmp_path).checkpoint("epoch-0001")).is_file()


def test_resume_mid_epoch_gives_the_same_weights_as_a_straight_run(manifest, tmp_path, tiny_clip_dir, straight_run):
    stopped = train(manifest, tmp_path / "b", clip_model=str(tiny_clip_dir), max_steps=3, **TRAIN)
    assert stopped.model_dir is None and stopped.steps == 3 and stopped.epochs_completed == 1
    state = load_checkpoint(OutputLayout(tmp_path / "b").checkpoint("last"))
    assert (state.epoch, state.batch_in_epoch, state.step) == (1, 1, 3)
    resumed = train(manifest, tmp_path / "b", clip_model=str(tiny_clip_dir), resume=True, **TRAIN)
    assert resumed.steps == 4
    a = load_checkpoint(OutputLayout(straight_run[0]).checkpoint("last"))
    b = load_checkpoint(OutputLayout(tmp_path / "b").checkpoint("last"))
    for name, tensor in a.model.items():
        torch.testing.assert_close(b.model[name], tensor, atol=1e-6, rtol=0, msg=name)
    steps = [json.loads(line)["step"] for line in OutputLayout(tmp_path / "b").train_metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot resume .*batch_size 4 -> 2"):
        train(manifest, tmp_path / "b", clip_model=str(tiny_clip_dir), resume=True, **{**TRAIN, "batch_size": 2})


def test_non_finite_loss_skips_the_optimizer_step(manifest, tmp_path, tiny_clip_dir, monkeypatch):
    import structxlip.app.train as train_module

    real = train_module.global_loss
    calls = []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) == 1 else value

    monkeypatch.setattr(train_module, "global_loss", sometimes_nan)
    result = train(manifest, tmp_path, clip_model=str(tiny_clip_dir), **{**TRAIN, "epochs": 1}, max_steps=1)
    assert result.skipped_steps == 1
    from structxlip.models import load_clip

    untouched = load_clip(tiny_clip_dir, max_text_tokens=77).model.state_dict()
    saved = load_checkpoint(OutputLayout(tmp_path).checkpoint("last"))
    assert saved.skipped_steps == 1
    for name, tensor in untouched.items():
        torch.testing.assert_close(saved.model[name], tensor, msg=name)
    line = json.loads(OutputLayout(tmp_path).train_metrics.read_text().splitlines()[0])
    assert line["skipped_steps"] == 1 and math.isnan(line["loss"])


def test_checkpoints_load_only_with_the_safe_loader(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "corrupt.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a StructXLIP training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    # An arbitrary pickled object must be refused, never executed.
    torch.save({"format": "structxlip-train-checkpoint", "payload": Exploit(tmp_path / "pwned")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="safe loader.*Unsupported global"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


class Exploit:
    """Unpickling this calls open(path, "w"): only an unsafe loader would create the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_rng_states_round_trip_through_plain_types():
    import random

    import numpy as np

    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


@pytest.mark.parametrize(("drop_last", "steps"), [(True, 2), (False, 3)])
def test_drop_last_drops_the_partial_batch_like_the_reference(manifest, tmp_path, tiny_clip_dir, drop_last, steps):
    # 8 train records, batch 3: the reference's DataLoader(drop_last=True) gives 8 // 3 = 2 steps per epoch.
    result = train(manifest, tmp_path, clip_model=str(tiny_clip_dir), **{**TRAIN, "epochs": 1, "batch_size": 3},
                   drop_last=drop_last)
    assert result.steps == steps
    lines = [json.loads(line) for line in OutputLayout(tmp_path).train_metrics.read_text().splitlines()]
    # The per-step cosine LR runs over exactly those steps.
    assert [line["lr"] for line in lines] == pytest.approx([1e-3 * (1 + math.cos(math.pi * s / steps)) / 2
                                                            for s in range(steps)])

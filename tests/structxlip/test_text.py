import pytest
import torch
from torch import nn

from structxlip.losses import chunk_spans, pool_chunk_embeddings
from structxlip.text import (
    extend_position_embeddings,
    stretch_positions,
    text_position_count,
)


def _reference_row(old, i, keep=20):
    """Long-CLIP's per-position formula, one row at a time."""
    positions = old.shape[0]
    if i < keep:
        return old[i]
    pair, offset = divmod(i - keep, 4)
    if keep + pair + 1 < positions:
        a, b = old[keep + pair], old[keep + pair + 1]
        return a * (4 - offset) / 4 + b * offset / 4
    step = i - (keep + 4 * (positions - keep - 1))
    return old[-1] + step * (old[-1] - old[-2]) / 4


@pytest.fixture
def tiny_model(tiny_clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_dir).eval()


def test_extend_matches_per_position_reference(tiny_model):
    old = tiny_model.text_model.embeddings.position_embedding.weight.detach().clone()
    assert old.shape[0] == 77
    extend_position_embeddings(tiny_model, 248, keep=20)
    new = tiny_model.text_model.embeddings.position_embedding.weight.detach()
    assert new.shape == (248, old.shape[1])
    for i in range(248):
        torch.testing.assert_close(new[i], _reference_row(old, i), rtol=1e-6, atol=1e-6)
    assert torch.equal(new[:20], old[:20])
    assert torch.equal(new[20], old[20]) and torch.equal(new[24], old[21]) and torch.equal(new[244], old[76])
    torch.testing.assert_close(new[22], (old[20] + old[21]) / 2)
    torch.testing.assert_close(new[247], old[76] + 3 * (old[76] - old[75]) / 4)


def test_extend_updates_buffer_config_and_forward(tiny_model, tmp_path):
    from transformers import CLIPModel

    extend_position_embeddings(tiny_model, 248)
    embeddings = tiny_model.text_model.embeddings
    assert embeddings.position_ids.tolist() == [list(range(248))]
    assert "text_model.embeddings.position_ids" not in tiny_model.state_dict()  # stays non-persistent
    assert tiny_model.config.text_config.max_position_embeddings == 248
    assert tiny_model.text_model.config.max_position_embeddings == 248
    assert embeddings.position_embedding.weight.requires_grad
    ids = torch.randint(0, 49406, (2, 248))
    with torch.no_grad():
        out = tiny_model.get_text_features(input_ids=ids)
    assert out.pooler_output.shape == (2, 32)
    tiny_model.save_pretrained(tmp_path / "long")
    reloaded = CLIPModel.from_pretrained(tmp_path / "long")
    assert text_position_count(reloaded) == 248
    assert torch.equal(reloaded.text_model.embeddings.position_embedding.weight, embeddings.position_embedding.weight)


def test_extend_is_noop_when_long_enough_and_works_on_text_model(tiny_clip_dir, tiny_model):
    from transformers import CLIPTextModel

    before = tiny_model.text_model.embeddings.position_embedding
    extend_position_embeddings(tiny_model, 77)
    assert tiny_model.text_model.embeddings.position_embedding is before
    text_model = CLIPTextModel.from_pretrained(tiny_clip_dir)
    extend_position_embeddings(text_model, 100, keep=20)
    assert text_position_count(text_model) == 100 and text_model.config.max_position_embeddings == 100


def test_stretch_extrapolates_and_truncates():
    table = torch.arange(6, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 10.0]])  # rows i*(1, 10)
    stretched = stretch_positions(table, max_tokens=30, keep=2)
    # keep 2 rows, 3 pairs * 4 = 12 interpolated rows, then 5 + k/4 for k = 0..15.
    assert stretched[:, 0].tolist() == [0, 1] + [2 + k / 4 for k in range(12)] + [5 + k / 4 for k in range(16)]
    assert stretch_positions(table, max_tokens=5, keep=2)[:, 0].tolist() == [0, 1, 2, 2.25, 2.5]


def _pool_reference(states, spans, layer_norm, projection):
    rows = []
    for b, sample in enumerate(spans):
        for start, end in sample:
            tokens = states[b, start:end]
            weights = torch.softmax(tokens.detach().norm(dim=-1), dim=0)
            pooled = (weights[:, None] * tokens).sum(dim=0)
            out = projection(layer_norm(pooled))
            rows.append(out / (out.norm() + 1e-8))
    return torch.stack(rows)


def test_pool_matches_loop_reference_and_gradients():
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(3, 12, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    layer_norm = nn.LayerNorm(8).double()
    projection = nn.Linear(8, 5, bias=False).double()
    spans = [[(1, 4), (2, 3), (5, 12)], [], [(0, 12), (7, 9)]]
    result = pool_chunk_embeddings(states, spans, layer_norm, projection)
    assert result.owner.tolist() == [0, 0, 0, 2, 2]
    reference = _pool_reference(states, spans, layer_norm, projection)
    torch.testing.assert_close(result.embeds, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.embeds.norm(dim=1), torch.ones(5, dtype=torch.float64))
    weights = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad((result.embeds * weights).sum(), states)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), states)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-9, atol=1e-10)
    assert torch.all(grad[1] == 0)  # the sample without chunks gets no gradient


def test_pool_edge_cases():
    states = torch.randn(2, 5, 4)
    empty = pool_chunk_embeddings(states, [[], []], nn.LayerNorm(4), nn.Linear(4, 3))
    assert empty.embeds.shape == (0, 3) and empty.owner.shape == (0,)
    with pytest.raises(ValueError, match="outside"):
        pool_chunk_embeddings(states, [[(3, 3)], []], nn.LayerNorm(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="outside"):
        pool_chunk_embeddings(states, [[(0, 6)], []], nn.LayerNorm(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="spans for 2 samples"):
        pool_chunk_embeddings(states, [[]], nn.LayerNorm(4), nn.Linear(4, 3))


def test_pool_on_tiny_clip_with_real_spans(tiny_model, tiny_clip_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    texts = ["a small dog runs across the wide green field. it barks", "two birds"]
    spans = [chunk_spans(text, tokenizer) for text in texts]
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    text_model = tiny_model.text_model
    out = text_model(**batch, output_hidden_states=True)
    # hidden_states[-1] is the encoder output before the final layer norm; last_hidden_state is after it.
    torch.testing.assert_close(text_model.final_layer_norm(out.hidden_states[-1]), out.last_hidden_state)
    chunks = pool_chunk_embeddings(out.last_hidden_state, spans, text_model.final_layer_norm,
                                   tiny_model.text_projection)
    assert chunks.embeds.shape == (sum(map(len, spans)), 32)
    assert chunks.owner.tolist() == [0] * len(spans[0]) + [1] * len(spans[1])
    # A chunk covering the whole text (all real tokens) of "two birds" = its single span.
    assert spans[1] == [(1, 3)]

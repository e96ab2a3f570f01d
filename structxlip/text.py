"""Text-side model surgery and pooling: Long-CLIP position stretching and chunk embeddings (METHOD.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from structxlip.losses import normalize

# Bump when this module's results change: it enters the cache key of every stage that imports it.
VERSION = "1"


def _text_model(model: nn.Module) -> nn.Module:
    """The ``CLIPTextModel`` inside a ``CLIPModel`` (or the model itself)."""
    text_model = getattr(model, "text_model", model)
    if not hasattr(getattr(text_model, "embeddings", None), "position_embedding"):
        raise TypeError(f"expected a transformers CLIPModel or CLIPTextModel, got {type(model).__name__}")
    return text_model


def text_position_count(model: nn.Module) -> int:
    """Return how many text positions the model's position embedding has."""
    return _text_model(model).embeddings.position_embedding.num_embeddings


def stretch_positions(weight: Tensor, max_tokens: int = 248, keep: int = 20) -> Tensor:
    """Return the Long-CLIP stretch ``(max_tokens, D)`` of a ``(P, D)`` position table (computed in float32).

    Rows ``[0, keep)`` are copied; each later pair (a, b) becomes a, (3a+b)/4, (a+b)/2, (a+3b)/4; past the last row
    z the table continues z + k*(z - y)/4 for k = 0, 1, 2, ... (y = the row before z); the result is cut to
    ``max_tokens``. For P = 77, keep = 20 this gives exactly 4*77 - 3*20 = 248 rows, as in Long-CLIP and the
    StructXLIP reference. (For targets beyond 4P - 3*keep the reference leaves rows 4P - 3*keep onwards at zero; this
    keeps extrapolating, as METHOD.md section 4 states.)
    """
    positions, dim = weight.shape
    keep = max(0, min(keep, positions))
    table = weight.detach().float()
    head = table[:keep]
    rest = table[keep:]
    pieces = [head]
    if rest.shape[0] >= 2:
        a, b = rest[:-1], rest[1:]
        pieces.append(torch.stack([a, (3 * a + b) / 4, (a + b) / 2, (a + 3 * b) / 4], dim=1).reshape(-1, dim))
    produced = sum(piece.shape[0] for piece in pieces)
    tail_rows = max(max_tokens - produced, 0)
    if tail_rows:
        last = table[-1]
        step = (table[-1] - table[-2]) / 4 if positions >= 2 else torch.zeros_like(last)
        k = torch.arange(tail_rows, dtype=table.dtype, device=table.device)[:, None]
        pieces.append(last[None, :] + k * step[None, :])
    return torch.cat(pieces)[:max_tokens]


def extend_position_embeddings(model: nn.Module, max_tokens: int = 248, keep: int = 20) -> nn.Module:
    """Stretch the text position embedding of a CLIPModel / CLIPTextModel in place to ``max_tokens``; return it.

    No-op when the model already has at least ``max_tokens`` positions. Replaces the ``nn.Embedding`` (same dtype,
    device and ``requires_grad``), the ``position_ids`` buffer and ``max_position_embeddings`` in the configs.
    """
    text_model = _text_model(model)
    embeddings = text_model.embeddings
    old = embeddings.position_embedding
    if old.num_embeddings >= max_tokens:
        return model
    table = stretch_positions(old.weight, max_tokens, keep)
    new = nn.Embedding(max_tokens, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(table.to(old.weight.dtype))
    new.weight.requires_grad_(old.weight.requires_grad)
    embeddings.position_embedding = new
    # Assigning to a registered buffer keeps it registered (and non-persistent, as transformers declares it).
    embeddings.position_ids = torch.arange(max_tokens, device=old.weight.device).expand((1, -1))
    configs = [getattr(text_model, "config", None)]
    outer = getattr(model, "config", None)
    configs.append(getattr(outer, "text_config", outer))
    for config in configs:
        if config is not None and hasattr(config, "max_position_embeddings"):
            config.max_position_embeddings = max_tokens
    return model


@dataclass
class ChunkEmbeddings:
    """Chunk embeddings ``embeds`` (C, E), L2-normalised, and the batch row each belongs to, ``owner`` (C,) long."""

    embeds: Tensor
    owner: Tensor


def pool_chunk_embeddings(token_states: Tensor, spans: Sequence[Sequence[tuple[int, int]]],
                          final_layer_norm: nn.Module, text_projection: nn.Module) -> ChunkEmbeddings:
    """Return one embedding per token span: norm-softmax-weighted mean of the span's token states, then the final
    layer norm, the text projection and L2 normalisation.

    ``token_states`` (B, L, D) are the text model's ``last_hidden_state``, i.e. *after* the final layer norm, which
    is then applied a second time to the pooled vector (the reference trainer's convention, METHOD.md section 4:
    released checkpoints were trained with it). ``spans[b]`` lists ``(start, end)`` token indices (end exclusive) of
    sample b. The weights are ``softmax(||h_t||)`` over the span, computed without gradient.
    """
    batch, length, _ = token_states.shape
    if len(spans) != batch:
        raise ValueError(f"expected spans for {batch} samples, got {len(spans)}")
    owners, starts, ends = [], [], []
    for row, sample_spans in enumerate(spans):
        for start, end in sample_spans:
            if not 0 <= start < end <= length:
                raise ValueError(f"span ({start}, {end}) of sample {row} is empty or outside [0, {length})")
            owners.append(row)
            starts.append(start)
            ends.append(end)
    device = token_states.device
    owner = torch.tensor(owners, dtype=torch.long, device=device)
    if not owners:
        out_dim = getattr(text_projection, "out_features", token_states.shape[-1])
        return ChunkEmbeddings(token_states.new_zeros(0, out_dim), owner)
    start = torch.tensor(starts, device=device)[:, None]
    end = torch.tensor(ends, device=device)[:, None]
    positions = torch.arange(length, device=device)[None, :]
    in_span = (positions >= start) & (positions < end)  # (C, L)

    with torch.no_grad():
        # At least float32 for the softmax (bf16 norms would round the weights), float64 stays float64.
        work_dtype = torch.promote_types(token_states.dtype, torch.float32)
        norms = token_states.detach().to(work_dtype).norm(dim=-1)  # (B, L)
        scores = norms[owner].masked_fill(~in_span, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (C, L), zero outside the span
        # Scatter each chunk's weights into its own sample's block so one matmul pools every chunk.
        full = torch.zeros(owner.shape[0], batch, length, device=device, dtype=token_states.dtype)
        full[torch.arange(owner.shape[0], device=device), owner] = weights.to(token_states.dtype)
    pooled = full.reshape(owner.shape[0], batch * length) @ token_states.reshape(batch * length, -1)  # (C, D)
    return ChunkEmbeddings(normalize(text_projection(final_layer_norm(pooled))), owner)

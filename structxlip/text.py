"""Text-side model surgery: Long-CLIP position stretching (METHOD.md section 4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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

"""Per-query text-to-image rankings for the retrieval explorer: each caption's top-k images and the rank of its own
image, for one or more models (zero-shot and fine-tuned side by side), written to ``OUT/eval/rankings.json``.

The ranks follow :func:`structxlip.metrics.match_ranks` exactly (ties broken by lower gallery index), so a query
with rank 1 here is a t2i R@1 hit in ``eval/metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from structxlip.losses import normalize
from structxlip.metrics import match_ranks

DEFAULT_TOP_K = 10
VERSION = "1"


@dataclass
class QueryRankings:
    """``ranks (Q,) long`` (1-based rank of gallery item i for query i), ``top_indices (Q, k) long`` and
    ``top_scores (Q, k) float32`` (cosine similarities, best first)."""

    ranks: Tensor
    top_indices: Tensor
    top_scores: Tensor


def rank_queries(query_embeds: Tensor, gallery_embeds: Tensor, *, top_k: int = DEFAULT_TOP_K,
                 chunk_size: int = 1024) -> QueryRankings:
    """Return each query's top-``top_k`` gallery items by cosine similarity (a stable descending sort, so equal scores
    keep gallery order) and the rank of its paired item, for paired ``(N, D)`` embeddings."""
    ranks = match_ranks(query_embeds, gallery_embeds, chunk_size=chunk_size)
    queries = normalize(query_embeds.float())
    gallery = normalize(gallery_embeds.float())
    k = min(top_k, gallery.shape[0])
    indices, scores = [], []
    for start in range(0, queries.shape[0], chunk_size):
        block = queries[start:start + chunk_size] @ gallery.T
        values, order = torch.sort(block, dim=1, descending=True, stable=True)
        indices.append(order[:, :k])
        scores.append(values[:, :k])
    if not indices:
        return QueryRankings(ranks, torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
    return QueryRankings(ranks, torch.cat(indices), torch.cat(scores))


def rankings_entry(rankings: QueryRankings, *, checkpoint: str) -> dict:
    """Return one model's JSON entry: ``checkpoint``, ``ranks``, ``top`` (gallery indices) and ``scores`` (cos)."""
    return {
        "checkpoint": checkpoint,
        "ranks": [int(r) for r in rankings.ranks],
        "top": rankings.top_indices.tolist(),
        "scores": [[round(float(s), 4) for s in row] for row in rankings.top_scores],
    }


def rankings_document(image_ids: list[str], models: dict[str, dict], *, split: str, top_k: int) -> dict:
    """Return the ``rankings.json`` document: the split's image ids (query i's own image is ``image_ids[i]``) and
    one :func:`rankings_entry` per model name. Use it with embeddings you already have (e.g. evaluate's)."""
    return {"version": VERSION, "split": split, "top_k": min(top_k, len(image_ids)), "query": "caption",
            "image_ids": list(image_ids), "models": dict(models)}

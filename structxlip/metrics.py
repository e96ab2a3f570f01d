"""Paired retrieval metrics (METHOD.md section 5): Recall@K, mean and median rank by cosine similarity."""

from __future__ import annotations

import torch
from torch import Tensor

from structxlip.losses import normalize

RECALL_KS = (1, 5, 10, 25, 50)


def match_ranks(query_embeds: Tensor, gallery_embeds: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Return the 1-based rank ``(Q,) long`` of gallery row i for query row i by cosine similarity.

    rank = 1 + number of gallery items scoring strictly higher than the match + number of *earlier* gallery items
    (lower index) scoring exactly the same: ties are broken by index, as a stable descending sort would, so a
    degenerate model whose embeddings are all equal gets R@1 = 1/N rather than 100%. Computed in float32,
    ``chunk_size`` queries at a time, so memory stays at ``chunk_size x G``.
    """
    if query_embeds.ndim != 2 or gallery_embeds.ndim != 2 or query_embeds.shape != gallery_embeds.shape:
        raise ValueError(f"expected paired embeddings (N, D) and (N, D), got {tuple(query_embeds.shape)} and "
                         f"{tuple(gallery_embeds.shape)}")
    queries = normalize(query_embeds.float())
    gallery = normalize(gallery_embeds.float().to(queries.device))
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        block = queries[start:start + chunk_size] @ gallery.T  # (q, G)
        rows = torch.arange(block.shape[0], device=block.device)
        matched = block[rows, rows + start]
        columns = torch.arange(block.shape[1], device=block.device)
        earlier_tie = (block == matched[:, None]) & (columns[None, :] < (rows + start)[:, None])
        ranks.append((block > matched[:, None]).sum(dim=1) + earlier_tie.sum(dim=1) + 1)
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def retrieval_metrics(query_embeds: Tensor, gallery_embeds: Tensor, *, chunk_size: int = 1024) -> dict[str, float]:
    """Return ``{"R@1", "R@5", "R@10", "R@25", "R@50"}`` (percent of queries whose match ranks within K) plus
    ``mean_rank`` and ``median_rank`` (1-based) for paired ``(N, D)`` query and gallery embeddings."""
    ranks = match_ranks(query_embeds, gallery_embeds, chunk_size=chunk_size).double()
    if ranks.numel() == 0:
        raise ValueError("retrieval metrics need at least one query/gallery pair")
    metrics = {f"R@{k}": float((ranks <= k).double().mean() * 100.0) for k in RECALL_KS}
    metrics["mean_rank"] = float(ranks.mean())
    # The conventional median of an even count (mean of the two middle ranks), not torch's lower median.
    metrics["median_rank"] = float(ranks.quantile(0.5))
    return metrics


def retrieval_report(image_embeds: Tensor, text_embeds: Tensor, structure_embeds: Tensor | None = None,
                     *, chunk_size: int = 1024) -> dict[str, float]:
    """Return a flat metric dict with ``t2i/``, ``i2t/`` keys and, given ``structure_embeds``, ``s2t/``, ``t2s/`` and
    ``ts2i/`` (composed query normalise(normalise(text) + normalise(structure)) against the images)."""
    report: dict[str, float] = {}

    def add(prefix: str, queries: Tensor, gallery: Tensor) -> None:
        for name, value in retrieval_metrics(queries, gallery, chunk_size=chunk_size).items():
            report[f"{prefix}/{name}"] = value

    add("t2i", text_embeds, image_embeds)
    add("i2t", image_embeds, text_embeds)
    if structure_embeds is not None:
        add("s2t", structure_embeds, text_embeds)
        add("t2s", text_embeds, structure_embeds)
        composed = normalize(normalize(text_embeds.float()) + normalize(structure_embeds.float()))
        add("ts2i", composed, image_embeds)
    return report

"""Retrieval metrics (METHOD.md section 5): Recall@K, mean and median rank by cosine similarity, for paired data
and for several captions per image (the standard COCO/Flickr30k protocol)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structxlip.losses import normalize

# Bump when this module's results change: it enters the cache key of every stage that imports it.
VERSION = "1"

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


def group_match_ranks(query_embeds: Tensor, gallery_embeds: Tensor, query_groups: Tensor, gallery_groups: Tensor,
                      *, chunk_size: int = 1024) -> Tensor:
    """Return the 1-based rank ``(Q,) long`` of the best-ranked match of each query, where gallery item g matches
    query q when ``gallery_groups[g] == query_groups[q]`` (the image a caption belongs to).

    The standard multi-caption protocol: text->image (each caption's image, groups = its image index / arange) and
    image->text (a hit if ANY of the image's captions ranks within K: the rank of the best one). Ties are broken by
    index as in :func:`match_ranks`: the best match is the highest-scoring one with the lowest index, and its rank is
    1 + gallery items scoring strictly higher + earlier items scoring the same. With one-to-one groups (both
    ``arange(N)``) this equals ``match_ranks``. Every query must have at least one match.
    """
    if query_embeds.ndim != 2 or gallery_embeds.ndim != 2 or query_embeds.shape[1] != gallery_embeds.shape[1]:
        raise ValueError(f"expected embeddings (Q, D) and (G, D), got {tuple(query_embeds.shape)} and "
                         f"{tuple(gallery_embeds.shape)}")
    if query_groups.shape != (query_embeds.shape[0],) or gallery_groups.shape != (gallery_embeds.shape[0],):
        raise ValueError("expected one group per query and per gallery item")
    queries = normalize(query_embeds.float())
    gallery = normalize(gallery_embeds.float().to(queries.device))
    query_groups, gallery_groups = query_groups.to(queries.device), gallery_groups.to(queries.device)
    columns = torch.arange(gallery.shape[0], device=queries.device)
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        block = queries[start:start + chunk_size] @ gallery.T  # (q, G)
        positive = gallery_groups[None, :] == query_groups[start:start + chunk_size, None]
        if not bool(positive.any(dim=1).all()):
            raise ValueError("every query needs at least one matching gallery item")
        best = block.masked_fill(~positive, -math.inf).max(dim=1).values  # the best match's score
        first = torch.where(positive & (block == best[:, None]), columns[None, :], gallery.shape[0]).min(dim=1).values
        earlier_tie = (block == best[:, None]) & (columns[None, :] < first[:, None])
        ranks.append((block > best[:, None]).sum(dim=1) + earlier_tie.sum(dim=1) + 1)
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_summary(ranks: Tensor) -> dict[str, float]:
    """Return R@K (percent of ranks <= K), ``mean_rank`` and ``median_rank`` of 1-based ``ranks``."""
    ranks = ranks.double()
    if ranks.numel() == 0:
        raise ValueError("retrieval metrics need at least one query/gallery pair")
    metrics = {f"R@{k}": float((ranks <= k).double().mean() * 100.0) for k in RECALL_KS}
    metrics["mean_rank"] = float(ranks.mean())
    # The conventional median of an even count (mean of the two middle ranks), not torch's lower median.
    metrics["median_rank"] = float(ranks.quantile(0.5))
    return metrics


def retrieval_metrics(query_embeds: Tensor, gallery_embeds: Tensor, *, chunk_size: int = 1024) -> dict[str, float]:
    """Return ``{"R@1", "R@5", "R@10", "R@25", "R@50"}`` (percent of queries whose match ranks within K) plus
    ``mean_rank`` and ``median_rank`` (1-based) for paired ``(N, D)`` query and gallery embeddings."""
    return recall_summary(match_ranks(query_embeds, gallery_embeds, chunk_size=chunk_size))


def retrieval_report(image_embeds: Tensor, text_embeds: Tensor, structure_embeds: Tensor | None = None,
                     *, text_image: Tensor | None = None, chunk_size: int = 1024) -> dict[str, float]:
    """Return a flat metric dict with ``t2i/``, ``i2t/`` keys and, given ``structure_embeds``, ``s2t/``, ``t2s/`` and
    ``ts2i/`` (composed query normalise(normalise(text) + normalise(structure)) against the images).

    ``text_image`` ``(T,) long``: the image (row of ``image_embeds``) each text describes, for several captions per
    image (the standard protocol, :func:`group_match_ranks`): text queries (t2i, t2s, ts2i) match their image; image
    and structure queries (i2t, s2t) hit when any of the image's captions ranks within K. Without it, texts and
    images are paired 1:1 (row i with row i), and the two coincide.
    """
    report: dict[str, float] = {}
    images = image_embeds.shape[0]
    image_groups = torch.arange(images)
    text_groups = image_groups if text_image is None else text_image.long().cpu()
    if text_image is None and text_embeds.shape[0] != images:
        raise ValueError(f"expected paired embeddings, got {images} images and {text_embeds.shape[0]} texts")

    def add(prefix: str, queries: Tensor, gallery: Tensor, query_groups: Tensor, gallery_groups: Tensor) -> None:
        if text_image is None:
            values = retrieval_metrics(queries, gallery, chunk_size=chunk_size)
        else:
            values = recall_summary(group_match_ranks(queries, gallery, query_groups, gallery_groups,
                                                      chunk_size=chunk_size))
        for name, value in values.items():
            report[f"{prefix}/{name}"] = value

    add("t2i", text_embeds, image_embeds, text_groups, image_groups)
    add("i2t", image_embeds, text_embeds, image_groups, text_groups)
    if structure_embeds is not None:
        add("s2t", structure_embeds, text_embeds, image_groups, text_groups)
        add("t2s", text_embeds, structure_embeds, text_groups, image_groups)
        composed = normalize(normalize(text_embeds.float()) + normalize(structure_embeds.float()[text_groups]))
        add("ts2i", composed, image_embeds, text_groups, image_groups)
    return report

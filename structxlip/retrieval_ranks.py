"""Per-query text-to-image rankings for the retrieval explorer: each caption's top-k images and the rank of its own
image, for one or more models (zero-shot and fine-tuned side by side), written to ``OUT/eval/rankings.json``.

The ranks follow :func:`structxlip.metrics.match_ranks` exactly (ties broken by lower gallery index), so a query
with rank 1 here is a t2i R@1 hit in ``eval/metrics.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from storage.atomic import atomic_write_text
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


def compute_rankings(
    manifest: str | os.PathLike,
    *,
    models: dict[str, str | os.PathLike],
    base_model: str,
    out_path: str | os.PathLike | None = None,
    split: str = "test",
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    max_text_tokens: int = 248,
    keep_positions: int = 20,
    structure_kind: str = "canny",
    num_workers: int = 0,
) -> dict:
    """Return (and write atomically to ``out_path`` when given) the text-to-image rankings of every model in
    ``models`` (display name -> checkpoint, as :func:`structxlip.evaluate.load_model_for_eval` takes) on the same
    split, queries being the images' raw captions, as evaluate's t2i direction uses them."""
    from structxlip.data import load_records
    from structxlip.evaluate import encode_records, load_model_for_eval

    if not models:
        raise ValueError("expected at least one model to rank with, got none")
    records = load_records(manifest, split=None if split == "all" else split, structure_kind=structure_kind, top_k=0)
    if len(records) < 2:
        raise ValueError(f"{manifest}: rankings need at least 2 pairs in split {split!r}, found {len(records)}")
    entries = {}
    for name, checkpoint in models.items():
        loaded = load_model_for_eval(checkpoint, base_model=base_model, max_text_tokens=max_text_tokens,
                                     keep_positions=keep_positions)
        encoded = encode_records(loaded, records, batch_size=batch_size, device=device, precision=precision,
                                 max_text_tokens=max_text_tokens, num_workers=num_workers)
        rankings = rank_queries(encoded.text, encoded.image, top_k=top_k)
        entries[name] = rankings_entry(rankings, checkpoint=str(checkpoint))
    result = rankings_document([r.image_id for r in records], entries, split=split, top_k=top_k)
    if out_path is not None:
        atomic_write_text(out_path, json.dumps(result) + "\n")
    return result

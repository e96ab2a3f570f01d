import math

import pytest
import torch

from structxlip.metrics import match_ranks, retrieval_metrics, retrieval_report


def _argsort_ranks(queries, gallery):
    """Brute force: stable descending sort of each query's cosine scores, position of its match (1-based)."""
    q = queries / queries.norm(dim=1, keepdim=True)
    g = gallery / gallery.norm(dim=1, keepdim=True)
    scores = (q @ g.T).tolist()
    ranks = []
    for i, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda j: -row[j])  # Python's sort is stable: ties by index
        ranks.append(order.index(i) + 1)
    return ranks


def test_hand_built_ranks():
    # Unit vectors at angles; query i is compared with gallery items by cosine = cos(angle difference).
    angles = [0.0, 1.0, 2.0, 3.0]
    gallery = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    # Query 2 sits at angle 0.4: closest to item 0 (0.4), then item 1 (0.6), then its match item 2 (1.6) -> rank 3.
    queries = gallery.clone()
    queries[2] = torch.tensor([math.cos(0.4), math.sin(0.4)]) * 5.0  # scale must not matter (cosine)
    assert match_ranks(queries, gallery).tolist() == [1, 1, 3, 1]
    metrics = retrieval_metrics(queries, gallery)
    assert metrics["R@1"] == pytest.approx(75.0)
    assert metrics["R@5"] == pytest.approx(100.0)
    assert metrics["mean_rank"] == pytest.approx(1.5)
    assert metrics["median_rank"] == pytest.approx(1.0)


def test_ties_are_broken_by_index():
    gallery = torch.ones(4, 3)  # every score ties
    assert match_ranks(torch.ones(4, 3), gallery).tolist() == [1, 2, 3, 4]
    assert retrieval_metrics(torch.ones(4, 3), gallery)["R@1"] == pytest.approx(25.0)
    assert retrieval_metrics(torch.ones(4, 3), gallery)["median_rank"] == pytest.approx(2.5)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_argsort_reference_on_random_embeddings(chunk_size):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(60, 8, generator=generator, dtype=torch.float64)
    gallery = queries + 0.9 * torch.randn(60, 8, generator=generator, dtype=torch.float64)
    reference = _argsort_ranks(queries, gallery)
    assert match_ranks(queries, gallery, chunk_size=chunk_size).tolist() == reference
    metrics = retrieval_metrics(queries, gallery, chunk_size=chunk_size)
    for k in (1, 5, 10, 25, 50):
        assert metrics[f"R@{k}"] == pytest.approx(100.0 * sum(r <= k for r in reference) / 60)
    assert metrics["mean_rank"] == pytest.approx(sum(reference) / 60)
    ordered = sorted(reference)
    assert metrics["median_rank"] == pytest.approx((ordered[29] + ordered[30]) / 2)


def test_report_keys_and_composed_query():
    generator = torch.Generator().manual_seed(1)
    images, texts, structures = (torch.randn(10, 4, generator=generator) for _ in range(3))
    report = retrieval_report(images, texts)
    assert {key.split("/")[0] for key in report} == {"t2i", "i2t"}
    assert report["t2i/R@1"] == retrieval_metrics(texts, images)["R@1"]
    full = retrieval_report(images, texts, structures)
    assert {key.split("/")[0] for key in full} == {"t2i", "i2t", "s2t", "t2s", "ts2i"}
    assert set(full) >= set(report) and len(full) == 5 * 7
    composed = texts / texts.norm(dim=1, keepdim=True) + structures / structures.norm(dim=1, keepdim=True)
    assert full["ts2i/mean_rank"] == pytest.approx(retrieval_metrics(composed, images)["mean_rank"])
    assert full["s2t/R@5"] == retrieval_metrics(structures, texts)["R@5"]


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="paired embeddings"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(4, 4))

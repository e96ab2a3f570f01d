"""Per-query rankings: a hand-checkable case, and agreement with evaluate's t2i metrics on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from structxlip.app.evaluate import compute_rankings, evaluate
from structxlip.retrieval_ranks import rank_queries
from structxlip.app.synthetic import make_synthetic_manifest

ROOT = Path(__file__).resolve().parents[2]


def test_rank_queries_on_embeddings_with_known_order():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # q0 = gallery 0 exactly; q1 is closest to gallery 2 (cos 0.98), then 1 (0.8), then 0 (0.6):
    # its own image (1) is second. q2 = (1, 0.1): gallery 0 (0.995), then 2 (0.77), then 1 (0.1): own image (2) second.
    queries = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.1]])
    result = rank_queries(queries, gallery, top_k=2)
    assert result.ranks.tolist() == [1, 2, 2]
    assert result.top_indices.tolist() == [[0, 2], [2, 1], [0, 2]]
    assert torch.allclose(result.top_scores[1], torch.tensor([1.4 / 2 ** 0.5, 0.8]))
    # Ties keep gallery order, as match_ranks breaks them: all-equal embeddings rank by index.
    tied = rank_queries(torch.ones(3, 2), torch.ones(3, 2), top_k=3)
    assert tied.ranks.tolist() == [1, 2, 3] and tied.top_indices.tolist() == [[0, 1, 2]] * 3


def test_rankings_agree_with_evaluate_t2i(tmp_path, tiny_clip_dir):
    manifest = make_synthetic_manifest(tmp_path / "out", n_images=8, image_size=64)
    out_path = tmp_path / "out" / "eval" / "rankings.json"
    result = compute_rankings(manifest, models={"zero-shot": str(tiny_clip_dir), "again": str(tiny_clip_dir)},
                              base_model=str(tiny_clip_dir), out_path=out_path, split="all", top_k=3,
                              batch_size=4, device="cpu", max_text_tokens=77)
    assert json.loads(out_path.read_text()) == result
    metrics = evaluate(manifest, checkpoint=str(tiny_clip_dir), base_model=str(tiny_clip_dir), split="all",
                       batch_size=4, device="cpu", max_text_tokens=77)
    assert len(result["image_ids"]) == metrics["n_pairs"] == 8 and result["top_k"] == 3
    for entry in result["models"].values():
        ranks = entry["ranks"]
        assert sum(ranks) / len(ranks) == metrics["t2i/mean_rank"]
        assert 100.0 * sum(r == 1 for r in ranks) / len(ranks) == metrics["t2i/R@1"]
        for query, (rank, top) in enumerate(zip(ranks, entry["top"])):
            assert len(top) == 3 and sorted(set(top)) == sorted(top)
            assert (query in top) == (rank <= 3) and (rank > 3 or top[rank - 1] == query)
            assert entry["scores"][query] == sorted(entry["scores"][query], reverse=True)
    assert result["models"]["zero-shot"]["ranks"] == result["models"]["again"]["ranks"]


def test_evaluate_writes_the_rankings_compute_rankings_gives(tmp_path, tiny_clip_dir):
    """The evaluate stage ranks from evaluate's own embeddings (one encoding per model): the same document."""
    manifest = make_synthetic_manifest(tmp_path / "out", n_images=6, image_size=64)
    options = dict(base_model=str(tiny_clip_dir), split="all", batch_size=4, device="cpu", max_text_tokens=77)
    path = tmp_path / "rankings.json"
    metrics = evaluate(manifest, checkpoint=str(tiny_clip_dir), rankings_path=path, top_k=3, **options)
    expected = compute_rankings(manifest, models={"fine-tuned": str(tiny_clip_dir)}, top_k=3, **options)
    assert json.loads(path.read_text()) == expected
    assert metrics["n_pairs"] == 6


def test_rankings_command_writes_the_explorer_file(tmp_path, tiny_clip_dir):
    out_dir = tmp_path / "out"
    make_synthetic_manifest(out_dir, n_images=4, image_size=64)
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{clip_model: {tiny_clip_dir}}}\ntrain: {{max_text_tokens: 77}}\n"
                      "evaluate: {device: cpu, batch_size: 4}\n")
    result = subprocess.run([sys.executable, "-m", "flows.cli", "rankings", str(out_dir), "--config", str(config),
                             "--split", "all", "--top-k", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((out_dir / "eval" / "rankings.json").read_text())
    # No OUT/train/model yet: only the zero-shot model (model.clip_model) is ranked.
    assert list(written["models"]) == ["zero-shot"] and written["top_k"] == 2 and len(written["image_ids"]) == 4
    assert "zero-shot: " in result.stdout and "rankings: " in result.stdout

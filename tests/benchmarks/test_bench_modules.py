"""The scoring benchmark's batching: one embedding call per kind for all images, then per-image slices."""

from __future__ import annotations

import numpy as np

from benchmarks.clip_scoring import score


class _FakeScorer:
    """Embeds a crop as its mean colour one-hot-ish vector and a sentence by a fixed table; counts calls."""

    def __init__(self):
        self.calls = []

    def embed_images(self, images):
        self.calls.append(("images", len(images)))
        return np.stack([np.eye(3, dtype=np.float32)[int(image[0, 0, 0])] for image in images])

    def embed_texts(self, texts):
        self.calls.append(("texts", len(texts)))
        return np.stack([np.eye(3, dtype=np.float32)[int(text)] for text in texts])


def _crop(kind: int) -> np.ndarray:
    return np.full((4, 4, 3), kind, dtype=np.uint8)


def test_score_slices_each_images_crops_and_sentences():
    # Image A: crops of kinds (0, 1), sentences of kinds (1, 0, 1) -> crops 1, 0, 1.
    # Image B: crops (2, 1, 0), sentences (0, 2) -> crops 2, 0 (indices within B, not the batch).
    work = [([_crop(0), _crop(1)], ["1", "0", "1"]), ([_crop(2), _crop(1), _crop(0)], ["0", "2"])]
    scorer = _FakeScorer()
    assignments = score(scorer, work)
    assert [[a.crop_index for a in image] for image in assignments] == [[1, 0, 1], [2, 0]]
    assert all(a.similarity_score == 100.0 for image in assignments for a in image)
    assert scorer.calls == [("images", 5), ("texts", 5)]  # batched across images, not per image

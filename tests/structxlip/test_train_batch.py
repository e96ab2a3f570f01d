"""A training split smaller than one batch is refused in one line before any step (no run that silently trains on
fewer negatives than configured, or on none)."""

from __future__ import annotations

import pytest

from structxlip.app.synthetic import make_synthetic_manifest
from structxlip.app.train import _check_one_batch, train


@pytest.mark.parametrize("pairs, batch_size, world_size, fix", [
    (3, 4, 1, "lower train.batch_size to at most 3"),
    (1, 2, 1, "contrastive training needs at least 2 pairs per batch"),
    (0, 2, 1, "contrastive training needs at least 2 pairs per batch"),
    (7, 5, 2, "lower train.batch_size to at most 4"),  # two processes: ceil(7 / 2) = 4 each, short of 5
])
def test_fewer_pairs_than_one_batch_is_refused(pairs, batch_size, world_size, fix):
    with pytest.raises(ValueError) as caught:
        _check_one_batch(pairs, batch_size, world_size)
    assert str(caught.value).startswith(f"the training split has {pairs} pair(s), fewer than one batch "
                                        f"(train.batch_size={batch_size})")
    assert fix in str(caught.value) and "\n" not in str(caught.value)


def test_exactly_one_batch_is_enough():
    _check_one_batch(4, 4, 1)
    _check_one_batch(8, 4, 2)
    _check_one_batch(7, 4, 2)  # ceil(7 / 2) = 4 per process: one full batch each
    with pytest.raises(ValueError, match="on each of 2 processes"):
        _check_one_batch(7, 5, 2)


def test_train_refuses_a_split_smaller_than_a_batch_before_any_step(tmp_path, tiny_clip_dir):
    # 5 images -> 4 in the train split (the synthetic manifest's 80 %): a batch of 5 cannot be filled.
    manifest = make_synthetic_manifest(tmp_path / "data", n_images=5, image_size=32, seed=2)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as caught:
        train(manifest, out, clip_model=str(tiny_clip_dir), epochs=1, batch_size=5, max_text_tokens=77,
              progress=False, device="cpu")
    message = str(caught.value)
    assert "fewer than one batch (train.batch_size=5)" in message and "lower train.batch_size to at most" in message
    assert not list(out.rglob("*.pt"))  # nothing was trained or checkpointed

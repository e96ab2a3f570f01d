"""evaluate() keeps the embeddings it computes (eval/embeddings.npz, the explorer's map): the same vectors as an
independent encoding, L2-normalised, in record order, per model; metrics and rankings stay exactly as without it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from structxlip.data import load_records
from structxlip.app.evaluate import encode_records, evaluate, load_model_for_eval
from structxlip.app.synthetic import make_synthetic_manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_manifest(tmp_path_factory.mktemp("data"), n_images=10, image_size=48, seed=3)


def test_evaluate_writes_the_embeddings_it_ranked_with(data, tiny_clip_dir, tmp_path):
    kwargs = dict(checkpoint=tiny_clip_dir, base_model=str(tiny_clip_dir), split="all", device="cpu", batch_size=4)
    plain = evaluate(data, out_path=tmp_path / "plain.json", rankings_path=tmp_path / "plain-rankings.json", **kwargs)
    kept = evaluate(data, out_path=tmp_path / "kept.json", rankings_path=tmp_path / "kept-rankings.json",
                    embeddings_path=tmp_path / "embeddings.npz", **kwargs)
    assert kept == plain
    assert (tmp_path / "kept.json").read_bytes() == (tmp_path / "plain.json").read_bytes()
    assert (tmp_path / "kept-rankings.json").read_bytes() == (tmp_path / "plain-rankings.json").read_bytes()

    records = load_records(data, split=None, top_k=0)
    loaded = load_model_for_eval(tiny_clip_dir, base_model=str(tiny_clip_dir))
    encoded = encode_records(loaded, records, batch_size=3, device="cpu", precision="fp32", max_text_tokens=248,
                             num_workers=0)
    with np.load(tmp_path / "embeddings.npz", allow_pickle=False) as stored:
        assert stored["image_ids"].tolist() == [r.image_id for r in records]
        assert stored["models"].tolist() == ["fine-tuned"] and str(stored["split"]) == "all"
        assert stored["has_structure"].tolist() == encoded.has_structure.tolist()
        for kind in ("image", "structure", "text"):
            vectors = stored[f"fine-tuned/{kind}"]
            assert vectors.dtype == np.float16 and vectors.shape == tuple(getattr(encoded, kind).shape)
            expected = getattr(encoded, kind).numpy()
            expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
            np.testing.assert_allclose(vectors.astype(np.float32), expected, atol=2e-3)
            np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert json.loads((tmp_path / "kept-rankings.json").read_text())["image_ids"] == [r.image_id for r in records]


def test_zero_shot_embeddings_are_kept_beside_the_fine_tuned_ones(data, tiny_clip_dir, tmp_path):
    from structxlip.models import load_clip

    finetuned = tmp_path / "finetuned"
    model = load_clip(str(tiny_clip_dir))
    for parameter in model.model.parameters():  # any change of the weights: a "fine-tuned" model unlike the base
        parameter.data.mul_(0.5)
    model.model.save_pretrained(finetuned)
    model.tokenizer.save_pretrained(finetuned)
    model.image_processor.save_pretrained(finetuned)
    evaluate(data, checkpoint=finetuned, base_model=str(tiny_clip_dir), split="test", device="cpu", zero_shot=True,
             embeddings_path=tmp_path / "embeddings.npz")
    with np.load(tmp_path / "embeddings.npz", allow_pickle=False) as stored:
        assert stored["models"].tolist() == ["fine-tuned", "zero-shot"]
        assert stored["fine-tuned/image"].shape == stored["zero-shot/image"].shape
        assert not np.array_equal(stored["fine-tuned/text"], stored["zero-shot/text"])

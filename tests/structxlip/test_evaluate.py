"""Retrieval evaluation: known-recall embeddings, the full runner against a slow reference, checkpoint formats."""

from __future__ import annotations

import json

import pytest
import torch

from structxlip import metrics
from structxlip.data import ImagePreprocessor, StructXLIPCollator, StructXLIPDataset, load_records
from structxlip.app.evaluate import EncodedSplit, evaluate, metrics_table, retrieval_metrics, split_report
from structxlip.app.synthetic import make_synthetic_manifest


def test_retrieval_metrics_is_reexported():
    assert retrieval_metrics is metrics.retrieval_metrics


def test_split_report_on_embeddings_with_known_ranks():
    eye = torch.eye(4)
    text = eye.clone()
    text[3] = eye[0]  # caption 3 describes image 0: rank 4 for t3 (image 0 higher, images 1, 2 tie earlier)
    encoded = EncodedSplit(image=eye, text=text, structure=eye.clone(),
                           has_structure=torch.tensor([True, True, True, False]))
    report = split_report(encoded)
    assert report["n_pairs"] == 4 and report["n_structure_pairs"] == 3
    for direction in ("t2i", "i2t"):
        assert report[f"{direction}/R@1"] == 75.0
        assert report[f"{direction}/R@5"] == 100.0
        assert report[f"{direction}/mean_rank"] == 1.75
        assert report[f"{direction}/median_rank"] == 1.0
    # Structure directions use only the 3 samples with a map: all exact matches.
    assert report["s2t/R@1"] == report["t2s/R@1"] == report["ts2i/R@1"] == 100.0
    table = metrics_table(report)
    assert table.splitlines()[0].startswith("| direction | n | R@1 | R@5")
    # n: the pairs each direction ranks (structure directions: only the samples with a map).
    assert "| t2i | 4 | 75.00 | 100.00" in table and "| ts2i | 3 | 100.00" in table


def _slow_recall(queries, gallery, k):
    """Share (in %) of queries i whose gallery item i is among the k most similar (ties: lower index first)."""
    q = queries / queries.norm(dim=1, keepdim=True)
    g = gallery / gallery.norm(dim=1, keepdim=True)
    hits = 0
    for i in range(len(q)):
        scores = [float(q[i] @ g[j]) for j in range(len(g))]
        ranking = sorted(range(len(g)), key=lambda j: (-scores[j], j))
        hits += ranking.index(i) < k
    return 100.0 * hits / len(q)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_manifest(tmp_path_factory.mktemp("data"), n_images=16, image_size=48, seed=4)


def test_evaluate_matches_a_slow_reference_and_writes_json(data, tiny_clip_dir, tmp_path):
    from structxlip.models import load_clip

    out = tmp_path / "metrics.json"
    report = evaluate(data, checkpoint=tiny_clip_dir, base_model=str(tiny_clip_dir), out_path=out, split="all",
                      batch_size=5, device="cpu", max_text_tokens=77)
    assert json.loads(out.read_text()) == pytest.approx(report)
    assert report["n_pairs"] == 16 == report["n_structure_pairs"]

    loaded = load_clip(tiny_clip_dir, max_text_tokens=77)
    model = loaded.model.eval()
    records = load_records(data, split=None, top_k=0)
    dataset = StructXLIPDataset(records, preprocess=ImagePreprocessor.from_image_processor(loaded.image_processor),
                                with_chunks=False, with_crops=False)
    batch = StructXLIPCollator(loaded.tokenizer, max_text_tokens=77)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        image = model.get_image_features(pixel_values=batch.pixel_values).pooler_output
        structure = model.get_image_features(pixel_values=batch.structure_values).pooler_output
        text = model.get_text_features(input_ids=batch.input_ids, attention_mask=batch.attention_mask).pooler_output
    for k in (1, 5, 10):
        assert report[f"t2i/R@{k}"] == pytest.approx(_slow_recall(text, image, k))
        assert report[f"i2t/R@{k}"] == pytest.approx(_slow_recall(image, text, k))
        assert report[f"s2t/R@{k}"] == pytest.approx(_slow_recall(structure, text, k))
    test_only = evaluate(data, checkpoint=tiny_clip_dir, base_model=str(tiny_clip_dir), split="test", device="cpu",
                         max_text_tokens=77)
    assert test_only["n_pairs"] == 4


def test_released_pth_with_prefix_loads_onto_the_base_model(data, tiny_clip_dir, tmp_path):
    from structxlip.models import load_clip

    # A "released" fine-tune: 248 text positions, changed weights, keys prefixed clip_model.
    released = load_clip(tiny_clip_dir, max_text_tokens=248)
    with torch.no_grad():
        for parameter in released.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    torch.save({f"clip_model.{k}": v for k, v in released.model.state_dict().items()}, tmp_path / "structxlip.pth")
    released.model.save_pretrained(tmp_path / "hf")
    released.tokenizer.save_pretrained(tmp_path / "hf")
    released.image_processor.save_pretrained(tmp_path / "hf")

    kwargs = dict(base_model=str(tiny_clip_dir), split="all", device="cpu", max_text_tokens=248)
    from_pth = evaluate(data, checkpoint=tmp_path / "structxlip.pth", **kwargs)
    from_dir = evaluate(data, checkpoint=tmp_path / "hf", zero_shot=True, out_path=tmp_path / "m.json", **kwargs)
    base = evaluate(data, checkpoint=tiny_clip_dir, zero_shot=True, **kwargs)
    assert "zero_shot" not in base  # the checkpoint is the base model: no second row
    zero_shot = from_dir.pop("zero_shot")
    assert from_pth == pytest.approx(from_dir)
    assert from_pth != pytest.approx(base)
    # The zero-shot row is the base model before fine-tuning, next to the fine-tuned one in metrics.json.
    assert zero_shot == pytest.approx(base)
    assert json.loads((tmp_path / "m.json").read_text())["zero_shot"] == pytest.approx(base)
    with pytest.raises(FileNotFoundError):
        evaluate(data, checkpoint=tmp_path / "missing.pth", **kwargs)


def test_loading_is_loud_about_missing_and_unexpected_keys(data, tiny_clip_dir, tmp_path):
    from structxlip.checkpoint import CheckpointError, save_checkpoint
    from structxlip.models import load_clip

    state = load_clip(tiny_clip_dir, max_text_tokens=77).model.state_dict()
    kwargs = dict(base_model=str(tiny_clip_dir), split="all", device="cpu", max_text_tokens=77)
    # A training checkpoint whose model lacks the vision tower (78 keys in this tiny model's case would be silent
    # base-model weights under strict=False).
    partial = {k: v for k, v in state.items() if not k.startswith("vision_model.")}
    missing = len(state) - len(partial)
    save_checkpoint(tmp_path / "partial.pt", model_state=partial, optimizer_state={}, step=1, epoch=1,
                    batch_in_epoch=0, config={"run": {"clip_model": str(tiny_clip_dir)}})
    with pytest.raises(CheckpointError, match=rf"partial.pt: weights do not match the model: {missing} missing keys"):
        evaluate(data, checkpoint=tmp_path / "partial.pt", **kwargs)
    # A plain state dict with an extra entry and one missing weight.
    plain = dict(state, **{"head.weight": torch.zeros(2)})
    del plain["logit_scale"]
    torch.save(plain, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e.g. \['logit_scale'\]\), 1 unexpected keys"):
        evaluate(data, checkpoint=tmp_path / "plain.pth", **kwargs)


def test_bf16_precision_changes_the_encoding_on_cpu(data, tiny_clip_dir):
    from structxlip.app.evaluate import encode_split
    from structxlip.models import load_clip

    loaded = load_clip(tiny_clip_dir, max_text_tokens=77)
    records = load_records(data, split=None, top_k=0)[:4]
    dataset = StructXLIPDataset(records, preprocess=ImagePreprocessor.from_image_processor(loaded.image_processor),
                                with_chunks=False, with_crops=False)
    fp32 = encode_split(loaded, dataset, precision="fp32", max_text_tokens=77)
    bf16 = encode_split(loaded, dataset, precision="bf16", max_text_tokens=77)
    assert not torch.equal(fp32.image, bf16.image)  # autocast ran in bf16
    torch.testing.assert_close(bf16.image, fp32.image, atol=0.05, rtol=0.05)


def test_reference_json_with_relative_paths_and_root(tiny_clip_dir, tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "lists").mkdir()
    records = []
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (33 + i, 21), colour).save(tmp_path / "images" / f"{i}.png")
        records.append({"original_filename": f"images/{i}.png", "original_caption": f"a {colour} square",
                        "original_filename_structure": None, "segment": []})
    listing = tmp_path / "lists" / "test.json"
    listing.write_text(json.dumps(records))
    kwargs = dict(checkpoint=tiny_clip_dir, base_model=str(tiny_clip_dir), split="all", device="cpu",
                  max_text_tokens=77)
    with pytest.raises(ValueError, match="image file not found"):
        evaluate(listing, **kwargs)  # relative to the JSON's own folder: lists/images/0.png does not exist
    report = evaluate(listing, root=tmp_path, **kwargs)
    assert report["n_pairs"] == 3 and report["n_structure_pairs"] == 0

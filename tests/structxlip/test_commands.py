"""The library's CLI commands driven end to end, as a user would: build-tiny-clip, train, evaluate, JSON export/import."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import yaml

from flows.cli import main
from storage.layout import OutputLayout
from storage.manifest import read_manifest
from structxlip.app.synthetic import make_synthetic_manifest


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    manifest = make_synthetic_manifest(root / "data", n_images=12, image_size=48, seed=7)
    return root, manifest


@pytest.fixture(scope="module")
def trained(workspace):
    """The tiny CLIP built by ``build-tiny-clip`` and trained one epoch by ``train`` into ROOT/out (77 positions):
    ``(config path, out folder, what train printed)``; made once, by whichever test asks first."""
    root, manifest = workspace
    assert main(["build-tiny-clip", str(root / "tiny")]) == 0
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"clip_model": str(root / "tiny")},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-4, "max_text_tokens": 77, "lambda_hard_negative": 0.5},
        "evaluate": {"batch_size": 8},
    }))
    out, printed = root / "out", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", str(manifest), "--out", str(out), "--config", str(config), "--epochs", "1",
                     "--device", "cpu", "--no-progress"]) == 0
    return config, out, printed.getvalue()


def test_build_train_evaluate(workspace, trained, capsys):
    root, manifest = workspace
    config, out, printed = trained
    assert (root / "tiny" / "config.json").is_file()
    assert "trained 1/1 epochs, 2 steps" in printed
    layout = OutputLayout(out)
    lines = [json.loads(line) for line in layout.train_metrics.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["weight/hard_negative"] == 0.5 and lines[0]["loss/hard_negative"] > 0

    # Resuming a finished run with one more epoch continues from the epoch-1 checkpoint (lr schedule aside).
    assert main(["train", str(manifest), "--out", str(out), "--config", str(config), "--device", "cpu", "--resume",
                 "--no-progress"]) == 0
    assert len(layout.train_metrics.read_text().splitlines()) == 4

    metrics_pt, metrics_dir = root / "pt.json", root / "dir.json"
    assert main(["evaluate", str(manifest), "--checkpoint", str(layout.checkpoint("last")), "--config", str(config),
                 "--out", str(metrics_pt), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| t2i | 3 |" in table and "| ts2i |" in table and "3 pairs" in table
    assert "zero-shot (" in table  # the base model's row, printed after the fine-tuned one
    assert main(["evaluate", str(manifest), "--checkpoint", str(layout.model_dir), "--config", str(config),
                 "--out", str(metrics_dir), "--device", "cpu", "--precision", "fp32", "--no-zero-shot"]) == 0
    from_pt, from_dir = json.loads(metrics_pt.read_text()), json.loads(metrics_dir.read_text())
    zero_shot = from_pt.pop("zero_shot")
    assert "zero_shot" not in from_dir
    assert from_pt == pytest.approx(from_dir)  # the training checkpoint and the exported model are the same weights
    assert zero_shot["n_pairs"] == 3 and zero_shot != pytest.approx(from_pt)
    assert set(f"{d}/R@{k}" for d in ("t2i", "i2t", "s2t", "t2s", "ts2i") for k in (1, 5, 10, 25, 50)) <= set(from_pt)


def test_evaluate_refuses_a_corrupt_checkpoint_with_one_line(workspace, tmp_path, capsys):
    _, manifest = workspace
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated zip")
    assert main(["evaluate", str(manifest), "--checkpoint", str(tmp_path / "bad.pt"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("structxlip evaluate: error:") and "bad.pt" in error and "\n" not in error


def test_export_and_import_json_commands(workspace, tmp_path, capsys):
    _, manifest = workspace
    exported = tmp_path / "ref.json"
    assert main(["export-json", str(manifest), str(exported)]) == 0
    records = json.loads(exported.read_text())
    assert len(records) == 12
    records.append({"original_filename": "../../etc/passwd", "original_caption": "x"})
    exported.write_text(json.dumps(records))
    assert main(["import-json", str(exported), "--out", str(tmp_path / "imported")]) == 0
    captured = capsys.readouterr()
    assert "rejected item 12:" in captured.err and "escapes" in captured.err
    assert "imported 12 records (1 rejected)" in captured.out
    assert read_manifest(tmp_path / "imported").num_rows == 12
    assert main(["import-json", str(exported), "--out", str(tmp_path / "imported")]) == 2  # refuses to overwrite


def _stretch(table, target=248, keep=20):
    """Long-CLIP stretch written out row by row (METHOD.md section 4)."""
    import torch

    rows = [table[i] for i in range(keep)]
    for i in range(keep, table.shape[0] - 1):
        a, b = table[i], table[i + 1]
        rows += [a, (3 * a + b) / 4, (a + b) / 2, (a + 3 * b) / 4]
    rows += [table[-1] + k * (table[-1] - table[-2]) / 4 for k in range(target - len(rows))]
    return torch.stack(rows)


def test_export_checkpoint_writes_what_the_reference_evaluator_loads(workspace, trained, tmp_path, capsys):
    import torch
    from transformers import CLIPModel

    root, manifest = workspace
    _, out, _ = trained  # 77 positions
    from_pt, from_dir = tmp_path / "from_pt.pth", tmp_path / "from_dir.pth"
    assert main(["export-checkpoint", str(OutputLayout(out).checkpoint("last")), str(from_pt)]) == 0
    assert "248 text positions" in capsys.readouterr().out
    assert main(["export-checkpoint", str(OutputLayout(out).model_dir), str(from_dir)]) == 0
    state = torch.load(from_pt, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert not any(k.startswith(("module.", "clip_model.", "model.")) for k in state)

    # What the reference's retrieval.py does: base model, positions stretched to 248, load_state_dict(strict=False).
    fine_tuned = CLIPModel.from_pretrained(OutputLayout(out).model_dir)
    base = CLIPModel.from_pretrained(root / "tiny")
    embeddings = base.text_model.embeddings
    embeddings.position_embedding = torch.nn.Embedding.from_pretrained(
        _stretch(embeddings.position_embedding.weight.detach()), freeze=False)
    embeddings.register_buffer("position_ids", torch.arange(248)[None], persistent=False)
    missing, unexpected = base.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    expected = fine_tuned.state_dict()
    expected["text_model.embeddings.position_embedding.weight"] = _stretch(
        expected["text_model.embeddings.position_embedding.weight"])
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
    other = torch.load(from_dir, map_location="cpu", weights_only=True)
    assert other.keys() == state.keys() and all(torch.equal(other[k], state[k]) for k in state)

    assert main(["export-checkpoint", str(manifest), str(tmp_path / "x.pth")]) == 2  # not a model
    assert "not a CLIP model folder" in capsys.readouterr().err


def test_evaluate_without_config_uses_the_config_its_pipeline_run_recorded(workspace, tmp_path, capsys):
    root, manifest = workspace
    from structxlip.models import build_tiny_clip

    tiny = tmp_path / "tiny-recorded"
    build_tiny_clip(tiny)
    out = OutputLayout(manifest).root if (manifest / "manifest").is_dir() else manifest.parent
    assert (out / "manifest").is_dir()
    # What `structxlip run` leaves in OUT/config.yaml: a local tiny CLIP instead of the default hub model (not
    # reachable here), and every split evaluated instead of the default test split (3 of the 12 images).
    OutputLayout(out).config_record.write_text(yaml.safe_dump({"model": {"clip_model": str(tiny)},
                                                               "train": {"max_text_tokens": 77},
                                                               "evaluate": {"split": "all"}}))
    try:
        assert main(["evaluate", str(out), "--device", "cpu", "--out", str(tmp_path / "m.json")]) == 0
        printed = capsys.readouterr().out
        assert "\n12 pairs (" in printed
        assert json.loads((tmp_path / "m.json").read_text())["n_pairs"] == 12
        # --config still wins over the recorded one.
        explicit = tmp_path / "explicit.yaml"
        explicit.write_text(yaml.safe_dump({"model": {"clip_model": str(tmp_path / "absent-model")}}))
        assert main(["evaluate", str(out), "--device", "cpu", "--config", str(explicit)]) == 2
        assert "absent-model" in capsys.readouterr().err
    finally:
        OutputLayout(out).config_record.unlink()


def test_a_bad_flag_value_names_the_flag_not_the_config(workspace, tmp_path, capsys):
    root, manifest = workspace
    config = tmp_path / "c.yaml"
    config.write_text("train: {epochs: 1}\n")
    assert main(["train", str(manifest), "--out", str(tmp_path / "o"), "--config", str(config),
                 "--batch-size", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("structxlip train: error: --batch-size=1: must be at least 2, got 1")
    assert str(config) not in error and "\n" not in error
    assert not (tmp_path / "o").exists()

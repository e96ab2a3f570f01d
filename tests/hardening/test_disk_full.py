"""A full disk during training is reported as one line naming the disk, the file and the space left, not as
torch's ``[enforce fail at inline_container.cc:672]``; the run stops without a traceback."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from flows.cli import main
from storage.layout import OutputLayout
from structxlip.app.synthetic import make_synthetic_manifest


def test_train_on_a_full_disk_is_one_line_saying_where(tiny_clip_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    make_synthetic_manifest(data, n_images=8, image_size=48, seed=5)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": {"clip_model": str(tiny_clip_dir)},
                                      "train": {"epochs": 1, "batch_size": 4, "max_text_tokens": 77, "device": "cpu"}}))

    def full_disk(payload, target, *args, **kwargs):
        Path(target).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3520 vs 3408")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    assert main(["train", str(data), "--out", str(out), "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "inline_container" not in err and "Traceback" not in err, err
    checkpoints = OutputLayout(out).checkpoint("last").parent
    assert err.startswith("structxlip train: error: [Errno 28] disk full while writing ") and str(checkpoints) in err
    assert "MiB free of" in err and "free space there or point the output folder at a larger disk" in err
    assert not list(checkpoints.glob("*.tmp")) and not list(checkpoints.glob(".*.tmp"))

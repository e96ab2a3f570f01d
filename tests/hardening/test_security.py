"""Misuse through the CLI: manifests and reference JSON whose paths escape their folder (also through a symbolic link),
JSON items with missing keys or wrong types, checkpoints that would unpickle arbitrary objects, and a Hugging Face
token in the environment that must never be written or printed.

Already covered elsewhere and not repeated here: the reference-JSON importer's per-item reasons
(tests/storage/test_reference_json.py), `import-json` refusing `../../etc/passwd` (tests/structxlip/test_commands.py),
the safe loaders themselves (tests/structxlip/test_train.py, test_models.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from flows.cli import main
from storage.layout import OutputLayout, PathEscapeError
from storage.manifest import manifest_table, read_manifest
from storage.parquet import write_parquet_atomic
from structxlip.app.synthetic import make_synthetic_manifest
from tests.hardening.conftest import SECRET_TOKEN
from tests.structxlip.test_train import Exploit


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A small valid output folder (12 images, maps, crops, manifest); return its root."""
    root = tmp_path_factory.mktemp("security") / "data"
    make_synthetic_manifest(root, n_images=12, image_size=48, seed=3)
    return root


def _tampered_copy(synthetic: Path, target: Path, column: str, value: str) -> Path:
    """Copy the synthetic manifest into ``target``/manifest with ``column`` of the first ok row set to ``value``."""
    rows = read_manifest(synthetic).to_pylist()
    first = next(r for r in rows if r["status"] == "ok")
    if column == "crop_path":
        first["segments"][0]["crop_path"] = value
    else:
        first[column] = value
    write_parquet_atomic(manifest_table(rows), OutputLayout(target).manifest_part("tampered"))
    return target


def _one_error_line(err: str, command: str) -> str:
    err = err.strip()
    assert err.startswith(f"structxlip {command}: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("column", ["structure_path", "crop_path"])
def test_export_json_refuses_a_manifest_path_that_escapes_its_folder(synthetic, tmp_path, capsys, column):
    out = _tampered_copy(synthetic, tmp_path / "out", column, "../../../etc/passwd")
    assert main(["export-json", str(out), str(tmp_path / "ref.json")]) == 2
    assert "escapes the output folder" in _one_error_line(capsys.readouterr().err, "export-json")
    assert not (tmp_path / "ref.json").exists()


def test_training_data_refuses_a_manifest_path_that_escapes_its_folder(synthetic, tmp_path):
    from structxlip.data import load_records

    out = _tampered_copy(synthetic, tmp_path / "out", "structure_path", "maps/../../../../etc/passwd")
    with pytest.raises(PathEscapeError, match="escapes"):
        load_records(out, split=None)


def test_import_json_rejects_escapes_missing_keys_and_wrong_types_with_reasons(synthetic, tmp_path, capsys):
    exported = tmp_path / "ref.json"
    assert main(["export-json", str(synthetic), str(exported)]) == 0
    good = json.loads(exported.read_text())[0]
    (tmp_path / "img").mkdir()
    os.symlink("/etc/passwd", tmp_path / "img" / "link.png")  # inside the folder by name, outside by target
    segments = [dict(segment) for segment in good["segment"]]
    # "0" would be read like the reference reads it (float()); a word is not a number.
    segments[0]["bbox_coordinates"] = {**segments[0]["bbox_coordinates"], "x1": "zero"}
    # Absolute paths are allowed (reference data often lives elsewhere), but the file must be an image; without
    # recorded dimensions its header is read (with them it is trusted: see the report of this test's author).
    no_size = {k: v for k, v in good["structxlip"].items() if k not in ("width", "height")}
    bad = [
        {**good, "original_filename": "img/link.png"},
        {k: v for k, v in good.items() if k != "original_caption"},
        {**good, "original_caption": ["a", "list"]},
        {**good, "segment": segments},
        {**good, "original_filename": "/etc/passwd", "structxlip": no_size},
    ]
    exported.write_text(json.dumps([good, *bad]))
    assert main(["import-json", str(exported), "--out", str(tmp_path / "imported")]) == 0
    captured = capsys.readouterr()
    reasons = {int(line.split(":")[0].split()[-1]): line for line in captured.err.strip().splitlines()}
    assert sorted(reasons) == [1, 2, 3, 4, 5], captured.err
    assert "escapes" in reasons[1]
    assert "original_caption" in reasons[2] and "missing" in reasons[2]
    assert "original_caption" in reasons[3] and "str" in reasons[3]
    assert "bbox_coordinates.x1" in reasons[4]
    assert "cannot read image /etc/passwd" in reasons[5]
    assert "imported 1 records (5 rejected)" in captured.out
    (row,) = read_manifest(tmp_path / "imported").to_pylist()
    assert "/etc/" not in json.dumps(row)


def test_a_json_that_is_not_a_list_is_one_line(tmp_path, capsys):
    (tmp_path / "ref.json").write_text(json.dumps({"original_filename": "a.png"}))
    assert main(["import-json", str(tmp_path / "ref.json"), "--out", str(tmp_path / "o")]) == 2
    assert "expected a JSON list" in _one_error_line(capsys.readouterr().err, "import-json")


# ---- checkpoints that unpickle arbitrary objects --------------------------------------------------------------------
def test_train_resume_refuses_a_pickle_checkpoint_without_running_it(synthetic, tiny_clip_dir, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": {"clip_model": str(tiny_clip_dir)},
                                      "train": {"epochs": 1, "batch_size": 4, "max_text_tokens": 77, "device": "cpu"}}))
    out = tmp_path / "out"
    last = OutputLayout(out).checkpoint("last")
    last.parent.mkdir(parents=True)
    torch.save({"format": "structxlip-train-checkpoint", "payload": Exploit(tmp_path / "pwned")}, last)
    assert main(["train", str(synthetic), "--out", str(out), "--config", str(config), "--resume",
                 "--no-progress"]) == 2
    error = _one_error_line(capsys.readouterr().err, "train")
    assert "safe loader" in error and "last.pt" in error
    assert not (tmp_path / "pwned").exists()
    assert not OutputLayout(out).model_dir.exists()


def test_evaluate_refuses_a_pickle_pth_without_running_it(synthetic, tiny_clip_dir, tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"model": {"clip_model": str(tiny_clip_dir)}, "train": {"max_text_tokens": 77}}))
    torch.save({"state_dict": Exploit(tmp_path / "pwned")}, tmp_path / "released.pth")
    assert main(["evaluate", str(synthetic), "--checkpoint", str(tmp_path / "released.pth"), "--config", str(config),
                 "--device", "cpu", "--out", str(tmp_path / "m.json")]) == 2
    assert "released.pth" in _one_error_line(capsys.readouterr().err, "evaluate")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "m.json").exists()


# ---- a Hugging Face token in the environment -----------------------------------------------------------------------
def _files_holding(folder: Path, secret: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and secret in p.read_bytes()]


@pytest.mark.e2e
def test_hf_token_never_appears_in_output_logs_or_files_of_a_run(corpus_run):
    done = corpus_run.done
    assert done.returncode == 0, done.stderr[-3000:]
    assert SECRET_TOKEN not in done.stdout and SECRET_TOKEN not in done.stderr
    assert "INFO" in done.stderr  # --verbose: Prefect's own logs were printed too, and hold no token
    assert _files_holding(corpus_run.out, SECRET_TOKEN.encode()) == []
    # The server's database and logs hold the run's flow runs, task runs, logs and artifacts.
    assert _files_holding(corpus_run.prefect_home, SECRET_TOKEN.encode()) == []


def test_hf_token_is_not_echoed_by_a_failing_hub_download(synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["evaluate", str(synthetic), "--checkpoint", "someone/private-model", "--device", "cpu",
                 "--out", str(tmp_path / "m.json")]) == 2
    captured = capsys.readouterr()
    error = _one_error_line(captured.err, "evaluate")
    assert "someone/private-model" in error
    assert SECRET_TOKEN not in captured.out + captured.err



# ---- issue 14: pickled weights are refused with what to do, not a traceback or "corrupt" ----------------------------
def test_evaluate_refuses_a_folder_with_a_pickled_pytorch_model_bin(synthetic, tiny_clip_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_clip_dir, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "extra": Exploit(tmp_path / "pwned")}, folder / "pytorch_model.bin")
    assert main(["evaluate", str(synthetic), "--checkpoint", str(folder), "--device", "cpu",
                 "--out", str(tmp_path / "m.json")]) == 2
    error = _one_error_line(capsys.readouterr().err, "evaluate")
    assert f"{folder}/pytorch_model.bin: refused by the safe loader: it holds pickled Python objects and needs " \
           "unrestricted unpickling (weights_only=False), which can run arbitrary code" in error
    assert "safetensors" in error and "save_file" in error and "Traceback" not in error
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "m.json").exists()


def test_a_pickled_pth_is_refused_for_needing_unrestricted_unpickling_not_as_corrupt(tmp_path):
    from structxlip.checkpoint import CheckpointError, read_checkpoint_payload
    from structxlip.models import load_structxlip_checkpoint

    torch.save({"state_dict": Exploit(tmp_path / "pwned")}, tmp_path / "released.pth")
    for load in (read_checkpoint_payload, lambda path: load_structxlip_checkpoint(torch.nn.Linear(1, 1), path)):
        with pytest.raises(CheckpointError) as caught:
            load(tmp_path / "released.pth")
        message = str(caught.value)
        assert "needs unrestricted unpickling" in message and "corrupt" not in message
        assert "\n" not in message
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "broken.pth").write_bytes(b"\x80\x02garbage")  # really corrupt: still called that
    with pytest.raises(CheckpointError, match="corrupt or not a torch.save file"):
        read_checkpoint_payload(tmp_path / "broken.pth")

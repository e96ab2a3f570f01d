"""The stage definitions: keys chain forward only, are computed from *resolved* values, ignore runtime settings, and
every train config key reaches the trainer (the config and the trainer cannot drift apart)."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest

from configs import load_config
from pipelines.engine import stages
from pipelines.engine.stages import (STAGE_DEFINITIONS, model_identity, module_version, parse_stages, stage_keys,
                              text_item_key)
from structxlip.app.train import train_arguments


def test_stage_keys_chain_forward_only():
    base = stage_keys(load_config())
    canny = stage_keys(load_config(overrides={"structure.canny_low": 50}))
    split = stage_keys(load_config(overrides={"manifest.split_ratios": {"train": 0.5, "val": 0.25, "test": 0.25}}))
    order = list(base)
    assert [s for s in order if canny[s] != base[s]] == order[order.index("structure"):]
    assert [s for s in order if split[s] != base[s]] == order[order.index("manifest"):]
    assert text_item_key("a", "A cat.") != text_item_key("a", "A dog.")


def test_runtime_settings_never_change_a_key():
    runtime = {"runtime.chunk_size": 3, "runtime.workers": 1, "structure.batch_size": 2, "captions.batch_size": 2,
               "captions.device": "cpu", "regions.points_per_batch": 8, "regions.device": "cpu",
               "filter.batch_size": 3, "train.device": "cpu", "train.num_workers": 2, "evaluate.batch_size": 5,
               "train.checkpoint_every_steps": 7}
    assert stage_keys(load_config(overrides=runtime)) == stage_keys(load_config())


def test_auto_is_resolved_before_keying(monkeypatch):
    """``backend: auto`` keys as the backend that runs: a folder processed on CPU then on a GPU gets two keys."""
    monkeypatch.setattr(stages, "cuda_available", lambda: False)
    cpu = stage_keys(load_config())
    assert cpu == stage_keys(load_config(overrides={"structure.backend": "opencv"}))
    assert STAGE_DEFINITIONS["structure"].params(load_config()).backend == "opencv"
    monkeypatch.setattr(stages, "cuda_available", lambda: True)
    gpu = stage_keys(load_config())
    assert gpu == stage_keys(load_config(overrides={"structure.backend": "kornia"}))
    assert gpu["structure"] != cpu["structure"] and gpu["ingest"] == cpu["ingest"]
    # regions: auto is the weight-free grouping proposer without a SAM model or checkpoint, SAM with one
    assert STAGE_DEFINITIONS["regions"].params(load_config()).method == "grouping"
    with_sam = load_config(overrides={"regions.sam_model": "facebook/sam-vit-base"})
    assert STAGE_DEFINITIONS["regions"].params(with_sam).method == "sam"
    assert stage_keys(with_sam)["regions"] != cpu["regions"]


def test_model_identity_follows_a_local_folder_and_a_cached_hub_snapshot(tmp_path, monkeypatch):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"1234")
    first = model_identity(str(folder))
    model_identity.cache_clear()
    (folder / "model.safetensors").write_bytes(b"123456")
    assert model_identity(str(folder)) != first
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model_identity.cache_clear()
    assert model_identity("org/name") == {"id": "org/name", "revision": None}
    ref = tmp_path / "hub" / "models--org--name" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("abc123\n")
    model_identity.cache_clear()
    assert model_identity("org/name") == {"id": "org/name", "revision": "abc123"}
    model_identity.cache_clear()


def test_every_train_key_reaches_the_trainer():
    config = load_config()
    definition = STAGE_DEFINITIONS["train"]
    arguments = train_arguments(config.model.clip_model, definition.params(config).train, definition.runtime(config))
    from structxlip.app.train import Objective, train

    accepted = set(inspect.signature(train).parameters)
    assert set(arguments) <= accepted
    assert isinstance(arguments["objective"], Objective)
    assert arguments["objective"].lambda_structure_centric == config.train.lambda_structure_centric
    assert arguments["epochs"] == config.train.epochs and arguments["device"] == config.train.device
    with pytest.raises(TypeError, match="not_a_trainer_argument"):
        train_arguments("m", {**definition.params(config).train, "not_a_trainer_argument": 1}, {})


def test_parse_stages_orders_and_rejects_unknown():
    assert parse_stages("manifest,ingest") == ["ingest", "manifest"]
    with pytest.raises(ValueError, match="got bogus"):
        parse_stages(["ingest", "bogus"])


def test_stage_definitions_import_no_prefect_torch_or_spacy():
    code = ("import sys, pipelines.engine.stages, pipelines.engine.plan, pipelines.engine.execute; "
            "print(sorted(m for m in ('prefect', 'torch', 'spacy') if m in sys.modules))")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_module_version_is_read_without_import_and_matches_the_module(tmp_path, monkeypatch):
    assert module_version("pipelines.steps.manifest") == importlib.import_module("pipelines.steps.manifest").VERSION
    package = tmp_path / "fakepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text('"""doc"""\nimport not_installed_anywhere\nVERSION = "7b"\n')
    (package / "bare.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_version("fakepkg.stage") == "7b"  # read from source: the broken import never runs
    assert module_version("fakepkg.bare") == "0"
    assert module_version("fakepkg.absent") == "missing"
    assert "fakepkg.stage" not in sys.modules
    assert stages.module_version is module_version


def test_a_stage_key_covers_the_versions_of_what_its_run_imports(monkeypatch):
    """Keys from imports: bumping the grouping proposer's VERSION recomputes regions and every later stage, nothing
    before; the modules are found from the imports (regions reaches pipelines.steps.grouping and
    pipelines.steps.images)."""
    from configs import load_config
    from pipelines.engine import stages
    covered = stages.imported_modules(STAGE_DEFINITIONS["regions"].modules)
    assert {"pipelines.steps.regions", "pipelines.steps.grouping", "pipelines.steps.images"} <= set(covered)
    assert not {"pipelines.engine.stages", "pipelines.engine.execute"} & set(covered)  # the engine is not a result
    train = stages.imported_modules(STAGE_DEFINITIONS["train"].modules)
    assert {"structxlip.losses", "structxlip.data", "structxlip.models", "structxlip.text"} <= set(train)
    assert all(module_version(name) not in ("0", "missing") for name in ("structxlip.app.train", "structxlip.losses",
                                                                          "structxlip.data", "structxlip.metrics"))
    config = load_config(overrides={"model.clip_model": "structxlip/tiny-clip", "regions.method": "grouping"})
    before = stage_keys(config)
    real = stages.module_version
    monkeypatch.setattr(stages, "module_version",
                        lambda name: "bumped" if name == "pipelines.steps.grouping" else real(name))
    after = stage_keys(config)
    assert [s for s in before if before[s] == after[s]] == ["ingest", "structure"]
    assert [s for s in before if before[s] != after[s]] == ["regions", "captions", "filter", "manifest", "train",
                                                           "evaluate"]

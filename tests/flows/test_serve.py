"""Deployments built for ``structxlip serve``: every flow, addressed by module path, with the served config."""

from __future__ import annotations

import importlib
import types

import pytest

from flows import serve


def test_discover_flows_finds_the_parent_every_stage_and_the_ablation_in_order():
    from prefect import Flow

    flows = serve.discover_flows()
    assert list(flows) == ["structxlip-pipeline", "ingest", "structure", "regions", "captions", "filter", "manifest",
                           "train", "evaluate", "structxlip-ablation"]
    assert all(isinstance(flow, Flow) and flow.name == name for name, flow in flows.items())


def test_discover_flows_names_what_is_missing(monkeypatch):
    from prefect import flow

    fake = types.ModuleType("fake_flows_module")
    fake.ingest = flow(name="ingest")(lambda images_dir: None)
    monkeypatch.setitem(importlib.sys.modules, "fake_flows_module", fake)
    with pytest.raises(RuntimeError, match=r"\['structxlip-pipeline', 'structure'.*not found in fake_flows_module"):
        serve.discover_flows(("fake_flows_module",))


def test_deployments_use_module_paths_and_the_served_config(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("{}")
    flows = serve.discover_flows()
    deployments = serve.build_deployments(flows, config_path=str(config), version="1.2.3")
    assert [d.name for d in deployments] == ["all-stages"] + [f"{name}-stage" for name in list(flows)[1:-1]] + [
        "ablation"]
    assert len({d.name for d in deployments}) == len(flows)  # unique and descriptive, not nine "default"s
    for deployment, (name, flow) in zip(deployments, flows.items()):
        assert deployment.flow_name == name and deployment.version == "1.2.3"
        # A module path resolves from any working folder (the runner's subprocess imports it).
        module_name, _, attribute = deployment.entrypoint.rpartition(".")
        assert getattr(importlib.import_module(module_name), attribute) is flow
        assert deployment.parameters == {"config_path": str(config.resolve())}
        is_stage = name not in ("structxlip-pipeline", "structxlip-ablation")
        assert "structxlip" in deployment.tags and (("stage" in deployment.tags) == is_stage)
    assert serve.build_deployments(flows)[0].parameters == {}


def test_serve_without_a_server_is_one_clear_error(capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PREFECT_API_URL" in err[0] and err[0].startswith("structxlip serve: error:")


def test_serve_rejects_a_bad_config_and_limit(tmp_path, capsys):
    from flows.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("structure: {canny_low: 300, canny_high: 100}\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "canny_low" in capsys.readouterr().err
    assert main(["serve", "--limit", "0"]) == 2
    assert "--limit must be a positive" in capsys.readouterr().err


def test_prefect_yaml_is_generated_from_the_flows():
    """prefect.yaml declares exactly the flows' deployments (names, entrypoints, descriptions): regenerate it with
    `python -m flows.serve > prefect.yaml` after changing a flow."""
    from pathlib import Path

    import yaml

    committed = (Path(__file__).resolve().parents[2] / "prefect.yaml").read_text()
    assert committed == serve.render_prefect_yaml()
    document = yaml.safe_load(committed)
    flows = serve.discover_flows()
    assert [d["flow_name"] for d in document["deployments"]] == list(flows)
    for deployment in document["deployments"]:
        module, _, attribute = deployment["entrypoint"].partition(":")
        loaded = importlib.import_module(module.removesuffix(".py").replace("/", "."))
        assert getattr(loaded, attribute) is flows[deployment["flow_name"]]
    assert "pull" not in document  # `prefect deploy` records the folder it runs in: a checkout, or /app in Docker

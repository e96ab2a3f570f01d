"""The ablation library: variant objectives, data preparation routes, the mean ± std table, and an end-to-end run on a
tiny random CLIP that is resumable (finished runs are not repeated)."""

from __future__ import annotations

import json

import pytest
import yaml

import structxlip.app.ablate as ablation
from structxlip.app.ablate import (
    VARIANTS,
    AblationData,
    ablate,
    mean_std,
    parse_variants,
    prepare_data,
    summarise,
    table_markdown,
    variant_objective,
)
from structxlip.models import TINY_CLIP
from structxlip.app.shapes_benchmark import make_benchmark
from structxlip.app.train import Objective
from tests.benchmark_manifest import benchmark_manifest


def test_variants_switch_off_exactly_the_other_structure_terms():
    base = Objective(lambda_global=1.0, lambda_structure_centric=0.5, lambda_consistency=0.05, lambda_local=0.1)
    weights = {name: (o.lambda_global, o.lambda_structure_centric, o.lambda_consistency, o.lambda_local)
               for name, o in ((v, variant_objective(base, v)) for v in VARIANTS if v != "zero-shot")}
    assert weights == {
        "global": (1.0, 0.0, 0.0, 0.0),
        "global+structure_centric": (1.0, 0.5, 0.0, 0.0),
        "global+consistency": (1.0, 0.0, 0.05, 0.0),
        "global+local": (1.0, 0.0, 0.0, 0.1),
        "full": (1.0, 0.5, 0.05, 0.1),
    }
    with pytest.raises(ValueError):
        variant_objective(base, "zero-shot")


def test_parse_variants():
    assert parse_variants(None) == list(VARIANTS)
    assert parse_variants("full, global,full") == ["full", "global"]
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variants("global,typo")


def test_mean_std_by_hand():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}


def _result(variant, seed, r1, steps=10):
    metrics = {"n_pairs": 20, "n_structure_pairs": 20}
    metrics |= {f"{d}/R@{k}": r1 * k for d in ("t2i", "i2t", "s2t", "t2s", "ts2i") for k in (1, 5)}
    return {"variant": variant, "seed": seed, "metrics": metrics, "train_seconds": 30.0 + seed, "steps": steps,
            "epoch_loss": [4.0 + seed, 2.0]}


def test_table_is_mean_and_std_over_seeds():
    table = summarise([_result("global", 0, 10.0), _result("global", 1, 20.0), _result("full", 0, 5.0),
                       _result("full", 1, 5.0)])
    assert list(table) == ["global", "full"]
    assert table["global"]["metrics"]["t2i/R@1"]["mean"] == pytest.approx(15.0)
    assert table["global"]["metrics"]["t2i/R@1"]["std"] == pytest.approx(50 ** 0.5)  # sample std of 10, 20
    assert table["global"]["first_epoch_loss"]["mean"] == pytest.approx(4.5)
    assert table["full"]["n_pairs"] == 20
    markdown = table_markdown(table)
    assert "| global | 2 | 20 | 15.0 ± 7.1 |" in markdown
    assert "| full | 2 | 20 | 5.0 ± 0.0 |" in markdown


def test_prepare_data_routes(tmp_path):
    calls = []

    def fake_pipeline(images_dir, out_dir, *, config_path):
        ratios = yaml.safe_load(open(config_path))["manifest"]["split_ratios"] if config_path else None
        calls.append((images_dir.name, out_dir.relative_to(tmp_path).as_posix(), ratios))

    bench = make_benchmark(tmp_path / "bench", images=10, seed=0)
    data = prepare_data(bench.root, tmp_path / "out" / "data", config_path=None, run_pipeline=fake_pipeline)
    assert data == AblationData(tmp_path / "out" / "data" / "train", tmp_path / "out" / "data" / "test", "test")
    assert calls == [("train", "out/data/train", {"train": 1.0, "val": 0.0, "test": 0.0}),
                     ("test", "out/data/test", {"train": 0.0, "val": 0.0, "test": 1.0})]
    calls.clear()
    plain = prepare_data(bench.split_dirs["train"], tmp_path / "plain", config_path=None, run_pipeline=fake_pipeline)
    assert calls == [("train", "plain", None)] and plain.train_manifest == plain.test_manifest == tmp_path / "plain"
    calls.clear()
    manifest = benchmark_manifest(bench.root, tmp_path / "gt")
    assert prepare_data(tmp_path / "gt", tmp_path / "unused", config_path=None, run_pipeline=fake_pipeline) == \
        AblationData(tmp_path / "gt", tmp_path / "gt")
    assert prepare_data(manifest, tmp_path / "unused", config_path=None, run_pipeline=fake_pipeline).train_manifest \
        == manifest
    assert calls == []


def test_ablation_end_to_end_is_resumable(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTXLIP_CACHE", str(tmp_path / "cache"))
    make_benchmark(tmp_path / "bench", images=12, seed=0, test_fraction=0.25, image_size=64)
    manifest_dir = tmp_path / "data"
    benchmark_manifest(tmp_path / "bench", manifest_dir)
    data = AblationData(manifest_dir, manifest_dir)
    options = dict(epochs=1, batch_size=4, lr=1e-3, max_text_tokens=77, precision="fp32", device="cpu",
                   progress=False)
    eval_options = dict(max_text_tokens=77, precision="fp32", device="cpu")
    run = dict(clip_model=TINY_CLIP, variants=["zero-shot", "global", "full"], seeds=[0, 1], objective=Objective(),
               train_options=options, eval_options=eval_options, command="structxlip ablate test")
    result = ablate(data, tmp_path / "out", **run)
    assert [(r["variant"], r["seed"]) for r in result.results] == \
        [(v, s) for s in (0, 1) for v in ("zero-shot", "global", "full")]
    assert all(r["metrics"]["n_pairs"] == 3 for r in result.results)
    assert result.results[0]["steps"] == 0 and result.results[1]["steps"] in (2, 3)  # 9 train pairs, batch 4
    # Seeds give different initial weights; variants of one seed start from the same ones.
    initials = {(r["variant"], r["seed"]): r["initial_model"] for r in result.results}
    assert initials[("global", 0)] == initials[("full", 0)] != initials[("global", 1)]
    saved = json.loads(result.json_path.read_text())
    assert saved["table"]["global"]["seeds"] == [0, 1] and saved["seeds"] == [0, 1]
    assert result.markdown_path.read_text().startswith("`structxlip ablate test`")
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("structxlip.app.train.train", no_training)
    monkeypatch.setattr("structxlip.app.evaluate.evaluate", no_training)
    again = ablate(data, tmp_path / "out", **run)
    assert again.table == result.table
    assert ablation.RESULT_FILE == "result.json"


def test_cli_make_benchmark_then_ablate_a_manifest(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("STRUCTXLIP_CACHE", str(tmp_path / "cache"))
    assert main(["make-benchmark", str(tmp_path / "bench"), "--images", "10", "--seed", "2", "--image-size", "64"]) == 0
    assert "train 8" in capsys.readouterr().out
    benchmark_manifest(tmp_path / "bench", tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"clip_model": TINY_CLIP},
                                      "train": {"batch_size": 4, "max_text_tokens": 77, "device": "cpu"}}))
    assert main(["ablate", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--config", str(config),
                 "--variants", "zero-shot,global", "--seeds", "1", "--epochs", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| zero-shot | 1 | 2 |" in printed and "| global | 1 | 2 |" in printed
    assert (tmp_path / "out" / "runs" / "global" / "seed-0" / "result.json").is_file()
    assert main(["ablate", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--variants", "nope"]) == 2


def test_a_finished_run_with_other_settings_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTXLIP_CACHE", str(tmp_path / "cache"))
    make_benchmark(tmp_path / "bench", images=8, seed=0, test_fraction=0.25, image_size=64)
    benchmark_manifest(tmp_path / "bench", tmp_path / "data")
    data = AblationData(tmp_path / "data", tmp_path / "data")
    run = dict(clip_model=TINY_CLIP, variants=["zero-shot"], seeds=[0], objective=Objective(), train_options={})
    ablate(data, tmp_path / "out", eval_options=dict(max_text_tokens=77, device="cpu"), **run)
    with pytest.raises(ValueError, match="other settings"):
        ablate(data, tmp_path / "out", eval_options=dict(max_text_tokens=77, device="cpu", batch_size=2), **run)


@pytest.mark.e2e
# Long; the ablation flow test runs the same pipeline path in CI.
@pytest.mark.slow
def test_cli_ablate_runs_the_real_pipeline_on_a_benchmark_folder(tmp_path, monkeypatch, capsys):
    """The user's route: make-benchmark, then ablate on the folder (both splits go through `structxlip run`)."""
    from flows.cli import main

    monkeypatch.setenv("STRUCTXLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # relative paths, from a folder other than the repository
    assert main(["make-benchmark", "bench", "--images", "10", "--seed", "0", "--image-size", "64"]) == 0
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"clip_model": TINY_CLIP}, "regions": {"method": "structure"},
                                      "filter": {"remove_textures": True},
                                      "train": {"batch_size": 4, "max_text_tokens": 77, "device": "cpu"}}))
    assert main(["ablate", "bench", "--out", "out", "--config", "tiny.yaml", "--variants", "zero-shot,full",
                 "--seeds", "1", "--epochs", "1", "--no-progress"]) == 0
    table = json.loads((tmp_path / "out" / "ablation.json").read_text())["table"]
    assert table["full"]["n_pairs"] == 2 and table["zero-shot"]["n_pairs"] == 2
    from storage.manifest import read_manifest

    rows = read_manifest(tmp_path / "out" / "data" / "train").to_pylist()
    assert {row["split"] for row in rows} == {"train"} and len(rows) == 8
    assert all("striped" not in row["filtered_caption"] and "red" not in row["filtered_caption"].split()
               for row in rows)
    assert {row["split"] for row in read_manifest(tmp_path / "out" / "data" / "test").to_pylist()} == {"test"}


@pytest.mark.e2e
def test_the_ablation_flow_runs_the_pipeline_as_a_subflow_and_publishes_its_table(tmp_path, monkeypatch, prefect_api):
    """The Prefect flow (what the `structxlip-ablation/ablation` deployment runs): data through the pipeline flow,
    one task per variant and seed, the table and plot as an artifact read back through the client."""
    from prefect import get_client

    from flows.ablation import structxlip_ablation

    monkeypatch.setenv("STRUCTXLIP_CACHE", str(tmp_path / "cache"))
    make_benchmark(tmp_path / "bench", images=10, seed=0, image_size=64)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"clip_model": TINY_CLIP}, "regions": {"method": "structure"},
                                      "train": {"batch_size": 4, "max_text_tokens": 77, "device": "cpu"}}))
    table = structxlip_ablation(source=str(tmp_path / "bench"), out_dir=str(tmp_path / "out"),
                                config_path=str(config), variants=["zero-shot", "global"], seeds=1, epochs=1)
    assert set(table) == {"zero-shot", "global"} and table["global"]["n_pairs"] == 2
    assert (tmp_path / "out" / "data" / "train" / "stages").is_dir()  # the pipeline's store: cached data prep
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # filtered: the session's server holds many other artifacts
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="ablation-out-%")))
    assert found and "zero-shot" in found[-1].data and "data:image/png;base64," in found[-1].data

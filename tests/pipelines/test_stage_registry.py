"""The stage registry and stage plugins: a plugin file's stage is placed after its upstream, keyed by its file's
content, validated like a built-in section, and a broken plugin is one line before any work. The example plugin's
XDoG drawing is checked against hand-computable cases."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from configs import ConfigError, load_config
from configs.plugins import import_plugin
from pipelines.engine.stages import STAGE_DEFINITIONS, data_stage_names, parse_stages, registry, stage_keys
from tests.test_import_graph import PACKAGES, ROOT, project_modules

EXAMPLE = ROOT / "examples" / "stage_plugin"
PLUGIN = EXAMPLE / "xdog.py"


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ---- the example plugin's drawing ------------------------------------------------------------------------------
def test_xdog_of_a_flat_image_is_blank_paper():
    xdog = import_plugin(str(PLUGIN)).xdog
    for value in (0, 90, 255):
        assert (xdog(np.full((24, 32), value, np.uint8)) == 255).all()


def test_xdog_draws_a_line_on_the_dark_side_of_a_step_edge_and_nothing_elsewhere():
    xdog = import_plugin(str(PLUGIN)).xdog
    grey = np.full((20, 40), 50, np.uint8)
    grey[:, 20:] = 200  # a vertical step between columns 19 and 20
    drawing = xdog(grey)
    # Independently: at column 19, G_0.8 = 50 + 150 * Phi(-0.5 / 0.8) ~ 90 and G_1.28 ~ 102 (of 255), so
    # D = (90 - 0.98 * 102) / 255 ~ -0.04 < epsilon: a dark line (1 + tanh(100 * -0.03) ~ 0.005).
    assert (drawing[:, 19] < 20).all(), drawing[0]
    assert (drawing[:, :16] == 255).all() and (drawing[:, 22:] == 255).all(), drawing[0]
    assert np.array_equal(drawing, drawing[:1].repeat(20, axis=0))  # the same on every row


# ---- placing and keying a plugin -------------------------------------------------------------------------------
def test_a_plugin_comes_right_after_its_upstream_and_feeds_the_manifest():
    config = load_config(EXAMPLE / "config.yaml")
    stages = registry(config)
    assert list(stages) == ["ingest", "xdog", "structure", "regions", "captions", "filter", "manifest", "train",
                            "evaluate"]
    assert stages["manifest"].upstream == ("filter", "xdog")
    assert STAGE_DEFINITIONS["manifest"].upstream == ("filter",)  # the built-in definition is untouched
    assert data_stage_names(config) == list(stages)[:7]
    assert parse_stages("manifest,xdog", list(stages)) == ["xdog", "manifest"]
    with pytest.raises(ValueError, match="got xdog"):
        parse_stages("xdog")  # not a stage without the plugin


def test_plugin_keys_cover_its_file_and_params_and_leave_the_built_in_stages_alone(tmp_path):
    demo = stage_keys(load_config(ROOT / "configs" / "demo.yaml"))
    plugin = tmp_path / "xdog.py"
    shutil.copy(PLUGIN, plugin)
    config_path = _config(tmp_path, f"extends: {ROOT / 'configs' / 'demo.yaml'}\nplugins: [xdog.py]\n")
    keys = stage_keys(load_config(config_path))
    # Adding the plugin: only the manifest (which now reads it) and what follows change.
    assert [s for s in demo if keys[s] != demo[s]] == ["manifest", "train", "evaluate"]
    sigma = stage_keys(load_config(config_path, {"xdog.sigma": 1.2}))
    plugin.write_text(plugin.read_text() + "\n# an edit\n")
    edited = stage_keys(load_config(config_path))
    for changed in (sigma, edited):
        assert [s for s in keys if changed[s] != keys[s]] == ["xdog", "manifest", "train", "evaluate"]


# ---- one-line errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source, expected", [
    ("raise RuntimeError('no GPU here')", "the plugin failed to import (RuntimeError: no GPU here)"),
    ("def broken(:\n", "the plugin failed to import (SyntaxError"),
    ("x = 1\n", "defines no stage"),
])
def test_a_plugin_that_cannot_be_used_is_one_line_at_config_load(tmp_path, source, expected):
    (tmp_path / "bad.py").write_text(source)
    with pytest.raises(ConfigError) as failure:
        load_config(_config(tmp_path, "plugins: [bad.py]\n"))
    message = str(failure.value)
    assert expected in message and "\n" not in message and message.startswith(str(tmp_path / "config.yaml"))


def test_a_bad_stage_definition_is_one_line_before_any_work(tmp_path):
    text = PLUGIN.read_text()
    (tmp_path / "upstream.py").write_text(text.replace('upstream = ("ingest",)', 'upstream = ("nowhere",)'))
    (tmp_path / "late.py").write_text(text.replace('upstream = ("ingest",)', 'upstream = ("train",)'))
    (tmp_path / "clash.py").write_text(text.replace('name = "xdog"', 'name = "structure"'))
    for name, expected in (("upstream", "its upstream 'nowhere' is no stage"),
                           ("late", "must come before the manifest")):
        with pytest.raises(ValueError, match=expected):
            registry(load_config(_config(tmp_path, f"plugins: [{name}.py]\n")))
    with pytest.raises(ConfigError, match="has the name of a built-in config section"):
        load_config(_config(tmp_path, "plugins: [clash.py]\n"))
    with pytest.raises(ConfigError, match=r"xdog\.sigma: Input should be greater than 0"):
        load_config(_config(tmp_path, f"plugins: [{PLUGIN}]\nxdog: {{sigma: -1}}\n"))


def test_no_project_module_names_the_plugin():
    named = [name for name, path in project_modules(ROOT, PACKAGES).items()
             if "xdog" in path.read_text(encoding="utf-8").lower()]
    assert named == []


def test_a_stage_reads_only_the_rows_of_the_stages_it_depends_on(tmp_path):
    from pipelines.engine.execute import run_inline
    from pipelines.engine.plan import Pipeline
    from tests.corpus import make_generated_images

    images = tmp_path / "images"
    make_generated_images(images, 2, size=(64, 48))
    listing = '        return [(image["image_id"], image) for image in pipeline.images]'
    assert listing in PLUGIN.read_text()
    (tmp_path / "peek.py").write_text(PLUGIN.read_text().replace(listing, '        pipeline.done_rows("regions")\n' + listing))
    pipeline = Pipeline(images, tmp_path / "out", load_config(_config(tmp_path, "plugins: [peek.py]\n")))
    with pytest.raises(LookupError, match=r"^stage xdog read the rows of stage regions, which it does not depend on "
                                          r"\(its upstream stages: ingest\): add regions to its upstream$"):
        pipeline.items("xdog")
    # The real plugin reads what it declares; the manifest, downstream of every data stage, reads them all.
    pipeline = Pipeline(images, tmp_path / "out", load_config(_config(tmp_path, f"plugins: [{PLUGIN}]\n")))
    run_inline(pipeline, ["ingest", "xdog"])
    assert len(pipeline.items("xdog")) == 2
    (record,) = pipeline.items("manifest").values()
    assert [row["xdog_path"] is not None for row in record["rows"]] == [True, True]

"""An invalid config is refused by the CLI before any work: one stderr line naming the file and the key, exit code 2,
and the output folder is never created (``run`` and ``train`` alike)."""

from __future__ import annotations

import pytest

from tests.hardening.conftest import DATA_STAGES, assert_one_line_error, run_cli

# (YAML text, dotted key the message must name, words the message must hold)
BAD_CONFIGS = {
    "unknown_key": ("structure: {canny_lowe: 40}\n", "structure.canny_lowe", "unknown key"),
    "wrong_type": ("runtime: {chunk_size: many}\n", "runtime.chunk_size", "'many'"),
    "negative_batch_size": ("captions: {batch_size: -4}\n", "captions.batch_size", "greater than 0"),
    "missing_checkpoint": ("regions: {method: sam, sam_checkpoint: /nonexistent/sam_vit_b.pth}\n",
                           "regions.sam_checkpoint", "/nonexistent/sam_vit_b.pth"),
    "yaml_syntax": ("model: {clip_model: [unclosed\n", "invalid YAML at line", "expected"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_run_refuses_a_bad_config_in_one_line_before_any_work(case, tmp_path, no_server_env):
    text, key, words = BAD_CONFIGS[case]
    config = tmp_path / f"{case}.yaml"
    config.write_text(text)
    (tmp_path / "images").mkdir()
    out = tmp_path / "out"
    done = run_cli(no_server_env, "run", str(tmp_path / "images"), "--out", str(out), "--config", str(config),
                   "--stages", ",".join(DATA_STAGES), timeout=120)
    line = assert_one_line_error(done, "structxlip run: error:", str(config), key, words)
    assert line.count(str(config)) == 1
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


@pytest.mark.parametrize("case", ["negative_batch_size"])
def test_train_refuses_a_bad_config_before_reading_the_manifest(case, tmp_path, no_server_env):
    text, key, words = BAD_CONFIGS[case]
    config = tmp_path / f"{case}.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    # The manifest does not exist either: the config is checked first, so its error is the one reported.
    done = run_cli(no_server_env, "train", str(tmp_path / "no-manifest"), "--out", str(out), "--config", str(config),
                   timeout=120)
    assert_one_line_error(done, "structxlip train: error:", str(config), key, words)
    assert not out.exists()


def test_a_missing_config_file_is_one_line(tmp_path, no_server_env):
    (tmp_path / "images").mkdir()
    done = run_cli(no_server_env, "run", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--config",
                   str(tmp_path / "absent.yaml"), timeout=120)
    assert_one_line_error(done, str(tmp_path / "absent.yaml"), "config file not found")
    assert not (tmp_path / "out").exists()

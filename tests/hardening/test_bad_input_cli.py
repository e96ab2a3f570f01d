"""The bad-input corpus through the real CLI, once: every file ends as a manifest row with the expected status and
reason (or, for a duplicate, is reported and left out), the run exits cleanly, and nothing else is lost. An empty or
missing images folder is refused with one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from storage.layout import OutputLayout
from storage.manifest import read_manifest
from tests.corpus import NON_UTF8_KEY, make_generated_images
from tests.hardening.conftest import DATA_STAGES, assert_one_line_error, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def manifest(corpus_run) -> dict[str, dict]:
    """Manifest rows of the corpus run by file path relative to the corpus folder (after the run succeeded)."""
    done = corpus_run.done
    assert done.returncode == 0, f"CLI failed ({done.returncode}):\n{done.stderr[-4000:]}"
    rows = read_manifest(corpus_run.out).to_pylist()
    return {Path(r["source_path"]).relative_to(corpus_run.folder).as_posix(): r for r in rows}


def _images(expected) -> dict:
    return {name: e for name, e in expected.items() if e.kind == "image"}


def test_the_run_exits_cleanly_and_reports_without_tracebacks(corpus_run, manifest):
    stdout, stderr = corpus_run.done.stdout, corpus_run.done.stderr
    assert "Traceback" not in stdout + stderr, stderr[-4000:]
    assert "stage      processed  cached  failed  seconds" in stdout
    assert "1 duplicate file(s) merged into the row of the same bytes (see duplicate_paths)" in stdout
    # Problems with the folder itself are reported on stderr, one line each, naming the place.
    loop = [line for line in stderr.splitlines() if "loop/parent" in line]
    assert loop and all("symbolic link loop" in line for line in loop), stderr[-3000:]
    broken = [line for line in stderr.splitlines() if "captions.jsonl" in line and "invalid JSON" in line]
    assert broken and all("captions.jsonl line 3: invalid JSON" in line for line in broken), stderr[-3000:]


def test_every_file_has_exactly_one_row_and_nothing_is_lost(corpus_run, manifest):
    images = _images(corpus_run.expected)
    duplicates = {name for name, e in images.items() if e.duplicate_of}
    assert sorted(manifest) == sorted(set(images) - duplicates)
    assert len({r["image_id"] for r in manifest.values()}) == len(manifest)
    assert duplicates == {"dup_b.jpg"} and manifest["dup_a.jpg"]["image_id"]  # the first path is kept
    for name in ("name with spaces.jpg", "ünïcødé_名前.jpg", "loop/inner.jpg", " spaced name .jpg",
                 "folder.png/inside.jpg", NON_UTF8_KEY):
        assert Path(manifest[name]["source_path"]) == corpus_run.folder / name


def test_each_row_has_the_expected_status_reason_and_size(corpus_run, manifest):
    mismatches = []
    for name, outcome in _images(corpus_run.expected).items():
        if outcome.duplicate_of:
            continue
        row = manifest[name]
        error = row["error"] or ""
        if "\n" in error:
            mismatches.append(f"{name}: error is not one line: {error!r}")
        if outcome.status == "failed":
            # An undecodable file fails at ingest with the corpus's reason.
            if row["status"] != "failed" or not error.startswith("ingest: ") or outcome.reason not in error.lower():
                mismatches.append(f"{name}: {row['status']} {error!r}, expected an ingest failure {outcome.reason!r}")
            continue
        if (row["width"], row["height"]) != (outcome.width, outcome.height):
            mismatches.append(f"{name}: {row['width']}x{row['height']}, expected {outcome.width}x{outcome.height}")
        if outcome.final_failure:
            # Ingested fine, then failed for its caption (e.g. no content word): a failed row, not a training pair.
            if row["status"] != "failed" or outcome.final_failure not in error or row["split"] is not None:
                mismatches.append(f"{name}: {row['status']} {error!r}, expected a {outcome.final_failure!r} failure")
            continue
        if outcome.has_caption is False:
            # A valid image without a usable caption is kept as a failed row saying so (README: "no caption").
            if row["status"] != "failed" or not error.startswith("no caption"):
                mismatches.append(f"{name}: {row['status']} {error!r}, expected a 'no caption' failure")
        elif outcome.has_caption:
            if row["status"] != "ok" or row["error"] is not None:
                mismatches.append(f"{name}: {row['status']} {error!r}, expected ok")
            elif outcome.caption_contains not in row["caption"]:
                mismatches.append(f"{name}: caption {row['caption'][:80]!r} lacks {outcome.caption_contains!r}")
        for text in outcome.caption_lacks:
            if text in (row["caption"] or ""):
                mismatches.append(f"{name}: caption {row['caption'][:80]!r} still holds {text!r}")
    assert not mismatches, "\n".join(mismatches)


def test_captions_survive_as_text_and_ok_rows_have_readable_outputs(corpus_run, manifest):
    assert manifest["huge_header.png"]["error"].startswith("ingest: image too large")
    assert len(manifest["caption_long.jpg"]["caption"]) > 10_000  # kept whole; the tokenizer truncates later
    assert "<b>" not in manifest["caption_html.jpg"]["caption"]
    assert "🐶" in manifest["caption_emoji.jpg"]["caption"]
    bad_utf8 = manifest["caption_bad_utf8.jpg"]
    assert bad_utf8["status"] == "ok" and "\ufffd" in bad_utf8["caption"]  # decoded with replacement characters
    empty = manifest["caption_empty.jpg"]["error"]
    assert "caption_empty.txt is empty" in empty, empty
    layout = OutputLayout(corpus_run.out)
    ok = [r for r in manifest.values() if r["status"] == "ok"]
    assert len(ok) == sum(1 for e in _images(corpus_run.expected).values() if e.has_caption is not False
                          and e.status == "ok" and not e.duplicate_of and not e.final_failure)
    for row in ok:
        assert row["filtered_caption"] and row["split"] in ("train", "val", "test"), row
        with Image.open(layout.resolve(row["structure_path"])) as structure:
            assert structure.size == (row["width"], row["height"])
        for segment in row["segments"]:
            assert layout.resolve(segment["crop_path"]).is_file()


def test_the_invalid_utf8_sidecar_is_reported(corpus_run):
    lines = [line for line in corpus_run.done.stderr.splitlines() if "caption_bad_utf8.txt" in line]
    assert lines and "utf-8" in lines[0].lower(), corpus_run.done.stderr[-3000:]


def test_a_missing_images_folder_is_one_line_and_creates_nothing(tmp_path, cli_env):
    out = tmp_path / "out"
    done = run_cli(cli_env, "run", str(tmp_path / "no-such-folder"), "--out", str(out), "--stages", "ingest")
    assert_one_line_error(done, "folder not found", "no-such-folder")
    assert not out.exists()


def test_an_empty_images_folder_is_one_line(tmp_path, cli_env):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    done = run_cli(cli_env, "run", str(tmp_path / "empty"), "--out", str(out), "--stages", ",".join(DATA_STAGES))
    assert_one_line_error(done, "no images", str(tmp_path / "empty"))
    assert not out.exists()


def test_inputs_nobody_planned_for_end_as_rows_with_reasons(corpus_run, manifest):
    # Each is one row with a readable reason; none stopped the run (the other tests check the run went on).
    assert manifest[NON_UTF8_KEY]["status"] == "ok" and manifest[NON_UTF8_KEY]["split"]  # caf\xe9_\xff.jpg trains
    assert manifest["pipe.jpg"]["error"] == "ingest: not an image file: a FIFO (named pipe) named like an image " \
                                            "(pipe.jpg)"
    assert manifest["folder.png"]["error"] == "ingest: not an image file: a folder named like an image (folder.png)"
    assert manifest["strip_1x65000.png"]["error"].startswith("ingest: extreme aspect ratio: 1x65000 is 6.5e+04:1")
    assert manifest["caption_line_separators.jpg"]["caption"] == "A lamp on a desk beside a window at night."
    assert manifest["caption_markup.jpg"]["caption"] == "A dog runs on a beach."
    assert manifest["caption_only_colours.jpg"]["error"] == \
        "filter: no content word left after filtering: only appearance words (red, blue, green)"
    assert manifest["caption_only_punctuation.jpg"]["error"] == \
        "filter: no content word: the caption has only punctuation, numbers or stop words"
    latin1 = [line for line in corpus_run.done.stderr.splitlines() if "captions.jsonl" in line and "UTF-8" in line]
    assert latin1, corpus_run.done.stderr[-3000:]


def test_the_images_folder_as_output_folder_is_one_line_and_writes_nothing(tmp_path, no_server_env):
    """Its maps, crops and reports would be scanned as new images by every later run."""
    images = tmp_path / "images"
    make_generated_images(images, 2, size=(64, 48))
    before = sorted(p.name for p in images.rglob("*"))
    done = run_cli(no_server_env, "run", str(images), "--out", str(images / "."), "--stages", "ingest")
    assert_one_line_error(done, "the output folder is the images folder", str(images))
    assert sorted(p.name for p in images.rglob("*")) == before


def test_an_output_folder_that_is_a_file_is_one_line(tmp_path, no_server_env):
    make_generated_images(tmp_path / "images", 2, size=(64, 48))
    (tmp_path / "out").write_text("a file")
    done = run_cli(no_server_env, "run", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--stages", "ingest")
    assert_one_line_error(done, f"the output folder {tmp_path / 'out'} is a file, not a folder")
    assert (tmp_path / "out").read_text() == "a file"


@pytest.mark.parametrize("which", ["images", "out"])
def test_a_folder_path_that_is_not_utf8_is_one_line(tmp_path, no_server_env, which):
    """Prefect's flow parameters are JSON: a path Python holds with surrogates cannot be sent (the one line shows its
    bytes escaped); nothing is created."""
    odd = tmp_path / os.fsdecode(b"odd\xff")
    images = odd if which == "images" else tmp_path / "images"
    out = odd if which == "out" else tmp_path / "out"
    make_generated_images(images, 2, size=(64, 48))
    done = run_cli(no_server_env, "run", str(images), "--out", str(out), "--stages", "ingest")
    assert_one_line_error(done, "odd\\xff", "not valid UTF-8")
    assert not out.exists()


@pytest.mark.parametrize("value", ["[1,2", "!!python/name:os.system", "a: b: c"])
def test_a_set_value_that_is_not_yaml_is_one_line(tmp_path, no_server_env, value):
    (tmp_path / "images").mkdir()
    done = run_cli(no_server_env, "run", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
                   "--set", f"structure.canny_low={value}")
    assert_one_line_error(done, "--set structure.canny_low:", "is not a YAML value")
    assert not (tmp_path / "out").exists()


def test_a_ctrl_c_while_the_cli_starts_is_one_line(monkeypatch, capsys):
    """Before the command's own handler runs (its imports, the parser), a Ctrl-C still ends in one line and 130."""
    from flows import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["run", "x", "--out", "y"]) == 130
    assert capsys.readouterr().err == "structxlip: interrupted\n"

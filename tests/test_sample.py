"""The bundled demo sample: real photos that decode, one caption source each, long captions, licences recorded."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "sample"
IMAGES = SAMPLE / "images"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _images() -> list[Path]:
    return sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _jsonl_captions() -> dict[str, str]:
    rows = [json.loads(line) for line in (IMAGES / "captions.jsonl").read_text(encoding="utf-8").splitlines() if line]
    names = [row["file"] for row in rows]
    assert len(names) == len(set(names)), "captions.jsonl names a file twice"
    return {row["file"]: row["caption"] for row in rows}


def _make_sample_module():
    spec = importlib.util.spec_from_file_location("make_sample", REPO_ROOT / "scripts" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body runs
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sample_has_12_to_20_images_under_2_mb():
    images = _images()
    assert 12 <= len(images) <= 20
    total = sum(p.stat().st_size for p in IMAGES.iterdir())
    assert total < 2_000_000, f"sample is {total} bytes"


@pytest.mark.parametrize("path", _images(), ids=lambda p: p.name)
def test_image_decodes_with_long_side_at_most_640(path):
    with Image.open(path) as image:
        image.load()
        assert image.mode in ("RGB", "L")
        assert max(image.size) <= 640 and min(image.size) >= 100


def test_every_image_has_exactly_one_caption_source_of_30_plus_words():
    jsonl = _jsonl_captions()
    image_names = {p.name for p in _images()}
    assert set(jsonl) <= image_names, f"captions for missing files: {set(jsonl) - image_names}"
    sidecars = 0
    for path in _images():
        sidecar = path.with_suffix(".txt")
        sources = [path.name in jsonl, sidecar.exists()]
        assert sum(sources) == 1, f"{path.name}: expected exactly one caption source, got jsonl={sources[0]} " \
                                  f"sidecar={sources[1]}"
        caption = jsonl[path.name] if sources[0] else sidecar.read_text(encoding="utf-8").strip()
        words = re.findall(r"\w+", caption)
        assert len(words) >= 30, f"{path.name}: caption has {len(words)} words"
        sidecars += sources[1]
    assert 1 <= sidecars <= 2  # both caption paths are exercised


def test_licence_file_credits_every_image():
    licence = (SAMPLE / "LICENSE.md").read_text(encoding="utf-8")
    for path in _images():
        assert f"`{path.name}`" in licence, f"{path.name} missing from sample/LICENSE.md"


def test_shipped_captions_match_the_generating_script():
    make_sample = _make_sample_module()
    jsonl = _jsonl_captions()
    shipped = {Path(name).stem: caption for name, caption in jsonl.items()}
    for stem in make_sample.SIDECAR:
        shipped[stem] = (IMAGES / f"{stem}.txt").read_text(encoding="utf-8").strip()
    assert shipped == make_sample.CAPTIONS
    assert {p.stem for p in _images()} == {s.name for s in make_sample.SOURCES}

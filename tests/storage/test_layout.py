"""OutputLayout paths (relative <-> absolute, escapes refused) and atomic writes."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from storage.atomic import atomic_path, atomic_write_text, atomic_writer, write_png
from storage.layout import OutputLayout, PathEscapeError


def test_relative_and_resolve_round_trip(tmp_path):
    layout = OutputLayout(tmp_path / "out")
    path = layout.structure_map("ab" + "0" * 30, "key1", "canny")
    assert path == layout.root / "maps" / "key1" / "ab" / ("ab" + "0" * 30 + ".canny.png")
    relative = layout.relative(path)
    assert relative == f"maps/key1/ab/{'ab' + '0' * 30}.canny.png"
    assert layout.resolve(relative) == path
    assert layout.resolve(None) is None
    # ".." that stays inside the root is fine and normalised.
    assert layout.resolve("maps/../crops/x.jpg") == layout.root / "crops" / "x.jpg"


@pytest.mark.parametrize("bad", ["../../etc/passwd", "../out-sibling/file.png", "maps/../../x"])
def test_resolve_refuses_paths_escaping_the_root(tmp_path, bad):
    layout = OutputLayout(tmp_path / "out")
    with pytest.raises(PathEscapeError, match="escapes"):
        layout.resolve(bad)


def test_resolve_refuses_absolute_paths(tmp_path):
    with pytest.raises(PathEscapeError, match="absolute"):
        OutputLayout(tmp_path).resolve("/etc/passwd")


def test_relative_refuses_paths_outside_the_root(tmp_path):
    with pytest.raises(ValueError):
        OutputLayout(tmp_path / "out").relative(tmp_path / "elsewhere.png")


def test_checkpoint_and_crop_paths(tmp_path):
    layout = OutputLayout(tmp_path)
    assert layout.checkpoint("last") == tmp_path.resolve() / "train" / "checkpoints" / "last.pt"
    assert layout.crop("cd" * 16, "r", 7).name == "007.jpg"
    assert layout.structure_crop("cd" * 16, "r", 7).name == "007.structure.png"


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_writer_keeps_old_content_on_error_and_leaves_no_temp(tmp_path):
    target = tmp_path / "data.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_writer(target, "w") as handle:
            handle.write("half-written new content")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_success_replaces_and_error_keeps(tmp_path):
    target = tmp_path / "file.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"v1")
    assert target.read_bytes() == b"v1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"v2")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"v1"
    assert sorted(os.listdir(tmp_path)) == ["file.bin"]


def test_write_png_round_trip_and_bad_input(tmp_path):
    import cv2

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    path = write_png(tmp_path / "g.png", grey)
    np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), grey)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 255  # red in RGB order must come back red
    back = cv2.cvtColor(cv2.imread(str(write_png(tmp_path / "c.png", rgb))), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "bad.png", grey.astype(np.float32))
    assert not (tmp_path / "bad.png").exists()


def test_atomic_directory_replaces_whole_folder_or_keeps_the_old_one(tmp_path):
    from storage.atomic import atomic_directory

    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "b.txt").write_text("half")
            raise RuntimeError("crash while saving")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # old folder untouched

    with atomic_directory(target) as staging:
        (staging / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or retired folders left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_replacing_a_folder_starts_no_process(tmp_path, monkeypatch):
    """The exchange's libc lookup (ctypes.util.find_library runs `ldconfig -p` in a subprocess) happens once per
    process, not once per replaced folder (per image when regions are recomputed)."""
    import subprocess

    from storage import atomic

    target = tmp_path / "crops"
    with atomic.atomic_directory(target) as staging:
        (staging / "000.jpg").write_bytes(b"old")
    atomic._renameat2()  # looked up once, as a run's first replacement does
    exchanged = []
    monkeypatch.setattr(atomic, "exchange_directories",
                        lambda a, b, real=atomic.exchange_directories: exchanged.append(real(a, b)) or exchanged[-1])

    def no_process(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    for round_ in range(3):
        with atomic.atomic_directory(target) as staging:
            (staging / "000.jpg").write_bytes(b"new %d" % round_)
    assert exchanged == [True, True, True]  # replaced by the atomic exchange each time
    assert [p.read_bytes() for p in target.iterdir()] == [b"new 2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops"]

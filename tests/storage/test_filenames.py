"""storage.filenames: names that are not UTF-8 stored readably and found again."""

from __future__ import annotations

import json
import os
from pathlib import Path

from storage.filenames import display_path, has_undecodable_bytes, source_file, storable_path


def test_undecodable_bytes_are_written_as_backslash_x_and_resolved_back(tmp_path):
    raw = os.fsencode(tmp_path) + b"/r\xe9sum\xe9 \xff.jpg"
    with open(raw, "wb") as handle:
        handle.write(b"x")
    (path,) = [p for p in tmp_path.iterdir()]
    assert has_undecodable_bytes(path)
    stored = storable_path(path)
    assert stored == f"{tmp_path}/r\\xe9sum\\xe9 \\xff.jpg" and display_path(path) == stored
    json.dumps(stored).encode("utf-8")  # valid UTF-8 text
    assert os.fsencode(source_file(stored)) == raw and source_file(stored).read_bytes() == b"x"


def test_valid_names_are_unchanged_and_an_exact_name_wins(tmp_path):
    for name in ("plain.jpg", "ünïcødé 名前.jpg", "literal \\xff.jpg"):
        (tmp_path / name).write_bytes(b"y")
        assert storable_path(tmp_path / name) == str(tmp_path / name)
        assert source_file(str(tmp_path / name)) == tmp_path / name  # exists as written: taken as is
    assert not has_undecodable_bytes(tmp_path / "literal \\xff.jpg")
    # Only bytes >= 0x80 are ever escaped: "\x41" in a stored name is literal text.
    assert source_file(f"{tmp_path}/missing \\x41.jpg") == tmp_path / "missing \\x41.jpg"


def test_non_ascii_names_take_the_checked_path_and_ascii_ones_come_back_unchanged():
    # ASCII is returned without an encoding check; valid UTF-8 is kept as it is; surrogates are escaped.
    assert storable_path("/a/plain.jpg") == "/a/plain.jpg" and not has_undecodable_bytes("/a/plain.jpg")
    assert storable_path("/a/caf\u00e9.jpg") == "/a/caf\u00e9.jpg" and not has_undecodable_bytes("/a/caf\u00e9.jpg")
    assert storable_path("/a/caf\udce9.jpg") == "/a/caf\\xe9.jpg" and has_undecodable_bytes("/a/caf\udce9.jpg")
    assert storable_path(Path("/a/caf\udce9.jpg")) == "/a/caf\\xe9.jpg"

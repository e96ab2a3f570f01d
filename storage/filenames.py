"""File names that are not valid UTF-8: a readable, storable form, and the way back to the file.

POSIX file names are bytes. Python decodes an undecodable byte such as ``\\xff`` to a lone surrogate
(``surrogateescape``), which UTF-8 writers (Parquet, JSON, Prefect's API) refuse. ``storable_path`` writes each such
byte as the four characters ``\\xff`` (valid UTF-8, readable in logs and artifacts); ``source_file`` turns a stored
path back into the file to open. A name that is valid UTF-8 is stored exactly as it is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def has_undecodable_bytes(path: str | os.PathLike) -> bool:
    """Return True when ``path`` holds bytes that are not valid UTF-8 (surrogate-escaped by Python)."""
    text = path if type(path) is str else os.fspath(path)
    if text.isascii():  # the usual case, without an encoded copy
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def storable_path(path: str | os.PathLike) -> str:
    """Return ``path`` as valid UTF-8 text: undecodable bytes as ``\\xNN`` (e.g. ``caf\\xe9.jpg``), others unchanged."""
    text = path if type(path) is str else os.fspath(path)
    if text.isascii() or not has_undecodable_bytes(text):  # ASCII (the usual case) needs no encoded copy
        return text
    return os.fsencode(text).decode("utf-8", errors="backslashreplace")


def display_path(path: str | os.PathLike) -> str:
    """Return ``path`` for a log line or a report: :func:`storable_path` (one readable line, valid UTF-8)."""
    return storable_path(path)


def source_file(stored: str | os.PathLike) -> Path:
    """Return the file a stored path names: the path itself when it exists, else the ``\\xNN``-unescaped bytes name.

    An exact match wins, so a file literally named ``a\\xff.jpg`` is never confused with ``a<0xff>.jpg`` when it
    exists; only the (rare) folder holding both names at once is ambiguous.
    """
    text = os.fspath(stored)
    path = Path(text)
    if "\\x" not in text or has_undecodable_bytes(text) or os.path.lexists(path):
        return path
    return Path(_ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text))

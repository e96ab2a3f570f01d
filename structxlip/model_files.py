"""Reading model and weights files: a corrupt or truncated file becomes one line naming the file and what to do.

Every loader of weights (CLIP folders, training checkpoints, released ``.pth``/``.safetensors``, SAM checkpoints,
captioner folders) reads through ``reading_model_file``, so a damaged file is reported the same way everywhere::

    OUT/train/model/model.safetensors is corrupt or truncated (SafetensorError: Error while deserializing header:
    incomplete metadata, file not fully covered): re-export or re-download it

``ModelLoadError`` says the environment is broken, not an item: a pipeline stage that meets it fails (and records
nothing) instead of recording a failed row per image (``pipelines.steps.errors`` classifies it by its name).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REASON_CHARS = 160
DEFAULT_ADVICE = "re-export or re-download it"
# What a damaged file raises, by type name (importing safetensors/torch/zipfile here only to name them is not needed).
_DAMAGED_TYPES = {"SafetensorError", "UnpicklingError", "BadZipFile", "EOFError", "HeaderTooLarge",
                  "HeaderTooSmall", "InvalidHeader", "MetadataIncompleteBuffer", "JSONDecodeError"}
# ... or says in its message (torch's zip reader, transformers' wrappers of the errors above).
_DAMAGED_MARKERS = ("PytorchStreamReader failed", "failed finding central directory", "Error while deserializing",
                    "file not fully covered", "unexpected EOF", "Ran out of input", "invalid load key",
                    "is not a valid JSON file", "Unable to load weights from", "truncated", "corrupt")
# Weights files a model folder may hold, in the order transformers prefers them.
_WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")
_NAMED_FILE = re.compile(r"""['"]?(/[^'"\s]+\.(?:safetensors|bin|pt|pth|ckpt|json))['"]?""")


class ModelLoadError(RuntimeError):
    """A model or weights file cannot be read (corrupt, truncated or not what it claims to be); the message is one
    line naming the file and what to do. The environment's problem, never an item's."""


def _reason(exc: BaseException) -> str:
    """Return the part of an error's message that says what is wrong: its first sentence (torch's messages go on
    for a paragraph; the weights-only unpickler's reason comes after its preamble)."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ", 1)[0].rstrip(".") if lines else ""
    return first[:REASON_CHARS]


def is_damaged_file_error(exc: BaseException) -> bool:
    """Return whether ``exc`` (or an exception it wraps) says a file's bytes are damaged, as opposed to a missing
    file, a refused pickle or an unreachable hub."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any("Unsupported global" in str(error) for error in chain):
        return False  # a pickle the safe loader refuses (it names Python objects): intact, and unsafe to load
    for error in chain:
        if type(error).__name__ in _DAMAGED_TYPES:
            return True
        if isinstance(error, (RuntimeError, OSError, ValueError)) and not isinstance(error, FileNotFoundError) \
                and any(marker in str(error) for marker in _DAMAGED_MARKERS):
            return True
    return False


def damaged_file(source: str | os.PathLike, exc: BaseException) -> Path:
    """Return the file a damage error is about: the one its message names, else the weights file of a model folder
    ``source``, else ``source`` itself."""
    named = _NAMED_FILE.search(str(exc))
    if named and Path(named.group(1)).exists():
        return Path(named.group(1))
    source = Path(source)
    if source.is_dir():
        for name in _WEIGHTS_NAMES:
            if (source / name).is_file():
                return source / name
    return source


def model_load_error(source: str | os.PathLike, exc: BaseException, advice: str = DEFAULT_ADVICE) -> ModelLoadError:
    """Return the one-line ModelLoadError for a damaged file read from ``source`` (a file or a model folder)."""
    cause = exc
    while not (type(cause).__name__ in _DAMAGED_TYPES) and (cause.__cause__ or cause.__context__) is not None:
        inner = cause.__cause__ or cause.__context__
        if not is_damaged_file_error(inner):
            break
        cause = inner
    reason = _reason(cause)
    detail = f"{type(cause).__name__}: {reason}" if reason else type(cause).__name__
    return ModelLoadError(f"{damaged_file(source, exc)} is corrupt or truncated ({detail}): {advice}")


@contextmanager
def reading_model_file(source: str | os.PathLike, advice: str = DEFAULT_ADVICE) -> Iterator[None]:
    """Run a read of the model file or folder ``source``; a damaged file raises ``ModelLoadError`` (one line),
    anything else propagates unchanged."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - only damage is translated; the rest is re-raised as it was
        if is_damaged_file_error(exc):
            raise model_load_error(source, exc, advice) from None
        raise

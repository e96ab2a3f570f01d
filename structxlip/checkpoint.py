"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

Everything is stored as tensors and plain Python values (RNG states included), so the safe loader reads it and
nothing is ever unpickled. A checkpoint holds the model and optimiser state, the position in the run (epoch,
batches done in that epoch, global step, skipped steps), every RNG state, the run's configuration and the caller's
``run_key`` (what identifies the run, so a different run never resumes from it).
"""

from __future__ import annotations

from collections.abc import Callable

import os
import pickle
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.atomic import atomic_path, storage_error_from
from structxlip.model_files import ModelLoadError, model_load_error

# Bump when this module's results change: it enters the cache key of every stage that imports it.
VERSION = "1"

FORMAT = "structxlip-train-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "model", "optimizer", "step", "epoch", "batch_in_epoch", "rng")


class CheckpointError(ValueError):
    """A file is not a readable StructXLIP training checkpoint; the message is one line."""


class CorruptCheckpointError(ModelLoadError, CheckpointError):
    """A checkpoint file whose bytes are damaged (truncated, overwritten): a ModelLoadError, so a pipeline treats it
    as a broken environment, and a CheckpointError, so the callers that skip unusable checkpoints skip it too."""


def _checkpoint_advice(path: Path) -> str:
    if path.parent.name == "checkpoints":  # OUT/train/checkpoints/last.pt or epoch-N.pt: this run's own file
        return "train without --resume to start afresh"
    return "re-export or re-download it"


@dataclass
class TrainingCheckpoint:
    """A loaded checkpoint. ``epoch`` is the epoch in progress and ``batch_in_epoch`` the batches of it already
    trained (0 = the epoch has not started), so training continues at exactly that batch."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    step: int
    epoch: int
    batch_in_epoch: int
    rng: dict[str, Any]
    skipped_steps: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    run_key: str | None = None


# ---- RNG state as tensors / plain types ---------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Return the Python, NumPy, torch CPU (and CUDA) RNG states as tensors and plain values."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---- save / load --------------------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    step: int,
    epoch: int,
    batch_in_epoch: int,
    skipped_steps: int = 0,
    config: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    run_key: str | None = None,
    before_replace: Callable[[], None] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file + rename) and return its path. ``before_replace`` is called
    when the temporary file is complete, before it is renamed onto ``path`` (the training loop's crash point).

    A full disk raises OSError(ENOSPC) naming the file and the free space (torch's own message is an
    ``[enforce fail at inline_container.cc]`` line); the previous checkpoint stays in place.
    """
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        # Plain CPU tensors: loadable on a machine without the GPU that wrote them.
        "model": {name: tensor.detach().cpu() for name, tensor in model_state.items()},
        "optimizer": optimizer_state,
        "step": int(step),
        "epoch": int(epoch),
        "batch_in_epoch": int(batch_in_epoch),
        "skipped_steps": int(skipped_steps),
        "rng": rng if rng is not None else capture_rng_state(),
        "config": config or {},
        "run_key": run_key,
    }
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
            if before_replace is not None:
                before_replace()
    except (RuntimeError, OSError) as exc:
        storage_error = storage_error_from(exc, path)
        if storage_error is None:
            raise
        raise storage_error from None
    return Path(path)


def is_training_checkpoint(payload: Any) -> bool:
    """Return True when a loaded object carries this module's format marker."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def unpickling_refusal(path: str | os.PathLike, exc: BaseException) -> str | None:
    """Return the one-line refusal for a file the safe loader (``weights_only=True``) will not unpickle, or None
    when ``exc`` is not such a refusal (a corrupt file, say).

    Such a file stores Python objects besides tensors: loading it needs unrestricted unpickling, which runs
    whatever code the file names, so it is refused rather than trusted.
    """
    text = str(exc)
    if "WeightsUnpickler" not in text and "Unsupported global" not in text and "weights_only" not in text:
        return None
    # torch's message is a long essay; keep only its reason ("Unsupported global: GLOBAL io.open ...").
    reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    reason = reason[0].split(". Please use", 1)[0].strip() if reason else ""
    if "Unsupported global" not in reason and "GLOBAL" not in reason:
        return None  # e.g. "Unsupported operand": a damaged file, not one that names Python objects
    path = Path(path)
    if path.name == "pytorch_model.bin" or path.suffix == ".bin":
        how = ("convert it to safetensors where you trust it: python -c \"import torch, safetensors.torch as s; "
               f"s.save_file(torch.load('{path.name}', weights_only=False), 'model.safetensors')\", then remove "
               f"{path.name} (or load the folder with transformers and save_pretrained it again)")
    else:
        how = ("if you trust the file, re-save its tensors only: torch.save(torch.load(f, weights_only=False)"
               "['model'], 'weights.pt'), or as safetensors")
    return (f"{path}: refused by the safe loader: it holds pickled Python objects and needs unrestricted "
            f"unpickling (weights_only=False), which can run arbitrary code ({reason[:80]}); {how}")


def read_checkpoint_payload(path: str | os.PathLike) -> Any:
    """Return ``torch.load(path, weights_only=True)`` on CPU; raise CheckpointError (one line) if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refusal = unpickling_refusal(path, exc)
        if refusal is not None:
            raise CheckpointError(refusal) from None
        raise _corrupt(path, exc) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError) as exc:
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: BaseException) -> CorruptCheckpointError:
    """The one-line error of a checkpoint torch.load cannot read: damaged, or not a torch.save file at all."""
    error = model_load_error(path, exc, _checkpoint_advice(path))
    # model_load_error's text, said of a checkpoint: "PATH is corrupt or truncated, not a readable checkpoint (...)"
    text = str(error).replace(" is corrupt or truncated (", " is corrupt or truncated, not a readable checkpoint "
                                                              "(corrupt or not a torch.save file: ", 1)
    return CorruptCheckpointError(text)


def load_checkpoint(path: str | os.PathLike) -> TrainingCheckpoint:
    """Return the training checkpoint at ``path``; raise CheckpointError for a corrupt file or any other content."""
    payload = read_checkpoint_payload(path)
    if not is_training_checkpoint(payload):
        raise CheckpointError(f"{path}: not a StructXLIP training checkpoint (no '{FORMAT}' format marker)")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: incomplete training checkpoint, missing {', '.join(missing)}")
    if payload["version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload['version']} is newer than this code's "
                              f"{FORMAT_VERSION}")
    return TrainingCheckpoint(
        model=payload["model"],
        optimizer=payload["optimizer"],
        step=int(payload["step"]),
        epoch=int(payload["epoch"]),
        batch_in_epoch=int(payload["batch_in_epoch"]),
        rng=payload["rng"],
        skipped_steps=int(payload.get("skipped_steps", 0)),
        config=payload.get("config") or {},
        run_key=payload.get("run_key"),
    )


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load ``state_dict`` into ``model`` strictly; raise CheckpointError (one line: how many keys are missing and
    unexpected, with examples) instead of loading part of it, so a mismatched file never evaluates as the base model
    (the reference evaluator's ``strict=False`` does exactly that)."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model: {len(missing)} missing keys "
                              f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # same keys, different shapes
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise CheckpointError(f"{source}: weights do not fit the model: {detail[:300]}") from None


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Atomically make ``target`` the same file as ``source`` (hard link; copy where links are unsupported)."""
    import shutil

    with atomic_path(target) as tmp:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return Path(target)


def pickled_weights_error(path: str | os.PathLike, exc: BaseException) -> CheckpointError:
    """Return the one-line CheckpointError for weights at ``path`` that the safe loader refused to unpickle."""
    refusal = unpickling_refusal(path, exc)
    if refusal is None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        refusal = f"{path}: not readable as weights ({exc.__class__.__name__}: {first[:160]})"
    return CheckpointError(refusal)

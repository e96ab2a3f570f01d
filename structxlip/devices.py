"""Which device a ``device`` setting means: ``auto`` (CUDA when there is one, else the CPU) or an explicit name.

One resolver for the pipeline stages, training and evaluation. torch is imported only when a device is resolved.
"""

from __future__ import annotations

import glob
import os
import sys


class DeviceUnavailableError(RuntimeError):
    """An explicitly requested device is not on this machine; one line. A fact about the environment, never about
    an item being processed (``pipelines.steps.errors``)."""


def cuda_available() -> bool:
    """Return whether torch sees a CUDA device, without importing torch (~9 s here) on machines with no GPU driver."""
    if "torch" not in sys.modules and not glob.glob("/dev/nvidia[0-9]*") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str = "auto"):
    """Return the ``torch.device`` of ``device``: ``auto`` is CUDA when available, else the CPU; a CUDA device
    asked for on a machine without one raises ``DeviceUnavailableError``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {device!r} requested but CUDA is not available: use device 'auto' or 'cpu'"
        )
    return resolved

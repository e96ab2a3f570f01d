"""structxlip.devices: what ``auto`` and explicit device names resolve to, and the one-line error for a missing GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.steps.errors import is_environment_error
from structxlip.devices import DeviceUnavailableError, resolve_device


def test_auto_is_cuda_only_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_missing_gpu_is_one_line_about_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError) as caught:
        resolve_device("cuda:0")
    assert str(caught.value) == "device 'cuda:0' requested but CUDA is not available: use device 'auto' or 'cpu'"
    # Never recorded as an item's failure: the stage fails, and the same command works once the device is there.
    assert is_environment_error(caught.value, Path(tmp_path))

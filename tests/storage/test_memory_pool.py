"""Importing the project before pyarrow chooses Arrow's allocator (``storage/__init__``): jemalloc on Linux, else the C
library's, unless ``ARROW_DEFAULT_MEMORY_POOL`` says otherwise; processes the run starts inherit the choice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _backend(first_import: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    code = (f"import {first_import}, pyarrow, subprocess, sys; print(pyarrow.default_memory_pool().backend_name); "
            "print(subprocess.run([sys.executable, '-c', 'import pyarrow; print(pyarrow.default_memory_pool()"
            ".backend_name)'], capture_output=True, text=True, check=True).stdout.strip())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**clean, **env}, check=True)
    assert done.stderr == ""  # no warning about an unsupported backend
    parent, child = done.stdout.split()
    assert parent == child  # a process the run starts allocates the same way
    return parent


@pytest.mark.parametrize("first_import", ["flows.cli", "pipelines.engine.plan", "structxlip.data", "storage.parquet"])
def test_the_project_chooses_arrows_allocator_before_pyarrow_loads(first_import):
    assert _backend(first_import) == ("jemalloc" if sys.platform.startswith("linux") else "system")


def test_a_users_choice_stands():
    assert _backend("flows.cli", ARROW_DEFAULT_MEMORY_POOL="system") == "system"
    assert _backend("flows.cli", ARROW_DEFAULT_MEMORY_POOL="mimalloc") == "mimalloc"


def test_with_pyarrow_loaded_first_nothing_is_set():
    clean = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    code = "import os, pyarrow, storage; print(os.environ.get('ARROW_DEFAULT_MEMORY_POOL'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=clean, check=True)
    assert done.stdout.strip() == "None"  # the choice would not hold for this process, only for its children

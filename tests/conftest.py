"""Shared test set-up: offline, quiet, small; a session-wide tiny CLIP; ``gpu`` / ``slow`` markers skip cleanly."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Set before torch / transformers / prefect are imported by any test module.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if os.environ.get("STRUCTXLIP_SLOW") != "1":
    # No model hub here: fail fast instead of ~30 s of retries when a test names a hub id.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

_SESSION_CACHE: str | None = None
_PREVIOUS_CACHE: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    # A private model cache for the whole session (subprocesses inherit it), so resolve_model_source never writes ~.
    global _SESSION_CACHE, _PREVIOUS_CACHE
    _PREVIOUS_CACHE = os.environ.get("STRUCTXLIP_CACHE")
    _SESSION_CACHE = tempfile.mkdtemp(prefix="structxlip-test-cache-")
    os.environ["STRUCTXLIP_CACHE"] = _SESSION_CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests import zygote

    zygote.close_all()
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
    if _PREVIOUS_CACHE is None:
        os.environ.pop("STRUCTXLIP_CACHE", None)
    else:
        os.environ["STRUCTXLIP_CACHE"] = _PREVIOUS_CACHE


# Session fixtures that each cost a CLI run over a corpus: every module using one runs in the same test process, so
# the run is made once (pytest-xdist computes a session fixture once per test process).
SHARED_RUNS = ("baseline", "corpus_run")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA (none available)")
    skip_slow = pytest.mark.skip(reason="slow test: set STRUCTXLIP_SLOW=1 to run")
    has_cuda = torch.cuda.is_available()
    run_slow = os.environ.get("STRUCTXLIP_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
    # Modules that drive the real CLI or a Prefect server (``e2e``) run first, each kept whole: with ``make test``'s
    # test processes (pytest-xdist, one module at a time each) the long modules start early instead of ending the run
    # on one process while the other idles.
    heavy = {_module(item) for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: _module(item) not in heavy)
    # ``make test`` distributes whole groups (--dist loadgroup): a module, or the modules sharing one of SHARED_RUNS.
    groups = {_module(item): shared for item in items for shared in SHARED_RUNS if shared in item.fixturenames}
    for item in items:
        group = groups.get(_module(item), _module(item))
        item.add_marker(pytest.mark.xdist_group(group))
        if getattr(config.option, "loadgroup", False):  # a pytest-xdist test process under --dist loadgroup
            _name_group(item, group)


def _name_group(item: pytest.Item, group: str) -> None:
    """Suffix the node id with ``@group``, which is how pytest-xdist's scheduler learns an item's group. xdist 3.8
    writes the suffix to ``item._nodeid``, which pytest 9.2 no longer reads (the id is ``item._id``): every test was
    then its own group, modules were split between the test processes, and each recomputed the module and session
    runs the other had already made. On a pytest whose ids xdist still sets, this leaves them to it."""
    current = getattr(item, "_id", None)
    if current is None or item.nodeid.endswith(f"@{group}"):
        return
    item._id = type(current).parse(f"{item.nodeid}@{group}")


def _module(item: pytest.Item) -> str:
    return item.module.__name__ if getattr(item, "module", None) is not None else item.nodeid.split("::")[0]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPModel + real CLIP tokenizer + image processor saved with save_pretrained (77 positions)."""
    from structxlip.models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "model")


# One real Prefect server for the whole session, shared by the flow, hardening and benchmark tests.
from tests.prefect_server import prefect_api, prefect_database_template, prefect_home, prefect_server  # noqa: E402,F401

"""Shared set-up for the hardening tests: the session Prefect server (re-exported from tests/flows), CLI helpers,
and one uninterrupted baseline run of the data stages on a dozen small images that the fault tests compare against."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.zygote import run_python
from tests.flows.test_pipeline_cli import BASE_CONFIG, DATA_STAGES, _make_folder, _manifest_rows, _run

CLI_TIMEOUT_S = 300
N_IMAGES = 12


def cli_command(*args: str) -> list[str]:
    """Return the argv of ``structxlip ARGS...`` run with this interpreter (the installed entry point's module)."""
    return [sys.executable, "-m", "flows.cli", *args]


def run_cli(env: dict[str, str], *args: str, timeout: float = CLI_TIMEOUT_S, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``structxlip ARGS...`` to completion and return the finished process (text stdout/stderr), forked from a
    preloaded interpreter (tests/zygote.py: the same command without paying torch's imports again)."""
    return run_python(["-m", "flows.cli", *args], env=env, timeout=timeout, cwd=cwd)


def start_cli(env: dict[str, str], *args: str) -> subprocess.Popen:
    """Start ``structxlip ARGS...`` in its own process group (so kill_group reaches its children too)."""
    return subprocess.Popen(cli_command(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, what: str, timeout_s: float = CLI_TIMEOUT_S,
               interval_s: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail (with the process's stderr) if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended ({process.returncode}) before {what}:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            kill_group(process)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval_s)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group of a process started by ``start_cli`` and reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)
    process.stdout.close()
    process.stderr.close()


def alive(processes: list) -> list[str]:
    """The command lines of ``processes`` (psutil processes) still running (a zombie has ended)."""
    import psutil

    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(" ".join(process.cmdline())[:160])
        except psutil.NoSuchProcess:
            pass
    return running


def wait_gone(processes: list, timeout_s: float) -> list[str]:
    """Wait up to ``timeout_s`` for ``processes`` to end; return the command lines of those still running."""
    deadline = time.monotonic() + timeout_s
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(processes)


def kill_alone(process: subprocess.Popen, started: list, gone_within_s: float) -> list[str]:
    """SIGKILL ``process`` alone, as the out-of-memory killer does: what it started (``started``, psutil processes)
    must notice by itself. Return the command lines of those still running ``gone_within_s`` later."""
    process.kill()
    process.wait(timeout=30)
    return wait_gone(started, gone_within_s)


def kill_all(process: subprocess.Popen, started: list) -> None:
    """Kill ``started`` (re-parented once ``process`` died: out of reach through it) and ``process``'s group."""
    import psutil

    for child in started:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    kill_group(process)


def stage_parts(out: Path, stage: str) -> list[Path]:
    """The complete (non-temporary) Parquet parts of ``stage`` under every stage key in ``out``."""
    return sorted(p for p in (out / "stages" / stage).glob("*/part-*.parquet"))


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Assert the CLI failed with exit ``code`` and exactly one stderr line holding every needle; return that line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, f"exit {done.returncode}, expected {code}:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr and len(lines) == 1, f"expected one error line, got:\n{done.stderr[-3000:]}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@dataclass(frozen=True)
class Baseline:
    """An uninterrupted data-stage run: its images folder, config, output folder and sorted manifest rows."""

    root: Path
    images: Path
    config: Path
    out: Path
    rows: list[dict]
    env: dict[str, str]


@pytest.fixture(scope="session")
def cli_env(prefect_server) -> dict[str, str]:
    """Environment for CLI subprocesses: the session server's API, offline, the session's model cache."""
    return prefect_server.env()


@pytest.fixture(scope="session")
def no_server_env(tmp_path_factory) -> dict[str, str]:
    """Environment for CLI calls that must fail before any Prefect work: its API URL points at a closed port."""
    from tests.prefect_server import prefect_env

    return prefect_env("http://127.0.0.1:9/api", tmp_path_factory.mktemp("prefect-home-unused"))


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, cli_env) -> Baseline:
    """Run every data stage once, uninterrupted, on 12 small captioned PNGs (chunks of 2)."""
    root = tmp_path_factory.mktemp("hardening-baseline")
    images = root / "images"
    _make_folder(images, range(N_IMAGES))
    config = root / "base.yaml"
    config.write_text(BASE_CONFIG)
    out = root / "out"
    summary = _run(cli_env, images, out, config)
    assert all(s["processed"] == N_IMAGES and s["failed"] == 0 for s in summary.values()), summary
    return Baseline(root, images, config, out, _manifest_rows(out), cli_env)


SECRET_TOKEN = "hf_secret-value-3f9c2a"  # must never show up in any output of a run
CORPUS_CONFIG = BASE_CONFIG.replace("structure: {batch_size: 32}", "structure: {batch_size: 32}\n"
                                    "ingest: {extensions: [jpg, jpeg, png, webp, gif]}") \
                           .replace("chunk_size: 2", "chunk_size: 8")


@dataclass(frozen=True)
class CorpusRun:
    """One CLI run of the data stages over the bad-input corpus (with HF_TOKEN set in its environment)."""

    folder: Path
    expected: dict
    out: Path
    done: subprocess.CompletedProcess
    prefect_home: Path


@pytest.fixture(scope="session")
def corpus_run(tmp_path_factory, prefect_server) -> CorpusRun:
    """``structxlip run CORPUS --out OUT --stages <data stages> --verbose`` with ``HF_TOKEN`` set, run once."""
    from tests.corpus import IMAGES_DIR, make_bad_corpus

    root = tmp_path_factory.mktemp("bad-corpus")
    expected = make_bad_corpus(root)
    config = root / "corpus.yaml"
    config.write_text(CORPUS_CONFIG)
    env = {**prefect_server.env(), "HF_TOKEN": SECRET_TOKEN, "HUGGING_FACE_HUB_TOKEN": SECRET_TOKEN}
    out = root / "out"
    # --verbose: Prefect's own INFO logs are printed too, the most output a run can give.
    done = run_cli(env, "run", str(root / IMAGES_DIR), "--out", str(out), "--config", str(config),
                   "--stages", ",".join(DATA_STAGES), "--verbose")
    return CorpusRun(root / IMAGES_DIR, expected, out, done, prefect_server.home)


__all__ = ["CorpusRun", "SECRET_TOKEN", "DATA_STAGES", "N_IMAGES", "Baseline", "assert_one_line_error", "cli_command", "kill_group", "run_cli",
           "stage_parts", "start_cli", "wait_until"]

"""A real `prefect server` on a free loopback port, started once per test session (fixtures registered in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Only a deadline for a server that never comes up: the wait ends as soon as /health answers. A loaded 2-core
# machine can take minutes to import and migrate; a healthy server is never waited on longer than it needs.
SERVER_START_TIMEOUT_S = 300
START_ATTEMPTS = 3  # a "free" port can be taken by another process before the server binds it
BIN_DIR = Path(sys.executable).parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(api_url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Block until ``GET {api_url}/health`` answers 200; fail with the server log's tail if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout_s:.0f} s:\n{_tail(log_path)}")


def stop_process(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Stop a process started with ``start_new_session=True`` and its children: SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def prefect_env(api_url: str, prefect_home: Path) -> dict[str, str]:
    """Return an environment for client processes (CLI, ``structxlip serve``) talking to the test server."""
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    # The virtualenv's console scripts (prefect, structxlip) first, whatever PATH pytest was started with.
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    return env


class PrefectServer:
    """A running test server: its API URL, UI base URL, home folder and log file."""

    def __init__(self, api_url: str, home: Path, log_path: Path):
        self.api_url = api_url
        self.ui_url = api_url.removesuffix("/api")
        self.home = home
        self.log_path = log_path

    def env(self) -> dict[str, str]:
        return prefect_env(self.api_url, self.home)


def drain_prefect_clients(timeout_s: float = 10.0) -> None:
    """Send what this process's Prefect log and event workers still hold while the server is up: after it stops they
    retry at interpreter exit (about a minute of "Error logging to API" at the end of the session)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> PrefectServer:
    """Start ``prefect server start`` on a free port with a temporary PREFECT_HOME; yield it; stop it."""
    home = tmp_path_factory.mktemp("prefect-home")
    log_path = home / "server.log"
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        env = prefect_env(api_url, home)
        del env["PREFECT_API_URL"]  # the server itself must not try to talk to an API
        # The bundled UI asks this URL for data; without it the page points at port 4200 (ENVIRONMENT.md).
        env["PREFECT_UI_API_URL"] = api_url
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(BIN_DIR / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_health(api_url, process, log_path, SERVER_START_TIMEOUT_S)
            break
        except RuntimeError:
            stop_process(process)
            if attempt == START_ATTEMPTS or "already in use" not in _tail(log_path).lower():
                raise
    try:
        yield PrefectServer(api_url, home, log_path)
    finally:
        drain_prefect_clients()
        stop_process(process)


@pytest.fixture(scope="session")
def prefect_database_template(tmp_path_factory) -> Path:
    """A Prefect database as a temporary API server leaves it after its first start (migrated, block types
    registered): made once per test process by ``flows.api_server``, the server a CLI run starts."""
    from flows.api_server import ApiServer

    home = tmp_path_factory.mktemp("prefect-home-template")
    with pytest.MonkeyPatch.context() as patch:  # the server's environment is this process's
        patch.setenv("PREFECT_HOME", str(home))
        server = ApiServer()
    try:
        server.wait_ready()
    finally:
        server.stop()
    return home / "prefect.db"


@pytest.fixture()
def prefect_home(tmp_path, prefect_database_template) -> Path:
    """``tmp_path/prefect-home``, a PREFECT_HOME for a CLI run that starts its own API server, holding a copy of an
    already created database: what every run but a user's very first finds. A new database costs each such run
    ~10 s of migrations (14 s against 4 s to a ready server on the 2-core machine)."""
    return home_with_database(tmp_path / "prefect-home", prefect_database_template)


def home_with_database(home: Path, template: Path) -> Path:
    """Create the folder ``home`` holding a copy of the Prefect database ``template``; return it."""
    home.mkdir()
    with contextlib.closing(sqlite3.connect(template)) as source, \
            contextlib.closing(sqlite3.connect(home / "prefect.db")) as copy:
        source.backup(copy)  # one consistent file, whatever the template's write-ahead log still held
    return home


@pytest.fixture()
def prefect_api(prefect_server, monkeypatch) -> PrefectServer:
    """Point this test's in-process Prefect client at the session server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        try:
            yield prefect_server
        finally:
            drain_prefect_clients()

"""The run's own temporary Prefect API server, for a CLI run without ``PREFECT_API_URL``.

Prefect's ephemeral server is a child in the CLI's process group: Ctrl-C kills it first, and the run then floods
stderr with connection errors for minutes; a SIGTERMed or SIGKILLed CLI leaves it running (~230 MB) with no parent.
This one is started by the CLI itself, early (its 5-7 s start overlaps planning and ingest):
- in a session of its own, so a Ctrl-C to the terminal's process group reaches the CLI, which marks its flow runs
  Cancelled through the still-running API and then stops the server;
- with a watchdog: it exits as soon as its parent is gone, even a SIGKILLed one;
- with the same settings Prefect gives its ephemeral server (UI off, the local database).
The CLI points ``PREFECT_API_URL`` at it, so Dask workers started for the run report to it instead of starting a
server of their own.

Run as ``python -m flows.api_server --port N --parent PID``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from pipelines.engine.preload import exit_with_parent

START_TIMEOUT_S = 180.0  # a loaded 2-core machine can take a minute to import and migrate
PORT_TRIES = 3  # ports tried when another process binds the chosen one first


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiServer:
    """A temporary API server process (see the module docstring); ``url`` is its API address."""

    def __init__(self) -> None:
        self._tries = 0
        self._start()

    def _start(self) -> None:
        self._tries += 1
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        environment = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                       "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        environment.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.api_server", "--port", str(self.port), "--parent", str(os.getpid())],
            env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """Block until the API answers ``/health``; return its URL. Raise RuntimeError (one line) if it never does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read() if self.process.stderr else b""
                text = " ".join(error.decode("utf-8", "replace").split())
                tail = text[-240:]
                if "address already in use" in text.lower() and self._tries < PORT_TRIES:
                    self._start()  # another process took the port between free_port and the server's bind
                    continue
                raise RuntimeError(f"the temporary Prefect API server exited with {self.process.returncode}: {tail}")
            # Not answering yet, or another program answering on the port (until the server's failed bind shows)
            with contextlib.suppress(urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                                     OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        self._drain_stderr()
                        return self.url
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the temporary Prefect API server did not answer within {timeout_s:.0f} s")

    def _drain_stderr(self) -> None:
        # The server logs only errors; read them so a full pipe never blocks it.
        stream = self.process.stderr
        if stream is not None:
            threading.Thread(target=lambda: [None for _ in iter(lambda: stream.read(65536), b"")],
                             name="api-server-stderr", daemon=True).start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait(timeout=timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a temporary Prefect API server that ends with its parent")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True, help="pid of the process this server serves")
    args = parser.parse_args(argv)
    if os.getppid() != args.parent:
        return 0  # the parent is already gone
    exit_with_parent(args.parent)
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=args.port,
                log_level="error", lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())

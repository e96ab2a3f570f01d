"""The CLI's watch of the Prefect API (``flows.commands._watch_api``): a run whose API stays unreachable for the grace
period ends with one line; a reachable one is left alone, checked through one HTTP client."""

from __future__ import annotations

import http.server
import time

import httpx
import pytest

from flows import commands, interrupts
from tests.local_http import serving


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(200 if self.path == "/api/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    with serving(_Health) as server:
        yield server


def test_a_lost_api_ends_the_run_once_with_one_line_and_a_live_one_does_not(api, monkeypatch):
    aborted: list[tuple[str, int]] = []
    monkeypatch.setattr(interrupts, "abort_run", lambda message, code: aborted.append((message, code)))
    clients = []
    monkeypatch.setattr(httpx, "Client", lambda *a, real=httpx.Client, **k: clients.append(real(*a, **k)) or clients[-1])
    url = f"http://127.0.0.1:{api.server_address[1]}/api"
    done = commands._watch_api(url, command="run", own=True, grace_s=1.0)
    try:
        time.sleep(4.5)  # three checks, two seconds apart, all answered
        assert aborted == []
        api.shutdown()
        api.server_close()  # the server is gone: refused from now on
        deadline = time.monotonic() + 15
        while not aborted and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        done.set()
    assert aborted == [("structxlip run: error: lost the run's Prefect API server for 1 s; finished chunks are cached, "
                        "re-run the same command once the server is back", 2)]
    assert len(clients) == 1  # one client for every check: a new one each time builds an SSL context (~30 ms of CPU)

"""Headless Chromium driven over the DevTools protocol: open a page and wait until its DOM shows what a test expects.

``chromium --dump-dom --virtual-time-budget=N`` snapshots a single-page app after a fixed budget, so on a loaded
machine it can snapshot before the app has fetched and rendered its data. Here the test polls the live DOM until a
condition holds (or a generous deadline passes) and then takes the screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]
WIDTH, HEIGHT = 1280, 1000
RENDER_TIMEOUT_S = 180


def chromium() -> str | None:
    """Return the Chromium executable, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _DevTools:
    """A minimal synchronous DevTools-protocol client over the browser's websocket."""

    def __init__(self, url: str):
        from websockets.sync.client import connect

        self._socket = connect(url, max_size=None, open_timeout=60)
        self._next_id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout_s: float = 60) -> dict:
        """Send one command and return its result (events that arrive in between are skipped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._socket.send(json.dumps(message))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = json.loads(self._socket.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def close(self) -> None:
        self._socket.close()


def _wait_for_devtools(profile: Path, process: subprocess.Popen, timeout_s: float) -> str:
    """Return the browser's websocket URL once Chromium has written it to ``DevToolsActivePort``."""
    active_port = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode} before opening its DevTools port")
        lines = active_port.read_text().split("\n") if active_port.is_file() else []
        if len(lines) >= 2 and lines[0].strip() and lines[1].strip():
            return f"ws://127.0.0.1:{lines[0].strip()}{lines[1].strip()}"
        time.sleep(0.05)
    raise RuntimeError(f"chromium did not open its DevTools port within {timeout_s:.0f} s")


def render_until(url: str, until: Callable[[str], bool], *, screenshot: Path, profile: Path,
                 timeout_s: float = RENDER_TIMEOUT_S) -> str:
    """Open ``url`` in headless Chromium, poll its DOM until ``until(dom)`` holds or ``timeout_s`` passes, save a PNG
    screenshot to ``screenshot`` and return the DOM (the last one seen, so the caller's asserts explain a timeout)."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("chromium not installed (`make browser` installs the Debian package)")
    profile.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([browser, *FLAGS, f"--window-size={WIDTH},{HEIGHT}", f"--user-data-dir={profile}",
                                "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    devtools = None
    try:
        devtools = _DevTools(_wait_for_devtools(profile, process, timeout_s))
        target = devtools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = devtools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        devtools.call("Emulation.setDeviceMetricsOverride",
                      {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session)
        devtools.call("Page.navigate", {"url": url}, session)
        deadline = time.monotonic() + timeout_s
        while True:
            dom = devtools.call("Runtime.evaluate", {"expression": "document.documentElement.outerHTML",
                                                     "returnByValue": True}, session)["result"].get("value", "")
            if until(dom) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        png = devtools.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
        screenshot.write_bytes(base64.b64decode(png))
        return dom
    finally:
        if devtools is not None:
            devtools.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the browser and its renderer/zygote children
        process.wait(timeout=60)

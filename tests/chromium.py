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


class Page:
    """One headless Chromium tab driven over DevTools: evaluate script, wait for a condition, click and type as a
    user would (real input events at an element's position), save screenshots, and receive downloads."""

    def __init__(self, profile: Path, *, width: int = WIDTH, height: int = HEIGHT, timeout_s: float = RENDER_TIMEOUT_S,
                 downloads: Path | None = None):
        browser = chromium()
        if browser is None:
            raise RuntimeError("chromium not installed (`make browser` installs the Debian package)")
        profile.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self._process = subprocess.Popen([browser, *FLAGS, f"--window-size={width},{height}",
                                          f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._devtools = None
        try:
            self._devtools = _DevTools(_wait_for_devtools(profile, self._process, timeout_s))
            if downloads is not None:
                downloads.mkdir(parents=True, exist_ok=True)
                self._devtools.call("Browser.setDownloadBehavior",
                                    {"behavior": "allow", "downloadPath": str(downloads)})
            target = self._devtools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            attached = self._devtools.call("Target.attachToTarget", {"targetId": target, "flatten": True})
            self._session = attached["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def call(self, method: str, params: dict | None = None) -> dict:
        return self._devtools.call(method, params, self._session)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        """Return the value of a JavaScript expression in the page (JSON-serialisable values)."""
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"].get("exception", {}).get("description")
            raise RuntimeError(f"{expression[:80]}: {details}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, what: str = "") -> object:
        """Poll a JavaScript expression until it is truthy; return its value (RuntimeError after ``timeout_s``)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None  # e.g. the page is still navigating
            if value:
                return value
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what or expression}")
            time.sleep(0.1)

    def click_at(self, x: float, y: float) -> None:
        """A real left click (press and release) at viewport coordinates."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                   "buttons": 0 if kind == "mouseReleased" else 1, "clickCount": 1})

    def hover(self, x: float, y: float) -> None:
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def click(self, selector: str) -> None:
        """Scroll the first element matching ``selector`` into view and click its centre."""
        box = self.wait_for(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            if (!e) return null; e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; }})()""", selector)
        self.click_at(*box)

    def press(self, key: str, code: str | None = None, key_code: int = 0) -> None:
        """Press and release one key on the focused element (``Enter``, ``ArrowRight``...)."""
        for kind in ("rawKeyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": code or key,
                                                 "windowsVirtualKeyCode": key_code, "nativeVirtualKeyCode": key_code})

    def screenshot(self, path: Path, *, full_page: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        params: dict = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", params)["data"]))
        print(f"screenshot: {path}")
        return path

    def close(self) -> None:
        if self._devtools is not None:
            with contextlib.suppress(Exception):
                self._devtools.close()
            self._devtools = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)  # the browser and its renderer/zygote children
        self._process.wait(timeout=60)

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def render_until(url: str, until: Callable[[str], bool], *, screenshot: Path, profile: Path,
                 timeout_s: float = RENDER_TIMEOUT_S) -> str:
    """Open ``url`` in headless Chromium, poll its DOM until ``until(dom)`` holds or ``timeout_s`` passes, save a PNG
    screenshot to ``screenshot`` and return the DOM (the last one seen, so the caller's asserts explain a timeout)."""
    with Page(profile, timeout_s=timeout_s) as page:
        page.goto(url)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                dom = page.evaluate("document.documentElement.outerHTML") or ""
            except RuntimeError:
                dom = ""  # between documents while the page navigates
            if until(dom) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        png = page.call("Page.captureScreenshot", {"format": "png"})["data"]
        screenshot.write_bytes(base64.b64decode(png))
        return dom

"""The headless-Chromium helper waits for what a single-page app renders late, instead of a fixed time budget."""

from __future__ import annotations

import http.server

import pytest

from tests.chromium import chromium, render_until
from tests.local_http import serving

PAGE = b"""<!doctype html><html><body><p id="status">loading</p><script>
fetch("/data.json").then(r => r.json()).then(d => setTimeout(() => {
  document.getElementById("status").textContent = "rendered " + d.count;
}, 1500));
</script></body></html>"""


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = PAGE if self.path == "/" else b'{"count": 42}'
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.path == "/" else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (`make browser` installs it)")
def test_render_until_waits_for_the_condition_then_screenshots(tmp_path):
    with serving(_Handler) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        dom = render_until(url, lambda dom: "rendered 42" in dom, screenshot=tmp_path / "page.png",
                           profile=tmp_path / "profile")
    assert '<p id="status">rendered 42</p>' in dom
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""A throwaway HTTP server on a free loopback port for tests that need something to answer (a stand-in hub, an API's
health check, a page for Chromium)."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[http.server.ThreadingHTTPServer]:
    """Serve ``handler`` on 127.0.0.1 (a free port: ``server.server_address[1]``) in a daemon thread; yield the
    server; shut it down and close its socket on exit (a test may do so earlier: both are safe twice)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()

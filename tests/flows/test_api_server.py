"""The run's own temporary API server (``flows.api_server.ApiServer``) when another process binds its port first: the
CLI's health check meets that process (a Dask scheduler answered it with its own protocol in a CI run), the server's
bind fails, and it starts again on another port instead of failing the run."""

from __future__ import annotations

import socket
import threading
import urllib.request

from flows import api_server


def test_a_port_taken_before_the_server_binds_it_gets_another(monkeypatch, prefect_home):
    monkeypatch.setenv("PREFECT_HOME", str(prefect_home))
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]

    def answer_in_another_protocol():
        while True:
            try:
                connection, _address = squatter.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b"\x00\x00\x00\x2a\x83\xabcompression\xc0\xafpickle-protocol\x05\n")

    threading.Thread(target=answer_in_another_protocol, daemon=True).start()
    chosen = iter([taken])
    real_free_port = api_server.free_port
    monkeypatch.setattr(api_server, "free_port", lambda: next(chosen, None) or real_free_port())
    server = api_server.ApiServer()
    try:
        assert server.port == taken
        url = server.wait_ready(timeout_s=150)
        assert server.port != taken and url == f"http://127.0.0.1:{server.port}/api"
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            assert response.status == 200
    finally:
        server.stop()
        squatter.close()

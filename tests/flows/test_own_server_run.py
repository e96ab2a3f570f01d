"""What a CLI run sets for its parent flow: with its own temporary server, that server's URL and no heartbeats (no one
watches that server for crashed runs, and Prefect joins the heartbeat thread, 0-1 s, as the flow run ends); against
the user's server (``PREFECT_API_URL``), Prefect's own heartbeat setting."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import flows.pipeline
from flows import commands


@pytest.fixture
def parent_settings(monkeypatch, tmp_path):
    seen: dict = {}

    def parent_flow(**parameters):
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        seen.update(heartbeat=settings.flows.heartbeat_frequency, api=settings.api.url)
        return {"stages": []}

    monkeypatch.setattr(flows.pipeline, "structxlip_pipeline", parent_flow)
    pipeline = SimpleNamespace(images_dir=tmp_path / "images", layout=SimpleNamespace(root=tmp_path / "out"))

    def run(server):
        commands._run_flow(pipeline, config_path=None, selected=["ingest"], refreshed=[], runner=None,
                           dask_address=None, retry_failed=False, server=server, command="run")
        return seen

    return run


def test_a_run_on_its_own_server_sends_no_heartbeats(parent_settings):
    url = "http://127.0.0.1:9/api"
    assert parent_settings(SimpleNamespace(wait_ready=lambda: url)) == {"heartbeat": None, "api": url}


def test_a_run_on_the_users_server_keeps_prefects_heartbeats(parent_settings, monkeypatch):
    from prefect.settings import get_current_settings

    url = "http://127.0.0.1:9/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None
    assert parent_settings(None)["heartbeat"] == default

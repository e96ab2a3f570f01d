"""End to end against a real Prefect server: ``structxlip serve`` + ``prefect deployment run`` + the UI in Chromium.

The session fixture (conftest.py) starts ``prefect server start`` on a free loopback port. The screenshots land in
``tests/_artifacts/`` (gitignored) and their paths are printed.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from tests.chromium import chromium, render_until
from tests.corpus import make_generated_images
from tests.prefect_server import stop_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = ROOT / "tests" / "_artifacts"
DATA_STAGES = ["ingest", "structure", "regions", "captions", "filter", "manifest"]
N_IMAGES = 4
RUN_TIMEOUT_S = 300


def write_test_config(path: Path) -> Path:
    """A fast config: the tiny random CLIP (built locally) and structure-based regions."""
    config = {
        "model": {"clip_model": "structxlip/tiny-clip"},
        "structure": {"long_side": 160},
        "regions": {"method": "structure", "max_regions": 4},
        "captions": {"batch_size": 16},
        # workers 1: four thumbnails do not pay for starting the engine's worker processes.
        "runtime": {"chunk_size": 2, "workers": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def sync_client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Client:
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: api_url})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Client()


def wait_for_deployment(api_url: str, name: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 180):
    """Return the deployment once ``structxlip serve`` has registered it; fail early if serve died."""
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"structxlip serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with sync_client(api_url) as client:
                return client.read_deployment_by_name(name)
        except ObjectNotFound:
            time.sleep(1)
    pytest.fail(f"deployment {name} not registered after {timeout_s} s:\n{log_path.read_text()[-4000:]}")


def wait_for_final_state(api_url: str, flow_run_id: UUID, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sync_client(api_url) as client:
            run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    return run


def artifacts_of_run(api_url: str, parent_id: UUID) -> dict[str, object]:
    """Return ``{key: artifact}`` of the artifacts created by the run's stage subflows (latest per key)."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with sync_client(api_url) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )
        run_ids = [parent_id] + [child.id for child in children]
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids)))
    by_key = {}
    for artifact in sorted(found, key=lambda a: a.created):
        if artifact.key:
            by_key[artifact.key] = artifact
    return by_key, children


def render(url: str, screenshot: Path, profile: Path, until) -> str:
    """Return the DOM of ``url`` once the single-page app shows what ``until(dom)`` checks (not after a fixed time
    budget, which a loaded machine can overrun); save a screenshot."""
    return render_until(url, until, screenshot=screenshot, profile=profile)


def test_serve_run_deployment_and_see_artifacts_in_the_ui(prefect_server, tmp_path):
    if chromium() is None:
        pytest.skip("chromium not installed (`make browser` installs the Debian package)")
    images_dir = tmp_path / "images"
    make_generated_images(images_dir, N_IMAGES, size=(160, 120), seed=3)
    out_dir = tmp_path / "out"
    config = write_test_config(tmp_path / "config.yaml")
    env = prefect_server.env()
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "2"  # pick up the triggered run quickly

    serve_log = tmp_path / "serve.log"
    with open(serve_log, "wb") as log:
        # Started from an unrelated folder: deployments are addressed by module path, not by file path.
        serve = subprocess.Popen(
            [str(Path(sys.executable).parent / "structxlip"), "serve", "--config", str(config)],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deployment = wait_for_deployment(prefect_server.api_url, "structxlip-pipeline/all-stages", serve, serve_log)
        assert deployment.parameters == {"config_path": str(config.resolve())}
        for stage in DATA_STAGES:
            wait_for_deployment(prefect_server.api_url, f"{stage}/{stage}-stage", serve, serve_log)

        triggered = subprocess.run(
            [str(Path(env["PATH"].split(":")[0]) / "prefect"), "deployment", "run", "structxlip-pipeline/all-stages",
             "--param", f"images_dir={images_dir}", "--param", f"out_dir={out_dir}",
             "--param", f"stages={json.dumps(DATA_STAGES)}"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert triggered.returncode == 0, triggered.stdout + triggered.stderr
        flow_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", triggered.stdout).group(1))

        run = wait_for_final_state(prefect_server.api_url, flow_run_id, RUN_TIMEOUT_S)
        assert run.state.is_completed(), f"{run.state}\n{serve_log.read_text()[-6000:]}"
    finally:
        stop_process(serve)
    # Quiet by default: the runner polls the API every few seconds; no line per HTTP request (--verbose has them).
    assert "HTTP Request:" not in serve_log.read_text(errors="replace")

    # The data really went where the parameters said.
    from storage.manifest import read_manifest

    manifest = read_manifest(out_dir).to_pylist()
    assert len(manifest) == N_IMAGES and all(row["status"] == "ok" for row in manifest)

    from flows.artifacts import artifact_namespace

    found, children = artifacts_of_run(prefect_server.api_url, flow_run_id)
    namespace = artifact_namespace(images_dir, out_dir)  # keys never shared between datasets / output folders
    artifacts = {key.removeprefix(namespace + "-"): a for key, a in found.items() if key.startswith(namespace + "-")}
    assert len(children) == len(DATA_STAGES)
    assert run.name == "structxlip: images -> out" and {c.name for c in children} == {
        f"{stage}: images -> out" for stage in DATA_STAGES}
    for stage in DATA_STAGES:
        assert f"{stage}-summary" in artifacts, sorted(found)
    ingest = json.loads(artifacts["ingest-summary"].data)
    assert ingest[0]["processed"] == N_IMAGES and ingest[0]["failed"] == 0 and ingest[0]["cached"] == 0
    structure = json.loads(artifacts["structure-summary"].data)
    assert structure[0]["total"] == N_IMAGES
    assert float(artifacts["structure-progress"].data) == 100.0
    gallery = artifacts["manifest-gallery"].data
    assert gallery.count("data:image/png;base64,") >= 3 * N_IMAGES  # image + structure + scribble per image
    assert re.search(r"gen\\?_0000\d\.jpg", gallery)  # file names are escaped markdown text
    assert len(gallery.encode()) < 250_000
    # Galleries after structure and after regions (regions numbered on the image, sentences and scores once scored).
    assert "structure: examples" in artifacts["structure-gallery"].data
    regions = artifacts["regions-gallery"].data
    assert "regions numbered by score" in regions and "CLIP logit" in regions and "| # crop |" in regions
    # The dataset quality report: tables and plots.
    distributions = {row["quantity"]: row for row in json.loads(artifacts["quality-distributions"].data)}
    assert distributions["regions per image"]["count"] == N_IMAGES
    assert artifacts["quality-plots"].data.count("data:image/png;base64,") >= 5
    summary = artifacts["run-summary"].data
    assert str(images_dir) in summary and str(out_dir) in summary
    assert f"/artifacts/artifact/{artifacts['regions-summary'].id}" in summary  # linked by id: this run's artifact

    # The UI: the artifact page renders the summary table, the gallery page its images, the run page the run.
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    summary_png, gallery_png, run_png = (ARTIFACTS_DIR / n for n in ("ui.png", "ui-gallery.png", "ui-flow-run.png"))
    dom = render(f"{prefect_server.ui_url}/artifacts/artifact/{artifacts['ingest-summary'].id}", summary_png,
                 tmp_path / "chromium-1", lambda dom: "items_per_s" in dom and re.search(rf">\s*{N_IMAGES}\s*<", dom))
    assert f"{namespace}-ingest-summary" in dom and "items_per_s" in dom, dom[-2000:]
    assert re.search(rf">\s*{N_IMAGES}\s*<", dom), "the processed count is not in the rendered table"
    dom = render(f"{prefect_server.ui_url}/artifacts/artifact/{artifacts['manifest-gallery'].id}", gallery_png,
                 tmp_path / "chromium-2", lambda dom: dom.count('src="data:image/png;base64,') >= 3 * N_IMAGES)
    assert f"{namespace}-manifest-gallery" in dom and dom.count('src="data:image/png;base64,') >= 3 * N_IMAGES
    name = html.escape(run.name, quote=False)  # "->" is HTML-escaped in the DOM
    dom = render(f"{prefect_server.ui_url}/runs/flow-run/{flow_run_id}", run_png, tmp_path / "chromium-3",
                 lambda dom: name in dom and "Completed" in dom)
    assert name in dom and "Completed" in dom
    for path in (summary_png, gallery_png, run_png):
        assert path.stat().st_size > 10_000
        print(f"UI screenshot: {path}")

"""The README's deployment path, as a user follows it from a checkout: a real Prefect server, ``prefect work-pool
create``, ``prefect --no-prompt deploy --all`` from the project root, a ``process`` worker, ``prefect deployment run``.

One test, in the order a user meets things: (a) the default config without hub access fails fast with the model
named in the state message and nothing computed; (b) the demo config with ``overrides`` completes and records them in
OUT/config.yaml, its artifacts readable through the client; (c) a stage deployment with an override recomputes that
stage and the later ones only, and the same ``--set`` from the CLI afterwards recomputes nothing; (d) a run cancelled
from the UI in the middle of a stage ends Cancelled with nothing of it left running, and runs again to completion; (e)
one whose process is SIGKILLed ends Crashed likewise, and the run after it marks its stage run Crashed too.
"""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import psutil
import pytest
import yaml

from tests.corpus import make_generated_images
from tests.flows.test_server_e2e import artifacts_of_run, sync_client, wait_for_final_state
from tests.prefect_server import stop_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
N_IMAGES = 10
RUN_TIMEOUT_S = 420


def _prefect(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _run_deployment(env: dict, name: str, parameters: dict, run_env: dict | None = None) -> UUID:
    """``prefect deployment run NAME --param k=v ... [--job-variable env={...}]``: return the flow run id."""
    arguments = []
    for key, value in parameters.items():
        arguments += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    if run_env:  # the process worker adds these to the flow run process's environment
        arguments += ["--job-variable", f"env={json.dumps(run_env)}"]
    triggered = _prefect(env, "deployment", "run", name, *arguments, timeout=120)
    assert triggered.returncode == 0, triggered.stdout + triggered.stderr
    return UUID(re.search(r"UUID: ([0-9a-f-]{36})", triggered.stdout).group(1))


def _artifact_ids(api_url: str, run_ids: list[UUID]) -> set[str]:
    """Ids of every artifact (all versions of every key) created by these flow runs."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with sync_client(api_url) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids)))
    return {str(artifact.id) for artifact in found}


def _check_summary_page(prefect_server, summary, metrics: dict, linked: set[str], tmp_path: Path) -> None:
    """The run summary as the UI shows it (headless Chromium): the headline recall equals metrics.json, zero-shot
    beside fine-tuned, and every link in the page is one of the run's artifacts."""
    from tests.chromium import chromium, render_until

    if chromium() is None:
        pytest.skip("chromium not installed (`make browser` installs the Debian package)")
    tuned = f"{metrics['t2i/R@1']:.1f}%"
    zero = f"{metrics['zero_shot']['t2i/R@1']:.1f}%"
    screenshot = ROOT / "tests" / "_artifacts" / "ui-run-summary.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    dom = render_until(f"{prefect_server.ui_url}/artifacts/artifact/{summary.id}",
                       lambda dom: tuned in dom and "R@1" in dom, screenshot=screenshot, profile=tmp_path / "chromium")
    assert re.search(rf"text -(&gt;|>) image R@1\s*</td>\s*<td[^>]*>\s*{re.escape(zero)}\s*</td>\s*<td[^>]*>\s*"
                     rf"{re.escape(tuned)}", dom), dom[-3000:]
    shown = set(re.findall(r'href="[^"]*/artifacts/artifact/([0-9a-f-]{36})"', dom))
    assert shown == linked, (shown ^ linked)
    print(f"UI screenshot: {screenshot}")


def _summaries(run_result: dict) -> dict[str, tuple[int, int, int]]:
    return {s["stage"]: (s["processed"], s["cached"], s["failed"]) for s in run_result["stages"]}


def _last_report(out: Path) -> dict:
    return json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())


def test_deploy_from_a_checkout_with_a_process_worker(prefect_server, tmp_path):
    images = tmp_path / "images"
    make_generated_images(images, N_IMAGES, size=(128, 96), seed=5)
    env = prefect_server.env()
    env.pop("HF_HUB_OFFLINE")  # the hub is unreachable here anyway: preflight must find that out by itself
    env.update(PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="5")

    created = _prefect(env, "work-pool", "create", "structxlip", "--type", "process", timeout=120)
    assert created.returncode == 0 or "already exists" in created.stdout + created.stderr, created.stdout
    deployed = _prefect(env, "--no-prompt", "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    with sync_client(prefect_server.api_url) as client:
        for entry in declared:
            deployment = client.read_deployment_by_name(f"{entry['flow_name']}/{entry['name']}")
            assert deployment.work_pool_name == "structxlip" and deployment.entrypoint == entry["entrypoint"]
            # The worker runs the flows from this checkout: the pull step `prefect deploy` recorded.
            assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
                "directory": str(ROOT)}}]
            if entry["flow_name"] != "structxlip-ablation":
                assert {"overrides", "retry_failed"} <= set(deployment.parameter_openapi_schema["properties"])

    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "structxlip"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # (a) The default config (a hub model) without hub access: Failed within seconds, the model named, nothing
        # computed or created.
        refused_out = tmp_path / "refused"
        run_id = _run_deployment(env, "structxlip-pipeline/all-stages",
                                 {"images_dir": str(images), "out_dir": str(refused_out)})
        run = wait_for_final_state(prefect_server.api_url, run_id, RUN_TIMEOUT_S)
        assert run.state.is_failed(), f"{run.state}\n{worker_log.read_text()[-4000:]}"
        assert "openai/clip-vit-base-patch16" in run.state.message and "\n" not in run.state.message
        assert (run.end_time - run.start_time).total_seconds() < 60
        assert not refused_out.exists()  # no stage part, no config, no empty folder holding a lock

        # (b) The demo config with overrides completes; the effective config is recorded like the CLI records it.
        out = tmp_path / "out"
        overrides = {"structure.canny_low": 90, "train.batch_size": 2, "train.epochs": 1, "runtime.workers": 1}
        run_id = _run_deployment(env, "structxlip-pipeline/all-stages", {
            "images_dir": str(images), "out_dir": str(out), "config_path": "configs/demo.yaml",
            "overrides": overrides})
        run = wait_for_final_state(prefect_server.api_url, run_id, RUN_TIMEOUT_S)
        assert run.state.is_completed(), f"{run.state}\n{worker_log.read_text()[-6000:]}"
        recorded = yaml.safe_load((out / "config.yaml").read_text())
        assert recorded["structure"]["canny_low"] == 90 and recorded["train"]["batch_size"] == 2
        assert recorded["model"]["clip_model"] == "structxlip/tiny-clip"
        first = _last_report(out)
        assert all(processed > 0 for processed, _, _ in _summaries(first).values()), first
        found, children = artifacts_of_run(prefect_server.api_url, run_id)
        summary = next(a for key, a in found.items() if key.endswith("-run-summary"))
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        assert f"{metrics['t2i/R@1']:.1f}%" in summary.data  # recall in metrics.json is in percent
        linked = set(re.findall(r"/artifacts/artifact/([0-9a-f-]{36})", summary.data))
        assert len(linked) >= 8 and linked <= _artifact_ids(prefect_server.api_url, [run_id] + [c.id for c in children])
        assert (out / "report" / "index.html").is_file()  # the explorer is written by deployment runs too
        _check_summary_page(prefect_server, summary, metrics, linked, tmp_path)

        # (c) A stage deployment with an override: that stage and the later ones are recomputed, nothing before.
        run_id = _run_deployment(env, "structure/structure-stage", {
            "images_dir": str(images), "out_dir": str(out), "overrides": {"structure.canny_low": 50},
            "downstream": True})
        run = wait_for_final_state(prefect_server.api_url, run_id, RUN_TIMEOUT_S)
        assert run.state.is_completed(), f"{run.state}\n{worker_log.read_text()[-6000:]}"
        counts = _summaries(_last_report(out))
        assert list(counts) == ["structure", "regions", "captions", "filter", "manifest", "train", "evaluate"]
        assert all(processed > 0 for processed, _, _ in counts.values()), counts
        assert yaml.safe_load((out / "config.yaml").read_text())["structure"]["canny_low"] == 50

        for how in ("cancel", "kill"):  # (d) and (e)
            _stop_a_running_deployment_run(prefect_server, env, worker, tmp_path, worker_log, how)
    finally:
        stop_process(worker)
        # The server is shared by the session: leave no deployment behind (another test serves the same names).
        with sync_client(prefect_server.api_url) as client:
            for entry in declared:
                client.delete_deployment(client.read_deployment_by_name(f"{entry['flow_name']}/{entry['name']}").id)

    # The same --set from the CLI afterwards keys identically: nothing is recomputed.
    cli_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    result = subprocess.run([str(BIN / "structxlip"), "run", str(images), "--out", str(out), "--set",
                             "structure.canny_low=50"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    table = {line.split()[0]: line.split()[1:4] for line in result.stdout.splitlines()
             if line.split() and line.split()[0] in ("ingest", "structure", "regions", "captions", "filter",
                                                     "manifest", "train", "evaluate")}
    assert len(table) == 8 and all(processed == "0" for processed, _cached, _failed in table.values()), result.stdout


def _subflow_states(api_url: str, run_id: UUID) -> dict[str, tuple[str, str]]:
    """Stage name -> (state type, message) of a parent flow run's stage subflow runs."""
    import httpx

    found = httpx.post(f"{api_url}/flow_runs/filter", timeout=30,
                       json={"flow_runs": {"parent_flow_run_id": {"any_": [str(run_id)]}}})
    found.raise_for_status()
    return {run["name"].split(":")[0]: (run["state"]["type"], run["state"]["message"] or "") for run in found.json()}


def _stop_a_running_deployment_run(prefect_server, env: dict, worker: subprocess.Popen, tmp_path: Path,
                                   worker_log: Path, how: str) -> None:
    """(d) ``how="cancel"``: Cancel from the UI (what `prefect flow-run cancel` sends) a deployment run in the middle
    of a stage (the ``slow`` test plugin, a second per image in 2 engine workers): it ends Cancelled. (e)
    ``how="kill"``: SIGKILL its flow-run process instead (the out-of-memory killer): the worker marks it Crashed, and
    the next run on the folder marks the stage run it left Running Crashed too. Either way nothing it started keeps
    running (the engine workers, their forkserver), the output folder's lock is free, and the same deployment run
    again keeps the chunks that had finished."""
    from prefect.states import Cancelling

    images = tmp_path / "forty"
    if not images.exists():
        make_generated_images(images, 40, size=(64, 48), seed=6)
    config = tmp_path / "slow.yaml"
    config.write_text((ROOT / "configs" / "demo.yaml").read_text() + f"\nplugins: [{ROOT / 'tests/plugins/slow.py'}]\n")
    out = tmp_path / how
    parameters = {"images_dir": str(images), "out_dir": str(out), "config_path": str(config),
                  "stages": ["ingest", "slow"], "overrides": {"runtime.workers": 2, "runtime.chunk_size": 2}}
    run_id = _run_deployment(env, "structxlip-pipeline/all-stages", parameters)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not list((out / "stages" / "slow").glob("*/part-*.parquet")):
        assert time.monotonic() < deadline, worker_log.read_text()[-4000:]
        time.sleep(0.1)
    started = psutil.Process(worker.pid).children(recursive=True)
    forkserver = next((p for p in started if "forkserver" in " ".join(p.cmdline())), None)
    assert forkserver is not None, [p.cmdline() for p in started]
    if how == "cancel":
        with sync_client(prefect_server.api_url) as client:
            client.set_flow_run_state(run_id, Cancelling(), force=True)
    else:
        forkserver.parent().kill()  # the flow run's process, which started the forkserver
    run = wait_for_final_state(prefect_server.api_url, run_id, RUN_TIMEOUT_S)
    assert (run.state.is_cancelled() if how == "cancel" else run.state.is_crashed()), \
        f"{run.state}\n{worker_log.read_text()[-4000:]}"
    psutil.wait_procs(started, timeout=30)
    left = [" ".join(p.cmdline())[:160] for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left
    with open(out / ".lock", "rb") as handle:  # free: no process of the stopped run holds it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)
    if how == "kill":
        assert _subflow_states(prefect_server.api_url, run_id)["slow"][0] == "RUNNING"  # nobody could mark it

    # The same run again, without the wait per image: the finished chunks stay cached, the rest run.
    stopped_id, run_id = run_id, _run_deployment(env, "structxlip-pipeline/all-stages", parameters,
                                                 {"STRUCTXLIP_TEST_SLOW_SECONDS": "0"})
    run = wait_for_final_state(prefect_server.api_url, run_id, RUN_TIMEOUT_S)
    assert run.state.is_completed(), f"{run.state}\n{worker_log.read_text()[-4000:]}"
    processed, cached, failed = _summaries(_last_report(out))["slow"]
    assert cached > 0 and processed > 0 and processed + cached == 40 and failed == 0, (processed, cached, failed)
    if how == "kill":
        state, message = _subflow_states(prefect_server.api_url, stopped_id)["slow"]
        assert state == "CRASHED" and "was killed before the run finished" in message, (state, message)

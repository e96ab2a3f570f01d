"""Serve the pipeline's flows as Prefect deployments from this process (``structxlip serve``).

Every flow gets one deployment with a descriptive name (``structxlip-pipeline/all-stages``,
``structure/structure-stage`` ...); a run triggered from the UI or
``prefect deployment run 'structxlip-pipeline/all-stages' --param images_dir=... --param out_dir=...``
executes here. The same deployments are declared in ``prefect.yaml`` for a work-pool worker (docker-compose).
With ``--config``, the config's stage plugins are served too (``<plugin>/<plugin>-stage``).
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.engine.stages import STAGE_DEFINITIONS

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

PIPELINE_FLOW = "structxlip-pipeline"
ABLATION_FLOW = "structxlip-ablation"
FLOW_NAMES = (PIPELINE_FLOW, *STAGE_DEFINITIONS, ABLATION_FLOW)


def deployment_name(flow_name: str) -> str:
    """Return the deployment name of a flow: ``all-stages`` for the pipeline, ``<stage>-stage`` for a stage,
    ``ablation`` for the loss ablation."""
    return {PIPELINE_FLOW: "all-stages", ABLATION_FLOW: "ablation"}.get(flow_name, f"{flow_name}-stage")

# Where the flows are defined; all of them must be importable from these modules.
FLOW_MODULES = ("flows.pipeline", "flows.ablation")
TAGS = ["structxlip"]


def discover_flows(modules: tuple[str, ...] = FLOW_MODULES, *, plugins: list[str] = ()) -> dict[str, "Flow"]:
    """Return ``{flow name: Flow}`` for the parent flow and every stage flow found in ``modules``, in stage order,
    then the flows of the stages that the ``plugins`` files define."""
    from prefect import Flow

    found: dict[str, Flow] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if isinstance(value, Flow) and value.name in FLOW_NAMES:
                found.setdefault(value.name, value)
    missing = [name for name in FLOW_NAMES if name not in found]
    if missing:
        raise RuntimeError(f"flows {missing} not found in {', '.join(modules)} (expected {list(FLOW_NAMES)})")
    flows = {name: found[name] for name in FLOW_NAMES}
    if plugins:
        from flows.pipeline import flow_of
        from pipelines.engine.stages import plugin_stages

        flows |= {stage.name: flow_of(stage) for path in plugins for stage in plugin_stages(path)}
    return flows


def deployment_parameters(flow: "Flow", *, config_path: str | None) -> dict[str, Any]:
    """Return the default parameters of ``flow``'s deployment: ``config_path`` when the flow takes one and it is set."""
    if config_path is None or "config_path" not in inspect.signature(flow.fn).parameters:
        return {}
    return {"config_path": str(Path(config_path).expanduser().resolve())}


def build_deployments(
    flows: dict[str, "Flow"], *, config_path: str | None = None, version: str | None = None
) -> list["RunnerDeployment"]:
    """Return one runner deployment per flow (see ``deployment_name``), addressed by module path so runs work from
    any folder."""
    from prefect.types.entrypoint import EntrypointType

    return [
        flow.to_deployment(
            name=deployment_name(name),
            parameters=deployment_parameters(flow, config_path=config_path),
            description=inspect.getdoc(flow.fn) or f"StructXLIP {name}",
            tags=TAGS + ([] if name in (PIPELINE_FLOW, ABLATION_FLOW) else ["stage"]),
            version=version,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for name, flow in flows.items()
    ]


PREFECT_YAML_HEADER = """\
# Prefect deployments of the StructXLIP pipeline for a `process` work-pool worker. GENERATED from the flows
# (flows/serve.py: `python -m flows.serve > prefect.yaml`); a test checks that it matches them.
#
# From the project root of a checkout (each in its own terminal, all with PREFECT_API_URL set):
#   prefect server start --host 127.0.0.1                      # terminal 1: the server and UI
#   prefect work-pool create structxlip --type process         # once
#   prefect --no-prompt deploy --all                           # registers every deployment below
#   prefect worker start --pool structxlip                     # terminal 2: runs them
#   prefect deployment run 'structxlip-pipeline/all-stages' --param images_dir=sample/images \\
#       --param out_dir=deploy-out --param config_path=configs/demo.yaml   # terminal 3
#
# No pull step is declared: `prefect deploy` records the folder it runs in, so the worker runs the flows from this
# checkout (or from /app in the Docker image, where the compose `deploy` service runs it). `structxlip serve`
# serves the same flows under the same names from one process, without a work pool.
#
# Parameters of every flow: images_dir, out_dir, config_path (empty: OUT/config.yaml of the run that made the
# folder, else the defaults), overrides ({"section.key": value}, like --set), retry_failed. Stage flows also take
# refresh (recompute the stage) and downstream (run every later stage too); the pipeline takes stages, refresh,
# runner and dask_address.
"""


def render_prefect_yaml() -> str:
    """Return ``prefect.yaml``: one deployment per flow (names, entrypoints, descriptions, tags from the flows)."""
    from importlib.metadata import version

    import yaml

    deployments = [{
        "name": deployment_name(name),
        "flow_name": name,
        "entrypoint": f"flows/{'ablation' if name == ABLATION_FLOW else 'pipeline'}.py:{flow.fn.__name__}",
        "description": flow.description,
        "tags": TAGS + ([] if name in (PIPELINE_FLOW, ABLATION_FLOW) else ["stage"]),
        "work_pool": {"name": "structxlip", "work_queue_name": "default", "job_variables": {}},
    } for name, flow in discover_flows().items()]
    document = {"name": "structxlip", "prefect-version": version("prefect"), "build": None, "push": None,
                "deployments": deployments}
    return PREFECT_YAML_HEADER + "\n" + yaml.safe_dump(document, sort_keys=False, width=120)


def require_api_url() -> str:
    """Return the configured Prefect API URL; raise a one-line RuntimeError when none is set."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise RuntimeError(
            "no Prefect server to serve to: start one (`make ui` or docker compose) and set "
            "PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return str(url)


def serve_flows(*, config_path: str | os.PathLike | None = None, limit: int | None = None) -> None:
    """Register the deployments with the configured Prefect server and execute their runs here until interrupted."""
    from importlib.metadata import PackageNotFoundError, version

    from prefect import serve

    api_url = require_api_url()
    try:
        project_version = version("structxlip")
    except PackageNotFoundError:
        project_version = None
    plugins = []
    if config_path is not None:
        from configs import load_config

        plugins = load_config(config_path).plugins
    deployments = build_deployments(discover_flows(plugins=plugins),
                                    config_path=None if config_path is None else str(config_path),
                                    version=project_version)
    print(f"structxlip serve: {len(deployments)} deployments on {api_url}", flush=True)
    serve(*deployments, limit=limit, print_starting_message=True)


if __name__ == "__main__":
    print(render_prefect_yaml(), end="")

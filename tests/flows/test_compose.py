"""docker-compose.yml, Dockerfile, .env.example and prefect.yaml agree with each other and with the flows.

Docker cannot run here (ENVIRONMENT.md), so the compose file is checked structurally; prefect.yaml is registered
for real against a test server in test_server_e2e.py.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PREFECT_YAML = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SERVICES = COMPOSE["services"]
WORKERS = ("worker", "worker-cpu")
# ${VAR}, ${VAR:-default}, ${VAR:?message}; $${VAR} is an escaped literal for the container's shell.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def work_pool_names() -> set[str]:
    return {d["work_pool"]["name"] for d in PREFECT_YAML["deployments"]}


def test_required_services_with_healthchecks():
    assert {"postgres", "prefect-server", "worker", "worker-cpu", "deploy"} <= set(SERVICES)
    for name in ("postgres", "prefect-server", *WORKERS):
        assert SERVICES[name]["healthcheck"]["test"], name
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(SERVICES["prefect-server"]["healthcheck"]["test"])
    assert SERVICES["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in WORKERS:
        assert SERVICES[name]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
        assert SERVICES[name]["depends_on"]["deploy"]["condition"] == "service_completed_successfully"


def test_only_loopback_ports_and_postgres_unpublished():
    assert "ports" not in SERVICES["postgres"]
    published = {name: s.get("ports", []) for name, s in SERVICES.items()}
    assert published["prefect-server"] == ["127.0.0.1:4200:4200"]
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_server_uses_postgres_and_no_telemetry():
    env = SERVICES["prefect-server"]["environment"]
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4200/api"
    # Credentials come from .env, never from the committed file.
    for variable in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert SERVICES["postgres"]["environment"][variable].startswith("${" + variable)


def test_workers_match_dockerfile_and_prefect_yaml():
    assert DOCKERFILE.startswith("#") and "FROM python:3.11-slim" in DOCKERFILE
    assert "pip install -r requirements.txt -c constraints.txt" in DOCKERFILE
    assert re.search(r"^USER structxlip$", DOCKERFILE, re.M), "the image must run as a non-root user"
    assert 'ENTRYPOINT ["structxlip"]' in DOCKERFILE
    (pool,) = work_pool_names()
    for name in WORKERS:
        worker = SERVICES[name]
        assert worker["build"] == {"context": ".", "dockerfile": "Dockerfile"}
        assert worker["entrypoint"] == ["prefect"]
        command = worker["command"]
        assert command[:2] == ["worker", "start"] and command[command.index("--pool") + 1] == pool
        assert command[command.index("--type") + 1] == "process"
        assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert worker["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
        # The Dockerfile's WORKDIR is where prefect.yaml's pull step runs the flows from.
        assert worker["working_dir"] == "/app"
    deploy_command = " ".join(SERVICES["deploy"]["command"])
    assert f"prefect work-pool create {pool} --type process" in deploy_command and "deploy --all" in deploy_command
    assert "WORKDIR /app" in DOCKERFILE
    assert PREFECT_YAML["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]


def test_volumes_images_read_only_outputs_writable():
    for name in WORKERS:
        volumes = SERVICES[name]["volumes"]
        assert "${IMAGES_DIR:-./images}:/data/images:ro" in volumes
        assert "${OUTPUT_DIR:-./outputs}:/data/out" in volumes
    assert "postgres-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert {"postgres-data", "hf-cache"} <= set(COMPOSE["volumes"])
    defaults = PREFECT_YAML["deployments"][0]["parameters"]
    assert (defaults["images_dir"], defaults["out_dir"]) == ("/data/images", "/data/out")


def test_gpu_reserved_only_in_the_gpu_profile():
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert SERVICES["worker"]["profiles"] == ["gpu"] and SERVICES["worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in SERVICES["worker-cpu"]


def test_env_example_defines_every_variable_and_env_is_ignored():
    text = (ROOT / "docker-compose.yml").read_text()
    referenced = set(VARIABLE.findall(text))
    assert {"POSTGRES_PASSWORD", "HF_TOKEN", "IMAGES_DIR", "OUTPUT_DIR"} <= referenced
    defined = env_example()
    assert referenced <= set(defined), f"missing from .env.example: {sorted(referenced - set(defined))}"
    assert defined["COMPOSE_PROFILES"] in ("gpu", "cpu")
    assert defined["HF_TOKEN"] == ""  # never a real token in a committed file
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode == 0
    assert ignored, ".env must be gitignored"
    assert subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT).returncode == 1
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_prefect_yaml_entrypoints_are_the_flows():
    from prefect import Flow

    from flows.serve import FLOW_NAMES

    deployments = PREFECT_YAML["deployments"]
    assert [d["flow_name"] for d in deployments] == list(FLOW_NAMES)
    from flows.serve import deployment_name

    assert [d["name"] for d in deployments] == [deployment_name(d["flow_name"]) for d in deployments]
    for deployment in deployments:
        path, _, attribute = deployment["entrypoint"].partition(":")
        assert (ROOT / path).is_file()
        module = __import__(path.removesuffix(".py").replace("/", "."), fromlist=[attribute])
        flow = getattr(module, attribute)
        assert isinstance(flow, Flow) and flow.name == deployment["flow_name"]
        signature = inspect.signature(flow.fn).parameters
        assert set(deployment["parameters"]) == set(signature), deployment["flow_name"]


"""docker-compose.yml, Dockerfile, .env.example and prefect.yaml agree with each other and with the flows.

Docker cannot run here (ENVIRONMENT.md), so the compose file is checked structurally; prefect.yaml is registered
for real against a test server in test_server_e2e.py.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

import pytest
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
    assert env["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert (env["PREFECT_SERVER_DATABASE_HOST"], env["PREFECT_SERVER_DATABASE_PORT"]) == ("postgres", "5432")
    # No hand-built URL: compose cannot URL-escape the password pasted into it.
    assert not any("CONNECTION_URL" in name for name in env)
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4200/api"
    # Credentials come from .env, never from the committed file.
    for variable in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert SERVICES["postgres"]["environment"][variable].startswith("${" + variable)


def dockerfile_steps() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as ``(INSTRUCTION, arguments)``, continuation lines joined, comments left out."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _ignored(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context: a pattern matches the path or a folder above
    it, part by part (``*`` within one part), from the context's root (``**/``: at any depth)."""
    parts = path.split("/")
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        rule = line.strip().removeprefix("**/").split("/")
        starts = range(len(parts)) if line.startswith("**/") else [0]
        if any(len(parts) - start >= len(rule) and all(fnmatch.fnmatchcase(part, pattern) for part, pattern
                                                       in zip(parts[start:], rule)) for start in starts):
            return True
    return False


def image_after(step_number: int | None = None) -> dict[str, str]:
    """The files of the image (image path -> repository path) as the COPY steps before ``step_number`` (all: None)
    put them there from the build context (git's files, less what .dockerignore leaves out), WORKDIR-relative."""
    tracked = [f for f in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
               if not _ignored(f)]
    files, workdir = {}, "/"
    for number, (instruction, arguments) in enumerate(dockerfile_steps()):
        if step_number is not None and number >= step_number:
            break
        if instruction == "WORKDIR":
            workdir = arguments
        elif instruction == "COPY":
            *sources, target = arguments.split()
            base = target if target.startswith("/") else f"{workdir.rstrip('/')}/{target.removeprefix('./')}"
            for source in sources:
                for path in tracked:
                    if path == source:
                        files[base.rstrip("/") + "/" + Path(path).name if target.endswith("/") else base] = path
                    elif path.startswith(source.rstrip("/") + "/"):
                        files[base.rstrip("/") + "/" + path[len(source.rstrip("/")) + 1:]] = path
    return files


def test_the_image_holds_what_its_steps_use():
    steps = dockerfile_steps()
    base = next(arguments for instruction, arguments in steps if instruction == "FROM")
    python = tuple(int(n) for n in re.match(r"python:(\d+)\.(\d+)", base).groups())
    required = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text()).groups()
    assert python >= tuple(map(int, required)), f"{base} is older than the project's requires-python"
    runs = [(n, arguments) for n, (instruction, arguments) in enumerate(steps) if instruction == "RUN"]
    workdir = next(arguments for instruction, arguments in steps if instruction == "WORKDIR")
    for number, command in runs:  # every file a pip install reads is in the image by then
        present = image_after(number)
        for name in re.findall(r"(?:-r|-c) (\S+)", command):
            assert f"{workdir}/{name}" in present, f"RUN {command}: {name} is not copied before it"
        if "-e ." in command:
            include = re.search(r"include = \[([^]]*)\]", (ROOT / "pyproject.toml").read_text()).group(1)
            for package in re.findall(r'"(\w+)\*"', include):  # every package the CLI imports
                assert f"{workdir}/{package}/__init__.py" in present, f"{package} is not in the image"
            assert f"{workdir}/pyproject.toml" in present
    image = image_after()
    from flows.commands import REPO_ROOT, SAMPLE_IMAGES  # the demo's images, next to flows/ as in the checkout

    sample = SAMPLE_IMAGES.relative_to(REPO_ROOT).as_posix()
    assert any(path.startswith(f"{workdir}/{sample}/") for path in image), "structxlip demo has no sample in the image"
    # The entrypoint is the repository's script, on PATH, executable, and its user's uid is the one compose defaults.
    (entrypoint,) = json.loads(next(arguments for instruction, arguments in steps if instruction == "ENTRYPOINT"))
    installed = f"/usr/local/bin/{entrypoint}"
    assert image[installed] == "docker/entrypoint.sh"
    assert any(f"chmod 0755 {installed}" in command for _, command in runs)
    uid = re.search(r"useradd [^&]*--uid (\d+)", " ".join(command for _, command in runs)).group(1)
    assert dockerfile_env()["STRUCTXLIP_UID"] == uid
    for name in WORKERS:
        assert SERVICES[name]["environment"]["STRUCTXLIP_UID"] == "${STRUCTXLIP_UID:-%s}" % uid
        assert SERVICES[name]["working_dir"] == workdir


def test_the_image_model_follows_copy_and_dockerignore():
    assert _ignored("tests/_artifacts/ui.png") and _ignored("pipelines/__pycache__/x.pyc") and _ignored(".env")
    assert not _ignored("sample/images/a.jpg") and not _ignored("pipelines/engine/plan.py")
    image = image_after()
    assert image["/app/pipelines/engine/plan.py"] == "pipelines/engine/plan.py"
    assert image["/app/requirements.txt"] == "requirements.txt"
    assert not any(path.startswith("/app/tests/") for path in image)  # never copied
    assert "/app/pyproject.toml" not in image_after(0)


def test_workers_match_dockerfile_and_prefect_yaml():
    # Root only inside the entrypoint, which drops to the runtime user (tested below by running it).
    (pool,) = work_pool_names()
    for name in WORKERS:
        worker = SERVICES[name]
        assert worker["build"] == {"context": ".", "dockerfile": "Dockerfile"}
        assert "entrypoint" not in worker, "keep the image's entrypoint: it fixes ownership and drops root"
        command = worker["command"]
        assert command[:3] == ["prefect", "worker", "start"] and command[command.index("--pool") + 1] == pool
        assert command[command.index("--type") + 1] == "process"
        assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert worker["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
        assert worker["environment"]["STRUCTXLIP_UID"] == "${STRUCTXLIP_UID:-1000}"
        # The Dockerfile's WORKDIR is where prefect.yaml's pull step runs the flows from.
        assert worker["working_dir"] == "/app"
    for name in SERVICES:
        assert "entrypoint" not in SERVICES[name], f"{name} must keep the image's entrypoint"
    deploy_command = " ".join(SERVICES["deploy"]["command"])
    assert f"prefect work-pool create {pool} --type process" in deploy_command and "deploy --all" in deploy_command
    # No pull step in prefect.yaml: `prefect deploy` records the folder it runs in, /app for the deploy service (and
    # the checkout's root outside Docker), so one prefect.yaml serves both.
    assert "pull" not in PREFECT_YAML and SERVICES["deploy"]["working_dir"] == "/app"


def test_volumes_images_read_only_outputs_writable():
    for name in WORKERS:
        volumes = SERVICES[name]["volumes"]
        assert "${IMAGES_DIR:-./images}:/data/images:ro" in volumes
        assert "${OUTPUT_DIR:-./outputs}:/data/out" in volumes
    assert "postgres-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert {"postgres-data", "model-cache"} <= set(COMPOSE["volumes"])


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


# ---- issue 14: ownership, caches, one code copy, password escaping, GPU sharing, container paths --------------------
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def dockerfile_env() -> dict[str, str]:
    """ENV NAME=value pairs of the Dockerfile (continuation lines joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    pairs = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for name, value in re.findall(r"(\w+)=(\S+)", line):
                pairs[name] = value
    return pairs


def dockerfile_created_dirs() -> set[str]:
    """Folders the Dockerfile creates with ``mkdir -p`` and gives to the runtime user with ``chown -R``."""
    text = DOCKERFILE.replace("\\\n", " ")
    created = {p for m in re.findall(r"mkdir -p ([^&]+)", text) for p in m.split()}
    created |= {str(parent) for p in created for parent in Path(p).parents}  # mkdir -p makes the parents too
    owned = {p for m in re.findall(r"chown -R structxlip:structxlip ([^&\n]+)", text) for p in m.split()}
    return {path for path in created if any(path == o or path.startswith(o.rstrip("/") + "/") for o in owned)}


def test_every_volume_mount_point_exists_in_the_image_owned_by_the_user():
    # A named volume mounted where the image has no folder is created by Docker as root: hub downloads fail.
    owned = dockerfile_created_dirs()
    for name in WORKERS:
        for volume in SERVICES[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source in COMPOSE["volumes"] or target == "/data/out":
                assert target in owned, f"{name}: {target} is not created and chowned in the Dockerfile"
    env = dockerfile_env()
    cache_mount = next(v.split(":")[1] for v in SERVICES["worker"]["volumes"] if v.startswith("model-cache:"))
    for variable in ("HF_HOME", "STRUCTXLIP_CACHE", "XDG_CACHE_HOME"):
        assert env[variable].startswith(cache_mount), f"{variable}={env[variable]} is outside the cache volume"
        assert env[variable].startswith(env["HOME"])
    assert env["PREFECT_HOME"] in owned


def test_one_copy_of_the_code_and_the_sample_in_the_image():
    installs = re.findall(r"pip install [^\n]*", DOCKERFILE)
    project_installs = [line for line in installs if "requirements.txt" not in line]
    assert project_installs == ["pip install --no-deps -e ."], project_installs  # editable: /app is the only copy


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message} substitution."""

    def substitute(match: re.Match) -> str:
        name, operator, rest = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if operator == ":?":
            raise KeyError(name)
        return rest or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, value)


def test_database_password_with_url_characters_reaches_postgres_intact(monkeypatch):
    from prefect.settings.models.root import Settings
    from sqlalchemy.engine import make_url

    password = "p@ss:w/rd#1%2F?&= x"
    dotenv = {**env_example(), "POSTGRES_PASSWORD": password}
    server_env = {k: interpolate(str(v), dotenv) for k, v in SERVICES["prefect-server"]["environment"].items()}
    for name in list(__import__("os").environ):
        if name.startswith(("PREFECT_SERVER_DATABASE", "PREFECT_API_DATABASE")):
            monkeypatch.delenv(name)
    for name, value in server_env.items():
        if name.startswith("PREFECT_SERVER_DATABASE"):
            monkeypatch.setenv(name, value)
    url = make_url(Settings().server.database.connection_url.get_secret_value())
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        dotenv["POSTGRES_USER"], password, "postgres", 5432, dotenv["POSTGRES_DB"])
    postgres_env = {k: interpolate(str(v), dotenv) for k, v in SERVICES["postgres"]["environment"].items()}
    assert postgres_env["POSTGRES_PASSWORD"] == password


def test_one_flow_run_at_a_time_on_the_gpu():
    deploy_command = " ".join(SERVICES["deploy"]["command"])
    (pool,) = work_pool_names()
    limit = re.search(rf"set-concurrency-limit {pool} (\S+)", deploy_command)
    assert limit and interpolate(limit.group(1), env_example()) == "1"
    for name in WORKERS:
        command = SERVICES[name]["command"]
        assert command[command.index("--limit") + 1] == "1"


def test_readme_deployment_example_uses_container_paths():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("`docker compose up`"):readme.index("## Layout")]
    runs = re.findall(r"prefect deployment run [^\n]*\n[^\n]*", section)
    assert runs, "no deployment example in the docker compose section"
    for run in runs:
        assert "images_dir=/data/images" in run and "out_dir=/data/out" in run, run
        assert "$PWD" not in run
    assert "structxlip demo --out /data/out/" in section


# ---- the entrypoint, run directly (as root here, like the container starts) --------------------------------------
def run_entrypoint(*command: str, env: dict[str, str], as_uid: int | None = None) -> subprocess.CompletedProcess:
    prefix = ["setpriv", f"--reuid={as_uid}", f"--regid={as_uid}", "--clear-groups"] if as_uid is not None else []
    return subprocess.run([*prefix, "sh", str(ENTRYPOINT), *command], env=env, capture_output=True, text=True,
                          timeout=60)


def base_env(tmp_path: Path, dirs: list[Path], uid: int = 4321) -> dict[str, str]:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    fake = fake_bin / "structxlip"
    fake.write_text('#!/bin/sh\necho "structxlip called with: $*"\n')
    fake.chmod(0o755)
    return {"PATH": f"{fake_bin}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path),
            "STRUCTXLIP_UID": str(uid), "STRUCTXLIP_GID": str(uid),
            "STRUCTXLIP_WRITABLE_DIRS": " ".join(str(d) for d in dirs)}


@pytest.fixture
def shared_tmp():
    """A temporary folder other users can traverse (pytest's tmp_path sits under a 0700 folder of root)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="entrypoint-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def root_only():
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (as the container's entrypoint has)")


def test_entrypoint_gives_a_root_owned_bind_mount_to_the_runtime_user_and_drops_root(shared_tmp):
    tmp_path = shared_tmp
    import os

    root_only()
    out, cache = tmp_path / "outputs", tmp_path / "cache" / "huggingface"
    (out / "old").mkdir(parents=True)  # as Docker creates a missing bind-mount source: root-owned
    (out / "old" / "part.parquet").write_bytes(b"x")
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    (out / "link").symlink_to(outside)
    env = base_env(tmp_path, [out, cache])
    result = run_entrypoint("sh", "-c", f'id -u; id -g; touch "{out}/written-by-worker"', env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4321", "4321"]  # the command ran as the runtime user, not root
    for path in (out, out / "old", out / "old" / "part.parquet", out / "written-by-worker", cache):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (4321, 4321), path
    assert os.lstat(out / "link").st_uid == 4321 and outside.stat().st_uid == 0  # the link, never its target


def test_entrypoint_runs_structxlip_subcommands_and_programs(shared_tmp):
    tmp_path = shared_tmp
    root_only()
    env = base_env(tmp_path, [tmp_path / "out"])
    assert run_entrypoint("demo", "--out", "/data/out/demo", env=env).stdout.strip() == \
        "structxlip called with: demo --out /data/out/demo"
    assert run_entrypoint("--help", env=env).stdout.strip() == "structxlip called with: --help"
    assert run_entrypoint(env=env).stdout.strip() == "structxlip called with: --help"
    assert run_entrypoint("echo", "prefect-like program", env=env).stdout.strip() == "prefect-like program"


def test_entrypoint_as_a_non_root_user_reports_an_unwritable_mount_in_one_line(shared_tmp):
    root_only()
    tmp_path = shared_tmp
    out = tmp_path / "outputs"
    out.mkdir(mode=0o755)  # root-owned, not writable by uid 4321
    env = base_env(tmp_path, [out])
    result = run_entrypoint("echo", "should not run", env=env, as_uid=4321)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "not writable by uid 4321" in lines[0]
    out.chmod(0o777)
    ok = run_entrypoint("echo", "runs", env=env, as_uid=4321)
    assert ok.returncode == 0 and ok.stdout.strip() == "runs"


def test_entrypoint_refuses_a_non_numeric_uid(tmp_path):
    env = {**base_env(tmp_path, [tmp_path / "out"]), "STRUCTXLIP_UID": "me"}
    result = run_entrypoint("echo", "x", env=env)
    assert result.returncode == 2 and "must be numbers" in result.stderr

"""The container image and the docker-compose stack, checked without a Docker engine.

- `docker-compose config` accepts the stack (CPU, and CPU + the GPU override) with every secret
  set, and refuses it, naming the variable, when any one secret is missing.
- Everything the stack builds, mounts or runs exists in the repository, and what the services
  run inside the image is copied into it (and not left out by .dockerignore).
- Every published port, health check, scrape target and data source URL is the port its service
  listens on: 8000 (gateway), 9108 (exporter), 9109 (Ray's metrics), 9090 (Prometheus), 3000
  (Grafana). Redis and the exporter publish nothing; Prometheus and Grafana only on 127.0.0.1.
- The Serve config the Ray head deploys validates, gives the gateway the producer's Redis URL
  by reference (no password in it), and each service connects as the Redis user that
  docs/security.md gives its role.
- The Dockerfile: pinned base, torch pinned as in pyproject.toml, non-root USER, HEALTHCHECK,
  HF_HUB_OFFLINE; docker/constraints.txt pins every runtime dependency within pyproject.toml's
  ranges. No image is `latest`; no secret has a default anywhere.
- Redis: AOF everysec and noeviction; the ACL file has docs/security.md's rights, holds no
  password, and a real redis-server started with it lets each user in and `default` not.
- The compose copies of the Prometheus config and the Grafana data source differ from the
  originals in their targets only; promtool accepts the copy.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from ray.serve.schema import ServeDeploySchema

from sluice.stack import free_port
from tests.acl_docs import PLACEHOLDERS, PRODUCER, SCALER, WORKER, doc_acl_lines
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
REDIS_DIR = ROOT / "docker" / "redis"
MONITORING = ROOT / "monitoring"
PROMETHEUS = MONITORING / "prometheus.yml"
PROMETHEUS_COMPOSE = MONITORING / "prometheus.compose.yml"
PROVISIONING = MONITORING / "grafana" / "provisioning"
DATASOURCE = PROVISIONING / "datasources" / "prometheus.yml"
DATASOURCE_COMPOSE = MONITORING / "grafana" / "datasources.compose.yml"
WORKDIR = "/app"  # the image's WORKDIR, where the services' relative paths resolve
GATEWAY = "sluice.gateway:build_app"

#: The stacks: the files given to docker-compose, in order.
STACKS = {"cpu": (COMPOSE,), "gpu": (COMPOSE, GPU_OVERRIDE)}
#: Secrets: compose must refuse to run without each, and none may have a default anywhere.
SECRETS = (
    "REDIS_ADMIN_PASSWORD",
    "SLUICE_WORKER_PASSWORD",
    "SLUICE_PRODUCER_PASSWORD",
    "SLUICE_SCALER_PASSWORD",
    "SLUICE_API_KEYS",
    "GRAFANA_ADMIN_PASSWORD",
)
DUMMIES = {name: f"dummy{i}{name.lower().replace('_', '')}" for i, name in enumerate(SECRETS)}
#: The Redis user and the password variable of each role's URL (docs/security.md).
URLS = {
    ("ray-head", "SLUICE_REDIS_URL"): (WORKER, "SLUICE_WORKER_PASSWORD"),
    ("ray-head", "SLUICE_SCALER_REDIS_URL"): (SCALER, "SLUICE_SCALER_PASSWORD"),
    ("ray-head", "SLUICE_GATEWAY_REDIS_URL"): (PRODUCER, "SLUICE_PRODUCER_PASSWORD"),
    ("exporter", "SLUICE_REDIS_URL"): (SCALER, "SLUICE_SCALER_PASSWORD"),
}
#: The ports each service listens on, by what it serves.
GATEWAY_PORT, EXPORTER_PORT, RAY_METRICS_PORT, PROMETHEUS_PORT, GRAFANA_PORT = (
    8000,
    9108,
    9109,
    9090,
    3000,
)
Json = dict[str, Any]


# --- helpers ----------------------------------------------------------------------------------


def load_yaml(path: Path) -> Json:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def without_comments(path: Path) -> str:
    """A YAML file's text without its comments (which show `${NAME:?message}` as an example)."""
    lines = path.read_text().splitlines()
    return "\n".join(line.split(" #")[0] for line in lines if not line.lstrip().startswith("#"))


def env_example() -> dict[str, str]:
    """The variables of .env.example and their values (commented-out lines left out)."""
    pairs = (
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {name.strip(): value.strip() for name, value in pairs}


def compose(
    files: tuple[Path, ...], *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """docker-compose on `files`, with `env` as the only settings: neither this shell's
    variables of the stack nor a developer's .env count."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("no `docker-compose`: `make system-deps` installs Debian's docker-compose")
    ours = set(env_example()) | set(SECRETS)
    base = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith("COMPOSE")}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:
        command = [binary, "--env-file", empty.name]
        for path in files:
            command += ["-f", str(path)]
        return subprocess.run(
            [*command, *args],
            cwd=ROOT,
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture(scope="module", params=sorted(STACKS))
def stack(request: pytest.FixtureRequest) -> Json:
    """The stack as docker-compose resolves it (`config`), every secret set to a dummy."""
    done = compose(STACKS[request.param], "config", env=DUMMIES)
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    resolved = yaml.safe_load(done.stdout)
    resolved["x-name"] = request.param
    return dict(resolved)


def published(service: Json) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each port the service publishes."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):  # the long syntax
            found.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        found.append((host_ip, int(parts[-2]), int(parts[-1])))
    return found


def option(command: list[str], name: str) -> str:
    """The value of `--name=value` or `--name value` in a command."""
    for i, word in enumerate(command):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name:
            return command[i + 1]
    raise AssertionError(f"{name} not in {command}")


def healthcheck_port(service: Json) -> int:
    test = " ".join(service["healthcheck"]["test"])
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", test)
    assert match, f"the health check asks no local port: {test}"
    return int(match.group(1))


def volumes(service: Json) -> list[tuple[str, str]]:
    """(source, container path) of each volume: an absolute host path for a bind mount, else
    a named volume. docker-compose 1.29 writes them `source:target:mode`; Compose v2 as maps."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append((str(volume["source"]), str(volume["target"])))
        else:
            source, target = str(volume).split(":")[:2]
            found.append((source, target))
    return found


def bind_mounts(service: Json) -> dict[str, Path]:
    """Container path -> host path of each bind mount (named volumes left out)."""
    return {target: Path(source) for source, target in volumes(service) if source.startswith("/")}


def serve_config_of(stack: Json) -> Path:
    """The Serve config the Ray head deploys: the last word of its command."""
    path = ROOT / stack["services"]["ray-head"]["command"][-1]
    assert path.suffix == ".yaml" and path.is_file(), path
    return path


def load_ray_head() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ray_head", ROOT / "docker" / "ray_head.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def copied_into_app() -> set[str]:
    """Repository paths the Dockerfile copies to the same relative path under WORKDIR."""
    copied = set()
    for instruction, args in dockerfile_instructions():
        if instruction != "COPY":
            continue
        *sources, destination = args.split()
        for source in sources:
            if destination == "./" or destination.rstrip("/") == f"./{source}".rstrip("/"):
                copied.add(source.rstrip("/"))
    return copied


# --- docker-compose accepts the stack, and refuses it without a secret -----------------------


@pytest.mark.parametrize("name", sorted(STACKS))
def test_docker_compose_accepts_the_stack(name: str) -> None:
    done = compose(STACKS[name], "config", "-q", env=DUMMIES)
    assert done.returncode == 0, f"docker-compose config -q failed:\n{done.stderr}"


@pytest.mark.parametrize("secret", SECRETS)
def test_docker_compose_refuses_the_stack_without_a_secret(secret: str) -> None:
    for env in ({k: v for k, v in DUMMIES.items() if k != secret}, {**DUMMIES, secret: ""}):
        done = compose(STACKS["cpu"], "config", "-q", env=env)
        assert done.returncode != 0, f"compose ran with {secret} unset or empty"
        assert f"set {secret} in .env" in done.stderr, done.stderr


# --- what the stack builds, mounts and runs exists ---------------------------------------------


def test_everything_the_stack_builds_or_mounts_exists(stack: Json) -> None:
    for name, service in stack["services"].items():
        if "build" in service:
            assert Path(service["build"]["context"]) == ROOT, name
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}: not in the repository"
            assert ROOT in source.parents, f"{name} mounts {source}, outside the repository"
        named = {source for source, _ in volumes(service) if not source.startswith("/")}
        assert named <= set(stack["volumes"]), name


def test_what_the_services_run_is_in_the_image(stack: Json) -> None:
    copied = copied_into_app()
    for name, service in stack["services"].items():
        if "build" not in service:
            continue
        for word in service["command"]:
            if re.fullmatch(r"[\w./-]+\.(py|yaml)", word):
                assert (ROOT / word).is_file(), f"{name} runs {word}: not in the repository"
                assert any(word == c or word.startswith(f"{c}/") for c in copied), (
                    f"{name} runs {word}, which the Dockerfile does not copy to {WORKDIR}"
                )


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = [
        line[1:].rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    ]
    assert "*" in DOCKERIGNORE.read_text().splitlines(), "an allow-list: .env never goes in"
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert any(
                    source.rstrip("/") == a or source.startswith(f"{a}/") for a in allowed
                ), f"COPY {source}: .dockerignore leaves it out of the build context"


# --- ports ------------------------------------------------------------------------------------


def test_only_the_gateway_grafana_and_prometheus_are_published(stack: Json) -> None:
    services = stack["services"]
    assert {n for n, s in services.items() if published(s)} == {"ray-head", "prometheus", "grafana"}
    assert [p[2] for p in published(services["ray-head"])] == [GATEWAY_PORT]
    # No authentication on Prometheus; Grafana's login page: this machine only.
    for name, port in (("prometheus", PROMETHEUS_PORT), ("grafana", GRAFANA_PORT)):
        assert published(services[name]) == [("127.0.0.1", port, port)], name


def test_the_gateway_port_is_the_one_serve_listens_on(stack: Json) -> None:
    head = stack["services"]["ray-head"]
    http = load_yaml(serve_config_of(stack))["http_options"]
    assert http == {"host": "0.0.0.0", "port": GATEWAY_PORT}, "reachable from outside the container"
    assert healthcheck_port(head) == GATEWAY_PORT
    assert "/healthz" in " ".join(head["healthcheck"]["test"])


def test_prometheus_scrapes_the_ports_the_services_listen_on(stack: Json) -> None:
    services = stack["services"]
    exporter_port = int(option(services["exporter"]["command"], "--port"))
    metrics_port = int(option(services["ray-head"]["command"], "--metrics-export-port"))
    assert (exporter_port, metrics_port) == (EXPORTER_PORT, RAY_METRICS_PORT)
    assert healthcheck_port(services["exporter"]) == EXPORTER_PORT

    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_COMPOSE)["scrape_configs"]}
    targets = {name: job["static_configs"][0]["targets"] for name, job in jobs.items()}
    assert targets == {
        "sluice-exporter": [f"exporter:{exporter_port}"],
        "ray": [f"ray-head:{metrics_port}"],
    }
    assert {t.split(":")[0] for ts in targets.values() for t in ts} <= set(services)


def test_grafana_reads_prometheus_where_it_listens(stack: Json) -> None:
    services = stack["services"]
    listen = option(services["prometheus"]["command"], "--web.listen-address")
    assert listen == f"0.0.0.0:{PROMETHEUS_PORT}"
    assert healthcheck_port(services["prometheus"]) == PROMETHEUS_PORT
    (source,) = load_yaml(DATASOURCE_COMPOSE)["datasources"]
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"

    grafana = services["grafana"]
    assert int(grafana["environment"]["GF_SERVER_HTTP_PORT"]) == GRAFANA_PORT
    assert healthcheck_port(grafana) == GRAFANA_PORT


# --- the Serve config, the Redis users --------------------------------------------------------


def test_the_gateway_gets_the_producers_url_and_no_password_is_in_the_config(
    stack: Json,
) -> None:
    ray_head = load_ray_head()
    env = stack["services"]["ray-head"]["environment"]
    config = load_yaml(serve_config_of(stack))
    ServeDeploySchema.model_validate(config)
    (gateway,) = [a for a in config["applications"] if a["import_path"] == GATEWAY]

    # The gateway's SLUICE_REDIS_URL is a reference, which Ray expands on the node from the
    # ray-head service's environment: the producer's URL, not the replicas' (worker) one.
    reference = gateway["runtime_env"]["env_vars"]["SLUICE_REDIS_URL"]
    assert ray_head.referenced_variables(config) == {"SLUICE_GATEWAY_REDIS_URL"}
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], reference)
    assert urlsplit(expanded).username == PRODUCER
    ray_head.check_environment(config, env)
    with pytest.raises(ValueError, match="SLUICE_GATEWAY_REDIS_URL"):
        ray_head.check_environment(config, {**env, "SLUICE_GATEWAY_REDIS_URL": ""})
    assert "SLUICE_API_KEYS" in env, "the gateway reads its keys from the environment"
    # Ray's own ports ask for a token, which the launcher makes: other containers run no code.
    assert env["RAY_AUTH_MODE"] == "token"


def test_each_service_connects_as_its_own_redis_user(stack: Json) -> None:
    for (service, variable), (user, password_variable) in URLS.items():
        url = urlsplit(stack["services"][service]["environment"][variable])
        assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379), variable
        assert (url.username, url.password) == (user, DUMMIES[password_variable]), variable


def test_the_gpu_stack_serves_gpu_yaml_on_a_reserved_gpu(stack: Json) -> None:
    head = stack["services"]["ray-head"]
    devices = head.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    index = head["build"]["args"]["TORCH_INDEX"]
    if stack["x-name"] == "cpu":
        assert serve_config_of(stack).name == "compose.yaml"
        assert not devices and index.endswith("/whl/cpu")
        return
    assert serve_config_of(stack).name == "compose-gpu.yaml"
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert not index.endswith("/whl/cpu"), "the GPU image needs a CUDA build of torch"
    # One image for both services: a second, CPU build would be waste.
    assert stack["services"]["exporter"]["image"] == head["image"] != "sluice:0.1.0"


# --- the Dockerfile, image tags, secrets ------------------------------------------------------


def test_the_dockerfile_is_pinned_non_root_offline_and_health_checked() -> None:
    steps = dockerfile_instructions()
    values = {name: args for name, args in steps}
    (base,) = [args for name, args in steps if name == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base

    users = [args for name, args in steps if name == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the image runs as root"
    assert "CMD" in values["HEALTHCHECK"]
    assert "HF_HUB_OFFLINE=1" in values["ENV"]

    args = dict(arg.split("=", 1) for name, arg in steps if name == "ARG")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch=={args["TORCH_VERSION"]}"' in pyproject, "torch as pinned in pyproject.toml"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    constraints = (ROOT / "docker" / "constraints.txt").read_text().splitlines()
    pins = [line for line in constraints if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9._-]+==[\w.+!-]+", pin) for pin in pins), "exact pins only"
    assert not [pin for pin in pins if pin.startswith("torch==")], "torch comes from TORCH_INDEX"


def test_the_constraints_pin_every_runtime_dependency_as_pyproject_allows() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (ROOT / "docker" / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    pins = {canonicalize_name(name): version for name, version in pins.items()}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue  # from TORCH_INDEX, at TORCH_VERSION
        regenerate = "regenerate it: python docker/constraints.py > docker/constraints.txt"
        assert name in pins, f"{name} is not in docker/constraints.txt; {regenerate}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"docker/constraints.txt pins {name}=={pins[name]}, outside {line!r}; {regenerate}"
        )


def test_every_image_has_an_exact_version(stack: Json) -> None:
    for name, service in stack["services"].items():
        tag = service["image"].partition(":")[2]
        assert tag and tag != "latest", f"{name}: {service['image']}"
        assert re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: {service['image']} is not exact"
    images = {
        s["image"].split(":")[0]: s["image"].split(":")[1] for s in stack["services"].values()
    }
    assert images["redis"].startswith("7.2.")
    assert images["grafana/grafana"].startswith("11."), "the dashboard is Grafana 11's"
    for path in (DOCKERFILE, COMPOSE, GPU_OVERRIDE):
        assert ":latest" not in path.read_text(), path


def test_no_secret_has_a_default_value() -> None:
    for path in (COMPOSE, GPU_OVERRIDE):
        for name, rest in re.findall(r"\$\{(\w+)([^}]*)\}", without_comments(path)):
            if name in SECRETS:
                assert rest.startswith(":?"), f"{path.name}: ${{{name}{rest}}} is not required"
    example = env_example()
    assert {name: example.get(name) for name in SECRETS} == dict.fromkeys(SECRETS, "")
    for name, args in dockerfile_instructions():
        if name in {"ENV", "ARG"}:
            assert not re.search(r"PASSWORD|API_KEY|SECRET|TOKEN", args), args
    for path in (ROOT / "deployments").glob("compose*.yaml"):
        config = load_yaml(path)
        assert not [a for a in config["applications"] if "redis_url" in (a.get("args") or {})]
        assert "@" not in str(config), f"{path.name}: credentials in a Serve config"


def test_every_variable_of_the_stack_is_in_env_example_and_documented() -> None:
    used = {
        name
        for path in (COMPOSE, GPU_OVERRIDE)
        for name in re.findall(r"\$\{(\w+)", without_comments(path))
    }
    listed = set(env_example())
    assert used == listed, f"used, not in .env.example: {used - listed}; unused: {listed - used}"
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text()
    assert not [name for name in listed if name not in deploy_doc]


# --- Redis --------------------------------------------------------------------------------------


def acl_rules(lines: list[str]) -> dict[str, list[str]]:
    """user -> its rules after the password, from `user NAME on <password> RULES` lines."""
    rules = {}
    for line in lines:
        words = line.split()
        if words[0] == "ACL":  # ACL SETUSER NAME reset on >password RULES (docs/security.md)
            words = words[2:3] + words[4:]
        else:  # user NAME on #hash RULES (the ACL file)
            words = words[1:]
        rules[words[0]] = words[3:]
    return rules


def template_lines() -> list[str]:
    text = (REDIS_DIR / "users.acl.template").read_text()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_redis_users_have_the_rights_of_docs_security_md() -> None:
    # Each user's `reset` line: what it gets. (The doc's other lines widen a user for the
    # examples of protocol.md, which the stack does not need.)
    lines = doc_acl_lines({user: "pw" for user in PLACEHOLDERS})
    docs = acl_rules([line for line in lines if line.split()[3] == "reset"])
    assert set(docs) == set(PLACEHOLDERS)
    lines = template_lines()
    assert lines[0] == "user default off"
    ours = acl_rules(lines[1:])
    assert ours.pop("admin") == ["~*", "&*", "+@all"]
    assert ours == docs
    # No password in the file: each user's only password is its hash's placeholder.
    for line in lines[1:]:
        words = line.split()
        assert words[2] == "on" and re.fullmatch(r"#@[A-Z_]+_SHA256@", words[3]), line
        assert not [w for w in words if w.startswith(">")], line


def test_redis_persists_every_second_and_never_evicts(stack: Json) -> None:
    conf = (REDIS_DIR / "redis.conf").read_text()
    settings = dict(
        line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#")
    )
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["maxmemory-policy"] == "noeviction"
    redis_service = stack["services"]["redis"]
    assert not published(redis_service), "Redis is reached on the stack's network only"
    assert ("redis-data", "/data") in volumes(redis_service), "the AOF on a volume"
    assert "--user sluice-scaler" in " ".join(redis_service["healthcheck"]["test"])
    assert "+ping" in acl_rules(template_lines())[SCALER]


@pytest.fixture
def redis_with_the_acl_file(tmp_path: Path) -> Iterator[int]:
    """A real redis-server with redis.conf and the ACL file start.sh writes; its port."""
    acl = tmp_path / "users.acl"
    env = {**os.environ, **DUMMIES}
    render = ["sh", str(REDIS_DIR / "start.sh"), "--render-only", str(acl)]
    subprocess.run(render, env=env, check=True, timeout=30)
    rendered = acl.read_text()
    assert not [d for d in DUMMIES.values() if d in rendered], "a password in the ACL file"
    # Redis reads no comments in an ACL file; each password is a SHA-256, placeholders gone.
    for line in rendered.splitlines()[1:]:
        assert re.fullmatch(r"user [\w-]+ on #[0-9a-f]{64} .+", line), line

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("no `redis-server`: `make system-deps` installs it")
    # The container's data directory is /data; Redis changes into `dir` as it reads it.
    conf = tmp_path / "redis.conf"
    conf.write_text((REDIS_DIR / "redis.conf").read_text().replace("dir /data", f"dir {tmp_path}"))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            str(conf),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--aclfile",
            str(acl),
            "--maxmemory",
            "64mb",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_lets_each_user_in_with_its_password_and_not_default(
    redis_with_the_acl_file: int,
) -> None:
    port = redis_with_the_acl_file

    def client(user: str | None, password_variable: str | None) -> redis.Redis:
        password = DUMMIES[password_variable] if password_variable else None
        return redis.Redis(port=port, username=user, password=password, socket_timeout=5)

    admin = client("admin", "REDIS_ADMIN_PASSWORD")
    wait_for(lambda: _answers(admin), timeout_s=10, what="redis-server with the ACL file")
    assert admin.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}

    assert client(WORKER, "SLUICE_WORKER_PASSWORD").ping()
    assert client(SCALER, "SLUICE_SCALER_PASSWORD").ping()
    assert client(PRODUCER, "SLUICE_PRODUCER_PASSWORD").exists("sluice:{m}:jobs") == 0
    with pytest.raises(redis.AuthenticationError):
        client(None, None).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, username=WORKER, password="wrong").ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        client(PRODUCER, "SLUICE_PRODUCER_PASSWORD").keys("*")


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


# --- the compose copies of the monitoring configs ---------------------------------------------


def without_targets(config: Json) -> Json:
    for job in config["scrape_configs"]:
        job.pop("static_configs")
    return config


def test_the_compose_prometheus_config_differs_only_in_its_targets() -> None:
    assert without_targets(load_yaml(PROMETHEUS_COMPOSE)) == without_targets(load_yaml(PROMETHEUS))
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("no `promtool`: `make system-deps` installs Debian's prometheus package")
    done = subprocess.run(
        [binary, "check", "config", str(PROMETHEUS_COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_compose_grafana_datasource_differs_only_in_its_url(stack: Json) -> None:
    ours, original = load_yaml(DATASOURCE_COMPOSE), load_yaml(DATASOURCE)
    for config in (ours, original):
        config["datasources"][0].pop("url")
    assert ours == original

    mounts = bind_mounts(stack["services"]["grafana"])
    provider = load_yaml(PROVISIONING / "dashboards" / "sluice.yml")["providers"][0]
    assert mounts[provider["options"]["path"]] == MONITORING / "grafana" / "dashboards"
    assert mounts["/etc/grafana/provisioning/dashboards"] == PROVISIONING / "dashboards"
    assert mounts["/etc/grafana/provisioning/datasources/prometheus.yml"] == DATASOURCE_COMPOSE
    env = stack["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == DUMMIES["GRAFANA_ADMIN_PASSWORD"]

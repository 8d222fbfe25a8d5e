"""The shipped deployment files, checked the way Serve and KubeRay will read them, with no Ray
cluster and no Redis: every `deployments/*.yaml` and the `serveConfigV2` inside
`deployments/k8s/rayservice.yaml` parse with Ray's own schema, build a valid `ReplicaConfig`,
and autoscale with `BacklogPolicy` on their own model's stream; `gpu.yaml` asks for a GPU; the
KubeRay manifest reads its Redis URLs from a Secret and has a GPU worker group to scale. The
compose configs (`compose.yaml`, `compose-gpu.yaml`) add the HTTP gateway behind Serve's proxy
to local.yaml's and gpu.yaml's applications (tests/unit/test_compose.py checks the rest)."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.serve.config import AutoscalingConfig, ProxyLocation
from ray.serve.schema import ServeDeploySchema

from sluice.settings import ReplicaConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ROOT / "deployments"
RAYSERVICE = DEPLOYMENTS / "k8s" / "rayservice.yaml"
K8S_APP = "k8s/rayservice.yaml#serveConfigV2"
SHIPPED = {"local.yaml", "gpu.yaml", "multi.yaml", "compose.yaml", "compose-gpu.yaml", "chat.yaml"}
#: Each compose config, and the application of which its model application is a copy.
COMPOSE_COPIES = {"compose.yaml": "local.yaml", "compose-gpu.yaml": "gpu.yaml"}

REPLICA = "sluice.replica:build_app"
GATEWAY = "sluice.gateway:build_app"
POLICY = "sluice.autoscale:BacklogPolicy"
#: BacklogPolicy's keyword arguments (its interface, fixed): a typo here would fail the deploy.
POLICY_KWARGS = {
    "model",
    "redis_url",
    "redis_cluster",
    "target_drain_s",
    "utilization",
    "hysteresis",
    "default_rate",
    "poll_interval_s",
}
Json = dict[str, Any]


def load_yaml(path: Path) -> Json:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def rayservice() -> Json:
    return load_yaml(RAYSERVICE)


def serve_configs() -> dict[str, Json]:
    """Every Serve config we ship, by name: the YAML files and the one inside the manifest."""
    configs = {path.name: load_yaml(path) for path in sorted(DEPLOYMENTS.glob("*.yaml"))}
    configs[K8S_APP] = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    return configs


CONFIGS = serve_configs()


def replica_apps(config: Json) -> list[Json]:
    """The applications of a Serve config that serve a model (not the HTTP gateway)."""
    return [app for app in config["applications"] if app["import_path"] == REPLICA]


def gateway_apps(config: Json) -> list[Json]:
    return [app for app in config["applications"] if app["import_path"] == GATEWAY]


def deployments_of(config: Json) -> list[tuple[Json, Json]]:
    """(application, deployment options) pairs of a Serve config's model applications."""
    return [(app, dep) for app in replica_apps(config) for dep in app.get("deployments", [])]


def policy_importable() -> bool:
    return importlib.util.find_spec("sluice.autoscale") is not None


def gateway_importable() -> bool:
    return importlib.util.find_spec("sluice.gateway") is not None


def test_the_shipped_configs_are_all_checked() -> None:
    # The glob finding nothing would make every parametrized test below vacuous.
    assert SHIPPED | {K8S_APP} <= set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_serve_accepts_the_config_and_runs_a_proxy_only_for_the_gateway(name: str) -> None:
    schema = ServeDeploySchema.model_validate(CONFIGS[name])

    assert replica_apps(CONFIGS[name]), f"{name} serves no model"
    for app in schema.applications:
        assert app.import_path in {REPLICA, GATEWAY}, app.import_path
        if app.import_path == REPLICA:
            assert app.route_prefix is None, "replicas pull from Redis: no HTTP route"
    gateways = gateway_apps(CONFIGS[name])
    if gateways:
        # The one HTTP ingress, at the root, behind one proxy on the head.
        assert [g["route_prefix"] for g in gateways] == ["/"]
        assert schema.proxy_location == ProxyLocation.HeadOnly
    else:
        # Replicas pull from Redis: an HTTP proxy would only take CPU from them.
        assert schema.proxy_location == ProxyLocation.Disabled


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_application_args_build_a_replica_config(name: str) -> None:
    from sluice.replica import Replica

    for app in replica_apps(CONFIGS[name]):
        config = ReplicaConfig.from_args(app["args"])
        assert config.model.name == app["name"], "one application per model, named after it"
        # Options for a deployment the builder does not make would fail the deploy.
        assert [d["name"] for d in app["deployments"]] == [Replica.name]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_replica_autoscales_on_its_own_models_backlog(name: str) -> None:
    for app, deployment in deployments_of(CONFIGS[name]):
        model = app["args"]["model"]["name"]
        scaling = deployment.get("autoscaling_config")
        assert scaling, f"{name}: {app['name']} has no autoscaling_config"
        assert "num_replicas" not in deployment, "Serve refuses num_replicas with autoscaling"

        policy = scaling["policy"]
        assert policy["policy_function"] == POLICY
        kwargs = policy["policy_kwargs"]
        # A copy-pasted block watching another model's stream would scale on the wrong queue.
        assert kwargs["model"] == model, f"{name}: {app['name']} watches {kwargs['model']!r}"
        assert set(kwargs) <= POLICY_KWARGS, f"unknown policy_kwargs {set(kwargs) - POLICY_KWARGS}"
        assert scaling["min_replicas"] == 0, "scale to zero when idle"
        # One replica at deploy registers the model; SDK submits are refused until one has.
        assert scaling["initial_replicas"] >= 1

        with warnings.catch_warnings():
            # Serve warns of what a later Ray refuses (look_back_period_s <= metrics interval).
            warnings.simplefilter("error", FutureWarning)
            if policy_importable():
                # Serve's own validation: imports the policy class and pickles it, as a deploy
                # does.
                validated = AutoscalingConfig.model_validate(scaling)
                assert validated.policy.policy_function == POLICY
            else:
                # The policy module is not written yet: check everything but the import.
                without_policy = {k: v for k, v in scaling.items() if k != "policy"}
                AutoscalingConfig.model_validate(without_policy)


@pytest.mark.skipif(not policy_importable(), reason="sluice.autoscale is not written yet")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_policy_constructs_from_its_kwargs(name: str) -> None:
    from sluice.autoscale import BacklogPolicy

    for _, deployment in deployments_of(CONFIGS[name]):
        # Construction only validates: the Redis poller starts on the controller's first call.
        BacklogPolicy(**deployment["autoscaling_config"]["policy"]["policy_kwargs"])


def test_gpu_yaml_shares_each_gpu_among_replicas_and_runs_bf16() -> None:
    (app,) = CONFIGS["gpu.yaml"]["applications"]
    (deployment,) = app["deployments"]
    model = ReplicaConfig.from_args(app["args"]).model

    assert model.device.startswith("cuda")
    assert model.dtype == "bf16"
    # Issue 17: one replica's per-job work bounds a small model on a GPU, so several replicas
    # share one GPU; as many as the shares of one GPU, so that one machine places them all.
    share = deployment["ray_actor_options"]["num_gpus"]
    assert 0 < share < 1
    assert deployment["autoscaling_config"]["max_replicas"] * share == 1
    local_model = CONFIGS["local.yaml"]["applications"][0]["args"]["model"]
    assert model.max_batch_size > local_model["max_batch_size"], "GPU batches are larger"


@pytest.mark.parametrize("name", ["local.yaml", "multi.yaml", "compose.yaml", "chat.yaml"])
def test_the_cpu_configs_ask_for_no_gpu(name: str) -> None:
    # A GPU asked for on a CPU-only box leaves the replica pending for ever.
    for app, deployment in deployments_of(CONFIGS[name]):
        assert ReplicaConfig.from_args(app["args"]).model.device == "cpu"
        assert not deployment["ray_actor_options"].get("num_gpus")


def without_max_replicas(config: Json) -> Json:
    stripped = copy.deepcopy(config)
    for _, deployment in deployments_of(stripped):
        deployment["autoscaling_config"].pop("max_replicas")
    return stripped


def test_the_k8s_application_is_gpu_yamls() -> None:
    # One application, two places: only the replica ceiling may differ (a cluster's GPUs).
    assert without_max_replicas(CONFIGS[K8S_APP]) == without_max_replicas(CONFIGS["gpu.yaml"])


@pytest.mark.parametrize(("name", "original"), sorted(COMPOSE_COPIES.items()))
def test_the_compose_model_application_is_a_shipped_one(name: str, original: str) -> None:
    # The compose stack serves local.yaml's (or gpu.yaml's) application unchanged, plus the gateway.
    assert replica_apps(CONFIGS[name]) == CONFIGS[original]["applications"]
    (gateway,) = gateway_apps(CONFIGS[name])
    # The gateway's allowlist is the models the config serves: no more, no fewer.
    served = [app["args"]["model"]["name"] for app in replica_apps(CONFIGS[name])]
    assert gateway["args"]["gateway"]["models"] == served


@pytest.mark.parametrize("name", sorted(COMPOSE_COPIES))
def test_the_gateway_application_builds_from_its_args(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (app,) = gateway_apps(CONFIGS[name])
    assert app["import_path"] == GATEWAY
    if not gateway_importable():
        # sluice.gateway is not written yet: its import path is all there is to check.
        return
    from ray.serve import Application

    from sluice.gateway import build_app

    # As in the ray-head container: the producer's URL (which the runtime_env makes the
    # gateway's SLUICE_REDIS_URL) and the API keys in the environment, not in the args.
    assert set(app["runtime_env"]["env_vars"]) == {"SLUICE_REDIS_URL"}
    monkeypatch.setenv("SLUICE_REDIS_URL", "redis://sluice-producer:x@redis:6379/0")
    monkeypatch.setenv("SLUICE_API_KEYS", "test-key")
    assert isinstance(build_app(app["args"]), Application)


def secret_env(container: Json) -> dict[str, Json]:
    """The container's env vars that come from a Secret, by name: their secretKeyRef."""
    return {
        env["name"]: env["valueFrom"]["secretKeyRef"]
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }


def test_rayservice_is_a_kuberay_service_with_autoscaling() -> None:
    manifest = rayservice()
    cluster = manifest["spec"]["rayClusterConfig"]

    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == ray.__version__, "the manifest names the Ray we test with"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        # KubeRay's rayStartParams is map[string]string: a YAML number is refused.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_rayservice_reads_the_redis_urls_from_a_secret() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]

    # The controller (BacklogPolicy) is on the head; the app builder may run on any node.
    assert {"SLUICE_REDIS_URL", "SLUICE_SCALER_REDIS_URL"} <= set(secret_env(head))
    url_ref = secret_env(head)["SLUICE_REDIS_URL"]
    assert url_ref["name"] and url_ref["key"]
    for worker in workers:
        assert secret_env(worker)["SLUICE_REDIS_URL"] == url_ref
    for container in [head, *workers]:
        plain = {e["name"] for e in container["env"] if "value" in e}
        assert "SLUICE_REDIS_URL" not in plain, "a password in the manifest"


def test_rayservice_has_a_gpu_worker_group_for_every_replica() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    (app,) = CONFIGS[K8S_APP]["applications"]
    (deployment,) = app["deployments"]

    gpus_per_pod = int(group["rayStartParams"]["num-gpus"])
    assert gpus_per_pod >= 1
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == gpus_per_pod
    assert group["minReplicas"] == 0, "no GPU held while no replica runs"
    # Serve asking for more replicas than the group can ever hold would leave them pending.
    per_pod = gpus_per_pod // deployment["ray_actor_options"]["num_gpus"]
    assert deployment["autoscaling_config"]["max_replicas"] == group["maxReplicas"] * per_pod
    # ... and a Pod has the CPUs for all the replicas that share its GPU.
    pod_cpus = float(container["resources"]["requests"]["cpu"])
    assert pod_cpus >= per_pod * deployment["ray_actor_options"]["num_cpus"]
    # With no proxy, KubeRay's default worker probe (which asks the proxy) never passes.
    probe = container["readinessProbe"]["exec"]["command"]
    assert not any(":8000" in part for part in probe)

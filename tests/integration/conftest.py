"""Fixtures of the integration tests beyond the session's (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_config(tmp_path, tiny_bert) -> Path:
    """deployments/local.yaml with the tiny model and half a CPU: the shipped config, small."""
    config = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    app = config["applications"][0]
    app["args"]["model"].update(model_path=tiny_bert, torch_threads=1)
    app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.5
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path

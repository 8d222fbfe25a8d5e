"""deployments/multi.yaml as shipped, with tiny models in place of the real ones: three
applications, each answering its own task from its own stream, and `unknown_model` for a
model none of them serves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sluice.client import Client
from sluice.errors import UnknownModel

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_multi_yaml_serves_three_tasks_side_by_side(
    ray_serve, worker_url, producer_url, model_name, tiny_bert, tiny_classifier, tiny_generator
):
    from ray import serve

    from sluice.replica import Replica
    from sluice.settings import ReplicaConfig

    config = yaml.safe_load((ROOT / "deployments" / "multi.yaml").read_text())
    tiny = {"embed": tiny_bert, "classify": tiny_classifier, "generate": tiny_generator}
    names = {}
    try:
        for app in config["applications"]:
            model = app["args"]["model"]
            task = model["task"]
            # Unique names, so this test's streams are its own; the rest as shipped.
            name = names[task] = f"{model_name}-{model['name']}"
            model.update(name=name, model_path=tiny[task], torch_threads=1, dtype="fp32")
            args = {**app["args"], "redis_url": worker_url}
            replica = Replica.options(ray_actor_options={"num_cpus": 0.25})
            serve.run(
                replica.bind(ReplicaConfig.from_args(args).model_dump(mode="json")),
                name=name,
                route_prefix=None,
            )

        with Client(producer_url) as client:
            jobs = [
                client.submit(names["embed"], {"text": "hello"}),
                client.submit(names["classify"], {"text": "hello"}, params={"top_k": 2}),
                client.submit(names["generate"], {"prompt": "hello"}, params={"max_new_tokens": 4}),
            ]
            embed, label, text = client.wait(jobs, timeout=120)
            with pytest.raises(UnknownModel, match="not-served"):
                client.submit(f"{model_name}-not-served", {"text": "hello"})

        assert len(embed.output) == 32 and embed.model == names["embed"]
        assert len(label.output["labels"]) == 2 and label.model == names["classify"]
        assert text.output["usage"]["completion_tokens"] <= 4 and text.model == names["generate"]
    finally:
        for name in names.values():
            serve.delete(name, _blocking=True)

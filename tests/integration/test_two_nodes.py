"""Past one machine: a second Ray node joins the session's cluster, and replicas of one model on
both nodes consume the same stream (each job answered once, by whichever pulled it)."""

from __future__ import annotations

import pytest
from ray import serve

from tests.helpers import dead_letters, wait_all_results, xadd_jobs

pytestmark = pytest.mark.integration


def test_replicas_on_two_nodes_share_one_stream(ray_cluster, r, deploy, tiny_bert, model_name):
    node = ray_cluster.add_node(num_cpus=1)
    try:
        # At most one replica a node: two replicas must land on two nodes.
        deploy(model_name, tiny_bert, num_replicas=2, options={"max_replicas_per_node": 1})
        ids = xadd_jobs(r, model_name, [f"sentence {i} for two nodes" for i in range(4000)])
        results = wait_all_results(r, model_name, ids, timeout_s=180)
        assert all(res["status"] == "ok" for res in results.values())
        assert dead_letters(r, model_name) == []

        handle = serve.get_app_handle(model_name)
        replicas: dict[str, dict] = {}
        for _ in range(60):  # the router picks a replica per call: ask until both answered
            info = handle.info.remote().result()
            replicas[info["consumer"]] = info
            if len(replicas) == 2:
                break
        assert len(replicas) == 2
        assert {info["node_id"] for info in replicas.values()} == {
            ray_cluster.head_node.node_id,
            node.node_id,
        }
        served = [info["stats"]["ok"] for info in replicas.values()]
        assert all(n > 0 for n in served) and sum(served) == len(ids), served
    finally:
        serve.delete(model_name, _blocking=True)
        ray_cluster.remove_node(node)

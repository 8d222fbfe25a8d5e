"""Runners by task name: the replica asks this registry, never a concrete class."""

from __future__ import annotations

from sluice.runners.base import Encoded, Runner
from sluice.settings import ModelSettings


def build_runner(settings: ModelSettings) -> Runner:
    """The runner for `settings.task`, not yet loaded."""
    if settings.task == "embed":
        from sluice.runners.embed import EmbedRunner

        return EmbedRunner(settings)
    raise ValueError(f"unknown task {settings.task!r}")


__all__ = ["Encoded", "Runner", "build_runner"]

"""Runners by task name: the replica asks this registry, never a concrete class."""

from __future__ import annotations

import importlib

from sluice.runners.base import Encoded, Runner
from sluice.settings import ModelSettings

# Imported on demand, so a replica loads only its own task's module.
RUNNERS = {
    "embed": "sluice.runners.embed:EmbedRunner",
    "classify": "sluice.runners.classify:ClassifyRunner",
    "generate": "sluice.runners.generate:GenerateRunner",
    "null": "sluice.runners.null:NullRunner",
}


def build_runner(settings: ModelSettings) -> Runner:
    """The runner for `settings.task`, not yet loaded."""
    try:
        module_name, class_name = RUNNERS[settings.task].split(":")
    except KeyError:
        raise ValueError(f"unknown task {settings.task!r}; known: {sorted(RUNNERS)}") from None
    runner: type[Runner] = getattr(importlib.import_module(module_name), class_name)
    return runner(settings)


__all__ = ["RUNNERS", "Encoded", "Runner", "build_runner"]

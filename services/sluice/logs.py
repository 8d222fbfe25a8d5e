"""Where the package's logs go inside a Serve actor (a replica, the gateway)."""

from __future__ import annotations

import logging


def route_logs(level: str) -> None:
    """Sends the package's logs where Serve sends the actor's own (its log file, stderr)."""
    ours = logging.getLogger("sluice")
    ours.setLevel(level)
    if not ours.handlers:
        for handler in logging.getLogger("ray.serve").handlers:
            ours.addHandler(handler)
        ours.propagate = False

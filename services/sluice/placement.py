"""What a replica may use where Ray placed it: its CPUs' worth of threads, at full priority.

Ray reserves `num_cpus` for a replica, and Serve places replicas by those reservations. A CPU
replica whose torch runs more threads than it reserved takes cores Ray thinks are free: a
second replica placed beside it then slows both (issue 17 measured 0.43x the bare model on a
2-core box). So a CPU replica runs at most as many torch threads as the CPUs Ray gave it.

Ray also starts its workers at nice 15 (`RAY_worker_niceness`), so a replica started by
`serve run` loses the CPU to redis-server and Ray's own daemons. The replica is the work this
machine exists for: it asks for nice 0 itself, whatever started it, and says so when the
system does not allow it.
"""

from __future__ import annotations

import logging
import math
import os

from sluice.settings import ModelSettings

log = logging.getLogger(__name__)


def assigned_cpus() -> float | None:
    """The CPUs Ray reserved for this actor (None outside Ray, or with no reservation)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        context = ray.get_runtime_context()
        cpus = context.get_assigned_resources().get("CPU")  # type: ignore[no-untyped-call]
    except Exception:  # outside an actor: nothing is reserved
        return None
    return float(cpus) if cpus else None


def fit_threads(model: ModelSettings, cpus: float | None) -> ModelSettings:
    """The model settings with a CPU replica's torch threads capped at its reserved CPUs
    (at least one); unset threads become that number. GPU replicas are left as they are."""
    if cpus is None or model.device != "cpu":
        return model
    fit = max(1, math.floor(cpus))
    if model.torch_threads is None:
        return model.model_copy(update={"torch_threads": fit})
    if model.torch_threads <= fit:
        return model
    log.warning(
        "%s: torch_threads %d is more than the %s CPUs Ray reserved for this replica: running "
        "%d, so that replicas placed beside it do not share its cores (raise "
        "ray_actor_options.num_cpus to run more)",
        model.name,
        model.torch_threads,
        cpus,
        fit,
    )
    return model.model_copy(update={"torch_threads": fit})


def run_at_full_priority() -> int:
    """Asks for nice 0 (from Ray's 15) for every thread of the process; returns the niceness
    the process then runs at (its highest thread's).

    On Linux niceness belongs to each thread, and a new thread inherits its creator's: so every
    thread that exists now is reniced (Ray's and the event loop's), and the threads created
    later (the pipeline's pools, torch's) start at 0."""
    before = _highest_nice()
    if before <= 0:
        return before
    for tid in _threads():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except PermissionError:
            log.warning(
                "this replica runs at nice %d (Ray's worker niceness) and may not lower it: "
                "start Ray with RAY_worker_niceness=0 (sluice up does), or give it CAP_SYS_NICE",
                before,
            )
            break
    return _highest_nice()


def _highest_nice() -> int:
    nices = []
    for tid in _threads():
        try:
            nices.append(os.getpriority(os.PRIO_PROCESS, tid))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return max(nices, default=os.getpriority(os.PRIO_PROCESS, 0))


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process as a whole
        return [0]

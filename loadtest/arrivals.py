"""Arrival schedules: when each job is due, as offsets in seconds from the start of a run.

Precomputed before the run starts, so the sender only sleeps until each due time: the offered
load never depends on how fast the system answers (open loop).

- `poisson(rate)`: exponential gaps, the memoryless arrivals of many independent users.
- `gamma(rate, burstiness)`: gamma gaps with shape = burstiness and mean 1/rate, as vLLM's
  `bench serve --burstiness`: 1 is Poisson, below 1 burstier (clumps and lulls), above 1
  more even, and a very large value tends to `constant`.
- `constant(rate)`: evenly spaced.
- `ramp(start, end)`: a Poisson process whose rate grows linearly from `start` to `end`.
- `trace(file)`: replayed offsets, from JSON (a list of numbers, or `{"offsets": [...]}`) or
  CSV (the first column, a header allowed).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np


def _check(rate: float, duration_s: float) -> None:
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")


def _cumulative(gaps: np.ndarray, duration_s: float) -> list[float]:
    offsets = np.cumsum(gaps)
    return [float(x) for x in offsets[offsets < duration_s]]


def _gaps_needed(rate: float, duration_s: float) -> int:
    # Enough draws to pass the end with near certainty (mean + 6 sigma + a margin).
    mean = rate * duration_s
    return int(mean + 6 * math.sqrt(mean) + 16)


def poisson(rate: float, duration_s: float, seed: int = 0) -> list[float]:
    """Poisson arrivals at `rate` per second over `duration_s`."""
    return gamma(rate, 1.0, duration_s, seed)


def gamma(rate: float, burstiness: float, duration_s: float, seed: int = 0) -> list[float]:
    """Gamma-distributed gaps with shape `burstiness` and mean 1/rate (1 = Poisson)."""
    _check(rate, duration_s)
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    rng = np.random.default_rng(seed)
    # Burstier schedules need more draws: their gaps vary more around the same mean.
    n = int(_gaps_needed(rate, duration_s) * max(1.0, 1 / burstiness))
    while True:
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n)
        if gaps.sum() >= duration_s:
            return _cumulative(gaps, duration_s)
        n *= 2


def constant(rate: float, duration_s: float) -> list[float]:
    """One arrival every 1/rate seconds, the first at 0."""
    _check(rate, duration_s)
    return [k / rate for k in range(math.ceil(rate * duration_s - 1e-9))]


def ramp(start_rate: float, end_rate: float, duration_s: float, seed: int = 0) -> list[float]:
    """A Poisson process whose rate grows linearly from `start_rate` to `end_rate`.

    Arrivals of a rate-1 Poisson process are mapped through the inverse of the cumulative
    rate Λ(t) = a·t + (b - a)·t²/(2T) (time rescaling)."""
    _check(max(start_rate, end_rate), duration_s)
    if min(start_rate, end_rate) < 0:
        raise ValueError(f"rates must not be negative, got {start_rate} and {end_rate}")
    a, slope = start_rate, (end_rate - start_rate) / duration_s
    total = a * duration_s + slope * duration_s**2 / 2
    unit = poisson(1.0, total, seed)
    if slope == 0:
        return [u / a for u in unit]
    # Solve slope/2·t² + a·t - u = 0 for t ≥ 0.
    return [(-a + math.sqrt(a * a + 2 * slope * u)) / slope for u in unit]


def trace(path: str | Path) -> list[float]:
    """Offsets (seconds) from a JSON or CSV file, sorted, shifted so the first is at 0."""
    path = Path(path)
    text = path.read_text()
    values: list[float]
    if path.suffix.lower() == ".json":
        body = json.loads(text)
        raw = body["offsets"] if isinstance(body, dict) else body
        values = [float(x) for x in raw]
    else:
        values = []
        for row in csv.reader(text.splitlines()):
            if not row or not row[0].strip():
                continue
            try:
                values.append(float(row[0]))
            except ValueError:
                if values:  # only the first row may be a header
                    raise ValueError(f"{path}: not a number: {row[0]!r}") from None
    if not values:
        raise ValueError(f"{path}: no offsets")
    values.sort()
    return [v - values[0] for v in values]


def schedule(
    kind: str,
    rate: float,
    duration_s: float,
    *,
    burstiness: float = 1.0,
    seed: int = 0,
    trace_file: str | Path | None = None,
) -> list[float]:
    """The offsets of one run, by name: poisson, gamma, constant or trace.

    A trace is replayed at its own pace and cut at `duration_s`."""
    if kind == "poisson":
        return poisson(rate, duration_s, seed)
    if kind == "gamma":
        return gamma(rate, burstiness, duration_s, seed)
    if kind == "constant":
        return constant(rate, duration_s)
    if kind == "trace":
        if trace_file is None:
            raise ValueError("arrival 'trace' needs a trace file")
        return [t for t in trace(trace_file) if t < duration_s]
    raise ValueError(f"arrival must be poisson, gamma, constant or trace, got {kind!r}")
